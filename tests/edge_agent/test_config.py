"""Agent config: YAML plus flag overrides, and errors that name file, key and fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_agent.cli import overrides_from_args
from edge_agent.config import ConfigError, load_config
from shopfleet.cli import build_parser

GOOD = """
shop: berlin-01
node: pi-2
node_class: pi
broker: {host: broker.example, port: 8883, username: berlin-01-pi-2, password: s3cret}
heartbeat_interval_s: 5
outbox: {path: /var/lib/shopfleet/outbox.db, max_messages: 1000}
metrics: {port: 9101}
pipelines:
  - type: process
    name: counter
    command: [/usr/local/bin/counter, --json]
    telemetry_interval_s: 30
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_good_file_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert (cfg.shop, cfg.node, cfg.node_class) == ("berlin-01", "pi-2", "pi")
    assert cfg.broker.secret() == "s3cret"
    assert "s3cret" not in repr(cfg)
    assert cfg.outbox.max_messages == 1000 and cfg.outbox.max_bytes == 64 * 1024 * 1024
    assert cfg.pipelines[0].type == "process" and cfg.pipelines[0].restart_budget == 5


def test_flags_override_file(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["agent", "--config", "x", "--node", "pi-3", "--broker-port", "1884", "--heartbeat-interval", "0.5", "--tls-insecure"]
    )
    cfg = load_config(write(tmp_path, GOOD), overrides_from_args(args))
    assert (cfg.node, cfg.broker.port, cfg.heartbeat_interval_s) == ("pi-3", 1884, 0.5)
    assert cfg.broker.tls is not None and cfg.broker.tls.insecure is True
    assert cfg.broker.host == "broker.example"  # untouched keys keep the file's value


def test_flags_alone_are_enough() -> None:
    cfg = load_config(None, {"shop": "s1", "node": "n1"})
    assert cfg.broker.port == 1883 and cfg.pipelines == []


def test_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    cfg = load_config(None, {"shop": "s", "node": "n", "broker.username": "u", "broker.password_file": str(pw)})
    assert cfg.broker.secret() == "from-file"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("shop: s1\nnode: n1\nheartbeat_intervall_s: 3\n", ["agent.yaml", "'heartbeat_intervall_s'", "remove it or correct its spelling"], id="typo-key"),
        pytest.param("node: n1\n", ["key 'shop'", "add it"], id="missing-shop"),
        pytest.param("shop: Berlin\nnode: n1\n", ["key 'shop'", "invalid shop id 'Berlin'", "lowercase"], id="bad-shop-id"),
        pytest.param("shop: s\nnode: n\nbroker: {port: 0}\n", ["key 'broker.port'", "greater than or equal to 1"], id="bad-port"),
        pytest.param("shop: s\nnode: n\nbroker: {password: x}\n", ["key 'broker'", "set broker.username"], id="password-without-user"),
        pytest.param("shop: s\nnode: n\nbroker: {tls: {cert_file: /nope.pem}}\n", ["key 'broker.tls'", "key_file go together"], id="tls-cert-without-key"),
        pytest.param("shop: s\nnode: n\nbroker: {tls: {ca_file: /nope/ca.pem}}\n", ["ca_file '/nope/ca.pem' does not exist"], id="tls-missing-file"),
        pytest.param("shop: s\nnode: n\npipelines: [{type: camera, name: c}]\n", ["key 'pipelines.0'", "set type to one of:", "process"], id="unknown-pipeline-type"),
        pytest.param("shop: s\nnode: n\npipelines: [{type: process, name: c}]\n", ["key 'pipelines.0.command'", "add it"], id="process-without-command"),
        pytest.param("shop: s\nnode: n\npipelines: [{type: process, name: c, command: [a], colour: red}]\n", ["key 'pipelines.0.colour'"], id="pipeline-extra-key"),
        pytest.param(
            "shop: s\nnode: n\npipelines: [{type: process, name: c, command: [a]}, {type: process, name: c, command: [b]}]\n",
            ["names ['c'] are used twice"],
            id="duplicate-pipeline-names",
        ),
        pytest.param("shop: s\nnode: n\nfacts_override: {archh: arm64}\n", ["facts_override has unknown keys ['archh']"], id="bad-facts-key"),
        pytest.param("shop: s\nnode: [\n", ["not valid YAML at line"], id="bad-yaml"),
        pytest.param("- shop\n", ["top level is a list"], id="not-a-mapping"),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path: Path, text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    for fragment in expected:
        assert fragment in message, message
    assert str(tmp_path / "agent.yaml") in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file.*--config"):
        load_config(tmp_path / "nope.yaml")


