"""``run.py bench``'s pure parts: the table, targets and their direction, JSON, the plot's lines.

No benchmark runs here (tests check behaviour; benchmarks measure speed): every record is made
by hand, and the runner is only driven down the paths that stop before measuring anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import plot, report
from bench import run as runner
from bench.records import Record, measurement, throughput

RECORDS = [
    throughput("ActorRef.call x50", 389_438.4, "channel request/reply x50", 466_179.0, 0.75),
    throughput("memory create x50", 150_000.0, "channel request/reply x50", 466_179.0, 0.6),
    throughput("lmdb create x1", 8_000.0, "raw lmdb create", 125_000.0, added_us=True),
    measurement("disk open 1M", 0.42, "s", "limit", 1.0, target=1.0),
    measurement("memory size 1M", 900.0, "MB", "plain dict", 400.0, target=2.0),
]


def test_the_table_has_a_line_per_record_with_rates_values_targets_and_verdicts() -> None:
    lines = report.format_table(RECORDS).splitlines()
    assert len(lines) == 1 + len(RECORDS)
    assert lines[0].split() == [
        "benchmark", "rate", "/", "value", "floor", "floor", "rate", "/", "value",
        "ratio", "added", "target", "holds",
    ]  # fmt: skip
    assert [line.split() for line in lines[1:]] == [
        ["ActorRef.call", "x50", "389,438/s", "channel", "request/reply", "x50", "466,179/s",
         "0.84", "-", ">=", "0.75", "yes"],
        ["memory", "create", "x50", "150,000/s", "channel", "request/reply", "x50", "466,179/s",
         "0.32", "-", ">=", "0.6", "no"],
        # One caller: 125 us an operation against the floor's 8 us.
        ["lmdb", "create", "x1", "8,000/s", "raw", "lmdb", "create", "125,000/s", "0.06",
         "+117.0", "us", "-", "-"],
        ["disk", "open", "1M", "0.42", "s", "limit", "1", "s", "0.42", "-", "<=", "1.0", "yes"],
        ["memory", "size", "1M", "900", "MB", "plain", "dict", "400", "MB", "2.25", "-", "<=",
         "2.0", "no"],
    ]  # fmt: skip
    # The columns line up: each ratio ends where the header's "ratio" does.
    ratio_end = lines[0].index("ratio") + len("ratio")
    assert {line[ratio_end - 4 : ratio_end] for line in lines[1:]} == {
        "0.84", "0.32", "0.06", "0.42", "2.25",
    }  # fmt: skip


def test_a_rate_holds_at_or_above_its_target_and_a_cost_at_or_below() -> None:
    assert throughput("r", 75.0, "f", 100.0, 0.75)["holds"] is True
    assert throughput("r", 74.0, "f", 100.0, 0.75)["holds"] is False
    assert measurement("m", 200.0, "MB", "f", 100.0, 2.0)["holds"] is True
    assert measurement("m", 201.0, "MB", "f", 100.0, 2.0)["holds"] is False
    targets = [">= 0.75", ">= 0.6", "-", "<= 1.0", "<= 2.0"]
    assert [report.target_text(r) for r in RECORDS] == targets
    assert [report.holds_text(r) for r in RECORDS] == ["yes", "no", "-", "yes", "no"]


def test_the_summary_counts_the_targets_and_names_those_below() -> None:
    assert report.summary(RECORDS) == (
        "2 of 4 targets hold; below: memory create x50, memory size 1M"
    )
    assert report.summary(RECORDS[:1]) == "1 of 1 targets hold"
    assert report.summary(RECORDS[2:3]) == "no targets among these records"


def test_the_json_file_is_the_list_of_records_with_every_key(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    report.write_json(RECORDS, path)
    saved = json.loads(path.read_text())
    assert saved == RECORDS
    for record in saved:
        assert set(record) >= {
            "name", "ops_per_s", "floor_name", "floor_ops_per_s", "ratio", "target", "holds",
        }  # fmt: skip
    assert set(saved[3]) >= {"value", "floor_value", "unit", "better"}


def test_only_takes_known_groups_in_run_order() -> None:
    assert runner.parse_only(None) == runner.GROUPS
    assert runner.parse_only("daemon, actor") == ("actor", "daemon")
    for bad in ("actor,nope", ",", ""):
        with pytest.raises(ValueError, match="--only takes groups from"):
            runner.parse_only(bad)


def _no_group_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(run: runner.Run) -> list[Record]:
        raise AssertionError("a benchmark group ran")

    monkeypatch.setattr(runner, "GROUP_RUNNERS", dict.fromkeys(runner.GROUPS, refuse))


def test_plot_without_matplotlib_says_how_to_install_it_before_measuring(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like
    with pytest.raises(plot.PlotUnavailable, match=r"pip install -e '\.\[plot\]'"):
        plot.require_matplotlib()
    _no_group_may_run(monkeypatch)
    assert runner.main(plot_path=tmp_path / "bench.png") == 2
    assert "pip install -e '.[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "bench.png").exists()


def test_an_unknown_group_is_an_error_before_measuring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_group_may_run(monkeypatch)
    assert runner.main(only="actors") == 2
    assert "--only takes groups from" in capsys.readouterr().err


def test_the_bench_command_line_passes_its_options_to_the_runner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = []
    monkeypatch.setattr(runner, "main", lambda *args: seen.append(args) or 0)
    assert runner.command_line(["--quick", "--only", "actor", "--json", "out.json"]) == 0
    assert seen == [("actor", True, Path("out.json"), None)]


def test_the_plot_draws_each_stores_latency_and_its_floors_by_concurrency() -> None:
    records = [
        throughput("memory create x1", 40_000.0, "channel request/reply x1", 100_000.0),
        throughput("memory create x50", 80_000.0, "channel request/reply x50", 400_000.0, 0.45),
        throughput("disk create x1", 5_000.0, "raw diskcache create", 20_000.0),
        throughput("disk create x50", 25_000.0, "raw diskcache create", 20_000.0, 1.0),
        throughput("disk create x50", 25_000.0, "Erlang DETS insert (median of 5)", 40_000.0),
        throughput("lmdb retrieve x4", 100_000.0, "raw lmdb retrieve", 400_000.0),
        throughput("daemon create c=50", 6.0, "redis SET c=50", 60.0, 0.5),  # not drawn
        throughput("ActorRef.call x1", 88.0, "channel request/reply x1", 90.0),  # nor this
    ]
    panels = plot.lines(records)
    assert panels["update"] == []
    drawn = {(line.label, line.floor): (line.colour, line.points) for line in panels["create"]}
    assert drawn == {
        # Latency: callers over the rate, in microseconds.
        ("memory", False): (0, {1: 25.0, 50: 625.0}),
        ("memory: channel request/reply", True): (0, {1: 10.0, 50: 125.0}),
        ("disk", False): (1, {1: 200.0, 50: 2000.0}),
        ("disk: raw diskcache create", True): (1, {None: 50.0}),  # one caller: drawn flat
    }
    (lmdb, floor) = panels["retrieve"]
    assert (lmdb.label, lmdb.points, floor.points) == ("lmdb", {4: 40.0}, {None: 2.5})
