"""The daemon's settings: defaults, TOML file, SESSIOND_* environment, flags, in that order."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.cli.config import ConfigError, Settings, load_settings
from workers.wire.address import DEFAULT_PORT, Address


def test_defaults_need_no_configuration() -> None:
    s = load_settings(env={})
    assert (s.backend, s.path, s.host, s.port, s.unix, s.token) == (
        "disk", "./data", "127.0.0.1", DEFAULT_PORT, None, None
    )  # fmt: skip
    assert s.addresses() == [Address("tcp", host="127.0.0.1", port=7878)]


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "sessiond.toml"
    config.write_text('backend = "ets"\nport = 7000\nhost = "localhost"\ndefault_ttl = 5\n')
    s = load_settings(config, env={})
    assert (s.backend, s.port, s.host, s.default_ttl) == ("memory", 7000, "localhost", 5.0)
    env = {"SESSIOND_PORT": "7100", "SESSIOND_DEFAULT_TTL": "none", "OTHER_PORT": "1"}
    s = load_settings(config, env=env)
    assert (s.port, s.default_ttl) == (7100, None)
    s = load_settings(config, env=env, overrides={"port": 7200, "host": None})
    assert (s.port, s.host) == (7200, "localhost")


def test_environment_values_are_parsed_by_type(tmp_path: Path) -> None:
    s = load_settings(
        env={
            "SESSIOND_TCP": "off",
            "SESSIOND_UNIX": "relative.sock",
            "SESSIOND_MAX_SESSIONS": "10",
            "SESSIOND_TOKEN": "abc",
            "SESSIOND_LOG_LEVEL": "debug",
        }
    )
    assert s.tcp is False
    assert s.unix is not None and s.unix.endswith("/relative.sock") and s.unix.startswith("/")
    assert (s.max_sessions, s.token, s.log_level) == (10, "abc", "DEBUG")
    assert "abc" not in repr(s)  # the token never reaches a log line through repr


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"SESSIOND_PORTT": "1"}, "unknown setting 'portt'"),
        ({"SESSIOND_PORT": "seven"}, "port is int"),
        ({"SESSIOND_TCP": "maybe"}, "tcp is bool"),
        ({"SESSIOND_BACKEND": "floppy"}, "unknown backend"),
        ({"SESSIOND_TCP": "0"}, "nothing to listen on"),
        ({"SESSIOND_HOST": "0.0.0.0"}, "requires a token"),
        ({"SESSIOND_LOG_FORMAT": "xml"}, "log_format"),
        ({"SESSIOND_MAX_IN_FLIGHT": "0"}, "max_in_flight"),
    ],
)
def test_bad_settings_name_the_setting(source: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=source)


def test_bad_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("port = [\n")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(config, env={})
    config.write_text('port = "7878"\n')
    with pytest.raises(ConfigError, match=r"config file .*: port is int"):
        load_settings(config, env={})


def test_off_loopback_with_a_token_is_fine() -> None:
    s = load_settings(env={"SESSIOND_HOST": "0.0.0.0", "SESSIOND_TOKEN": "t"})
    assert not s.addresses()[0].is_local


def test_service_options_pass_store_options_only_when_set() -> None:
    assert "durability" not in Settings().service_options()
    s = load_settings(env={}, overrides={"durability": "power", "path": "/tmp/x"})
    assert s.service_options()["durability"] == "power"
    assert s.service_options()["path"] == "/tmp/x"


def test_the_redis_key_prefix_reaches_the_store() -> None:
    assert "prefix" not in Settings(backend="redis").service_options()
    s = load_settings(env={"SESSIOND_BACKEND": "redis", "SESSIOND_PREFIX": "{app1}:"})
    assert s.service_options()["prefix"] == "{app1}:"
    assert "prefix" not in load_settings(env={"SESSIOND_PREFIX": "x:"}).service_options()


def test_fault_injection_is_off_unless_asked_for() -> None:
    assert Settings().allow_fault_injection is False
    assert load_settings(env={}).allow_fault_injection is False
    s = load_settings(env={"SESSIOND_ALLOW_FAULT_INJECTION": "yes"})
    assert s.allow_fault_injection is True


def test_the_restart_budget_reaches_the_service() -> None:
    options = Settings().service_options()
    assert (options["intensity"], options["period"]) == (5, 10.0)
    s = load_settings(env={}, overrides={"restart_intensity": 50, "restart_period": 2.0})
    assert (s.service_options()["intensity"], s.service_options()["period"]) == (50, 2.0)
    with pytest.raises(ConfigError, match="restart_period"):
        load_settings(env={}, overrides={"restart_period": 0.0})


def test_the_guards_reach_the_server_limits() -> None:
    limits = Settings().server_limits()
    assert (limits.max_unauthenticated, limits.auth_timeout, limits.max_auth_failures) == (
        128,
        5.0,
        10,
    )
    s = load_settings(
        env={"SESSIOND_MAX_UNAUTHENTICATED": "16", "SESSIOND_MESSAGE_TIMEOUT": "2.5"},
        overrides={"max_buffered_bytes": 2**24, "max_auth_failures": 3, "auth_timeout": 1.0},
    )
    limits = s.server_limits()
    assert (limits.max_unauthenticated, limits.message_timeout) == (16, 2.5)
    assert (limits.max_buffered_bytes, limits.max_auth_failures, limits.auth_timeout) == (
        2**24,
        3,
        1.0,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_unauthenticated": 0}, "max_unauthenticated is a positive integer"),
        ({"message_timeout": 0.0}, "message_timeout is a number of seconds above 0"),
        ({"max_buffered_bytes": 2**22}, "must hold one message in progress"),
        ({"max_message_size": 10}, r"too small for an auth request \(16 bytes"),
        ({"max_message_size": 200, "token": "t" * 200}, r"too small for an auth request \(21"),
        ({"token": "t" * 4001}, "the token is 4001 bytes long; at most 4000"),
        ({"token": " "}, "the token is empty"),
    ],
)
def test_limits_that_cannot_work_are_refused_at_start(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env={}, overrides=overrides)


def test_the_token_comes_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret-token\n")
    s = load_settings(env={"SESSIOND_TOKEN_FILE": str(token_file)})
    assert s.token == "s3cret-token"
    config = tmp_path / "sessiond.toml"
    config.write_text(f'token_file = "{token_file}"\nhost = "0.0.0.0"\n')
    assert load_settings(config, env={}).token == "s3cret-token"
    with pytest.raises(ConfigError, match="both token and token_file"):
        load_settings(config, env={"SESSIOND_TOKEN": "other"})
    with pytest.raises(ConfigError, match="cannot read the token file"):
        load_settings(env={}, overrides={"token_file": str(tmp_path / "missing")})
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(env={"SESSIOND_TOKEN_FILE": str(token_file)})


@pytest.mark.parametrize("value", ["", "none", "None", "  "])
def test_an_empty_token_in_the_environment_is_an_error_not_auth_off(value: str) -> None:
    with pytest.raises(ConfigError, match="SESSIOND_TOKEN is set but empty"):
        load_settings(env={"SESSIOND_TOKEN": value})


def test_a_wrongly_typed_token_is_never_shown(tmp_path: Path) -> None:
    config = tmp_path / "sessiond.toml"
    for value in ("9137544221", '["s3cret-9137544221"]', '{ s3cret = "9137544221" }'):
        config.write_text(f"token = {value}\n")
        with pytest.raises(ConfigError, match="token is str or none, got a ") as failure:
            load_settings(config, env={})
        assert "9137544221" not in str(failure.value)


def test_help_prefers_the_token_file(capsys: pytest.CaptureFixture[str]) -> None:
    from workers.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--token-file PATH file holding the shared secret" in text
    assert "preferred to --token, as is SESSIOND_TOKEN" in text
    assert "visible to every local user in ps" in text


def test_a_token_file_others_can_read_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.cli.serve import warn_about_loose_token_file

    token_file = tmp_path / "token"
    token_file.write_text("t\n")
    token_file.chmod(0o600)
    warn_about_loose_token_file(str(token_file))
    assert not caplog.records
    token_file.chmod(0o644)
    warn_about_loose_token_file(str(token_file))
    assert "has mode 0644: other users may read it" in caplog.text
