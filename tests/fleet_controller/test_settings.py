"""Controller settings: file < environment < flags, and errors that name the source, key and fix."""

from __future__ import annotations

import argparse

import pytest

from fleet_controller import cli
from fleet_controller.settings import (
    SettingsError,
    env_overrides,
    load_settings,
    overrides_from_args,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["controller", *argv])


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("broker:\n  host: file-host\n  port: 1000\n  username: ctl\napi:\n  port: 9000\nretention:\n  heartbeats_per_node: 10\n")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    env = {"SHOPFLEET_CONTROLLER_BROKER__PORT": "2000", "SHOPFLEET_CONTROLLER_BROKER__PASSWORD": "envpw", "OTHER": "x"}
    s = load_settings(f, overrides_from_args(parse(["--broker", "flag-host:3000", "--mqtt-password-file", str(pw)])), environ=env)
    assert (s.broker.host, s.broker.port, s.broker.username, s.broker.password) == ("flag-host", 3000, "ctl", "s3cret")
    assert (s.api.port, s.retention.heartbeats_per_node) == (9000, 10)
    assert s.database_url() == f"sqlite:///{s.data_dir / 'controller.db'}"


def test_defaults_are_valid():
    s = load_settings(None, None, environ={})
    assert s.presence.stale_after_intervals == 2.5 and s.broker.client_id == "shopfleet-controller"
    assert s.intake.batch_max_messages == 500


@pytest.mark.parametrize(
    ("yaml_text", "env", "expected"),
    [
        pytest.param("brokr:\n  host: x\n", {}, ["brokr: Extra inputs are not permitted", "check its spelling"], id="typo-key"),
        pytest.param("broker:\n  port: 70000\n", {}, ["broker.port:", "fix the value"], id="port-range"),
        pytest.param("broker:\n  shared_group: fleet\n", {}, ["shared_group needs protocol: '5'"], id="shared-needs-v5"),
        pytest.param("broker:\n  shared_group: a/b\n  protocol: '5'\n", {}, ["broker.shared_group"], id="bad-group"),
        pytest.param("presence:\n  stale_after_intervals: 7\n  offline_after_intervals: 5\n", {}, ["offline_after_intervals must be larger"], id="presence-order"),
        pytest.param("", {"SHOPFLEET_CONTROLLER_API__PORT": "http"}, ["environment SHOPFLEET_CONTROLLER_*", "api.port"], id="env-bad-int"),
        pytest.param("- a\n- b\n", {}, ["must hold a mapping"], id="not-a-mapping"),
        pytest.param("broker: [\n", {}, ["not valid YAML"], id="bad-yaml"),
    ],
)
def test_bad_settings_name_file_key_and_fix(tmp_path, yaml_text, env, expected):
    f = tmp_path / "controller.yaml"
    f.write_text(yaml_text)
    with pytest.raises(SettingsError) as exc:
        load_settings(f, None, environ=env)
    msg = str(exc.value)
    assert str(f) in msg
    for part in expected:
        assert part in msg


def test_missing_file_and_bad_flags(tmp_path):
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(tmp_path / "nope.yaml", None, environ={})
    with pytest.raises(SettingsError, match="--broker 'localhost': use HOST:PORT"):
        overrides_from_args(parse(["--broker", "localhost"]))
    with pytest.raises(SettingsError, match="--mqtt-password-file"):
        overrides_from_args(parse(["--mqtt-password-file", str(tmp_path / "missing")]))


def test_shared_group_flag_selects_mqtt5():
    s = load_settings(None, overrides_from_args(parse(["--shared-group", "ctl"])), environ={})
    assert (s.broker.shared_group, s.broker.protocol) == ("ctl", "5")


def test_env_overrides_nesting():
    assert env_overrides({"SHOPFLEET_CONTROLLER_DB_URL": "sqlite://", "SHOPFLEET_CONTROLLER_INTAKE__BATCH_MAX_MESSAGES": "9"}) == {
        "db_url": "sqlite://", "intake": {"batch_max_messages": "9"}}


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--data-dir", "--db-url", "--broker", "--mqtt-username", "--mqtt-password-file", "--client-id",
                 "--shared-group", "--api", "--no-migrate"):
        assert flag in out


def test_cli_bad_config_exits_2(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("nonsense: 1\n")
    args = parse(["--config", str(f)])
    assert args.func(args) == 2
    assert "nonsense" in capsys.readouterr().err


def test_docs_list_every_setting_and_metric():
    """docs/controller.md names every settings key and every metric the controller exports."""
    from pathlib import Path

    from prometheus_client import CollectorRegistry
    from pydantic import BaseModel

    from fleet_controller.metrics import ControllerMetrics
    from fleet_controller.settings import ControllerSettings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "controller.md").read_text()

    def keys(cls, prefix=""):
        for name, f in cls.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                yield from keys(f.annotation, f"{prefix}{name}.")
            else:
                assert f.description, f"{prefix}{name} has no description"
                yield f"{prefix}{name}"

    for key in keys(ControllerSettings):
        assert f"| `{key}` |" in doc, key
    reg = CollectorRegistry()
    ControllerMetrics(reg).watch_presence(lambda: {})
    for metric in reg.collect():
        name = metric.name + ("_total" if metric.type == "counter" else "")
        assert f"`{name}`" in doc, name
