"""The seed's own disk store, Erlang DETS, as a floor: sequential inserts from one process.

The session persistence this project grew from kept sessions in DETS. ``dets_insert.escript``
inserts session maps one at a time into a fresh DETS file and syncs it at the end; this module
runs it :data:`RUNS` times and takes the median (from run to run DETS swings a lot: a run may
give a fifth of another's rate). It needs ``escript`` (Erlang/OTP); without it the floor is
None and the records that need it are left out, with a note.

    python -m bench.dets [--inserts N]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.records import Record, throughput
from bench.report import count_command_line

SCRIPT = Path(__file__).with_name("dets_insert.escript")
RUNS = 5
#: The name of this floor in the records.
FLOOR = "Erlang DETS insert (median of 5)"


def escript() -> str | None:
    """The ``escript`` program, or None when Erlang is not installed."""
    return shutil.which("escript")


def insert_rate(inserts: int = 20_000, runs: int = RUNS) -> float | None:
    """The median rate of ``runs`` runs of the DETS benchmark; None without Erlang."""
    program = escript()
    if program is None:
        print("note: no escript (Erlang) on PATH; leaving out the DETS floor", file=sys.stderr)
        return None
    rates = []
    with tempfile.TemporaryDirectory(prefix="bench-dets-") as workdir:
        for _ in range(runs):
            done = subprocess.run(
                [program, str(SCRIPT), str(inserts), workdir],
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            )
            rates.append(float(done.stdout.split()[-1]))
    return statistics.median(rates)


def run(inserts: int = 20_000) -> list[Record]:
    """The DETS floor on its own, as a record next to itself (for ``python -m bench.dets``)."""
    rate = insert_rate(inserts)
    return [] if rate is None else [throughput(FLOOR, rate, FLOOR, rate)]


def main() -> None:
    count_command_line(__doc__, run, "--inserts", 20_000, "inserts per run")


if __name__ == "__main__":
    main()