def test_check_config_exit_codes(tmp_path: Path) -> None:
    import subprocess

    good = subprocess.run(
        [sys.executable, "-m", "shopfleet", "agent", "--config", str(write(tmp_path, GOOD)), "--check-config"],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0 and "config OK: shop=berlin-01 node=pi-2" in good.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "shopfleet", "agent", "--shop", "s", "--node", "n", "--broker-port", "70000", "--check-config"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "key 'broker.port'" in bad.stderr


def test_help_explains_every_option() -> None:
    parser = build_parser()
    agent = parser._subparsers._group_actions[0].choices["agent"]
    for action in agent._actions:
        assert action.help, f"option {action.option_strings} has no help"


def test_loading_a_config_imports_only_the_pipeline_types_it_names(tmp_path: Path) -> None:
    import subprocess

    probe = (
        "import sys\n"
        "from edge_agent.config import load_config\n"
        f"load_config({str(write(tmp_path, GOOD))!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith('edge_agent.pipelines.') or m in ('vision', 'cv2', 'hardware')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['edge_agent.pipelines.process']"


def test_cli_refuses_a_corrupt_outbox_and_a_busy_metrics_port(tmp_path: Path) -> None:
    import socket
    import subprocess

    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not sqlite" * 200)
    base = [sys.executable, "-m", "shopfleet", "agent", "--shop", "s", "--node", "n", "--broker-port", "1"]
    out = subprocess.run([*base, "--outbox", str(corrupt)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot be opened" in out.stderr and "move the file away" in out.stderr
    assert corrupt.read_bytes().startswith(b"not sqlite"), "the agent never deletes an outbox"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [*base, "--outbox", str(tmp_path / "o.db"), "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr and "metrics.port" in out.stderr


@pytest.mark.parametrize("apply_enabled", [False, True], ids=["apply-disabled", "apply-enabled"])
def test_cryptography_is_loaded_only_by_an_agent_that_applies(tmp_path: Path, apply_enabled: bool) -> None:
    import subprocess

    from fleet_controller.rollout.signing import generate_keypair

    generate_keypair(tmp_path / "k.pem")
    apply = {"enabled": apply_enabled, "public_keys": [str(tmp_path / "k.pub")], "state_path": str(tmp_path / "applied.json")}
    probe = (
        "import sys\n"
        "from edge_agent.agent import Agent\n"
        "from edge_agent.apply.plugin import attach\n"
        "import edge_agent.cli\n"
        "from edge_agent.config import validate_config\n"
        f"config = validate_config({{'shop': 's', 'node': 'n', 'outbox': {{'path': {str(tmp_path / 'o.db')!r}}}, 'apply': {apply!r}}})\n"
        "agent = Agent(config)\n"
        "attach(agent, config.apply, client=object() if config.apply.enabled else None)\n"
        "print('cryptography' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(apply_enabled)


def test_metrics_bind_the_address_host_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_IP", "10.1.2.3")
    cfg = load_config(None, {"shop": "s1", "node": "n1", "metrics.port": 9464, "metrics.host_env": "NODE_IP"})
    assert cfg.metrics.bind_host == "10.1.2.3"
    assert load_config(None, {"shop": "s1", "node": "n1"}).metrics.bind_host == "127.0.0.1"


def test_metrics_host_env_unset_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_IP", raising=False)
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"shop": "s1", "node": "n1", "metrics.port": 9464, "metrics.host_env": "NODE_IP"})
    assert "NODE_IP" in str(exc.value) and "status.hostIP" in str(exc.value)
