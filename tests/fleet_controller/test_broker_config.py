"""broker-config: hashes a real Mosquitto accepts, and shop isolation enforced by that Mosquitto."""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import stat
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol import Topics
from fleet_controller import cli
from fleet_controller.broker_config import (
    BrokerConfigError,
    hash_password,
    parse_node_lines,
    render_acl,
    verify_password,
    write_broker_config,
)
from shopfleet.broker import BrokerProcess
from tests.support.wait import wait_for

PAIRS = [("shop-a", "pi-1"), ("shop-a", "pi-2"), ("shop-b", "pi-1")]


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        pytest.param(["shop-a/pi-1", "# comment", "", "shop-b/pi-1  # trailing"], None, id="ok"),
        pytest.param(["shop-a pi-1"], "line-1: 'shop-a pi-1' is not 'shop/node'", id="no-slash"),
        pytest.param(["ok/fine", "Shop_A/pi-1"], "line-2: invalid shop id 'Shop_A'", id="bad-shop"),
        pytest.param(["shop-a/pi.1"], "line-1: invalid node id 'pi.1'", id="dot-in-node"),
    ],
)
def test_parse_node_lines(lines, error):
    if error is None:
        assert parse_node_lines(lines, "line") == [("shop-a", "pi-1"), ("shop-b", "pi-1")]
    else:
        with pytest.raises(BrokerConfigError) as exc:
            parse_node_lines(lines, "line")
        assert error in str(exc.value).replace(":", "-", 1)


@given(st.text(max_size=40), st.binary(min_size=12, max_size=12))
def test_hash_roundtrip(password, salt):
    h = hash_password(password, salt)
    assert h.startswith("$7$101$") and verify_password(password, h)
    assert not verify_password(password + "x", h)


def test_acl_lines_of_a_node():
    acl = render_acl([("shop-a", "pi-1")])
    block = acl.split("user shop-a.pi-1\n")[1].splitlines()
    assert block == [
        "topic write fleet/v1/shop-a/pi-1/presence",
        "topic write fleet/v1/shop-a/pi-1/telemetry",
        "topic write fleet/v1/shop-a/pi-1/events",
        "topic write fleet/v1/shop-a/pi-1/replies",
        "topic write fleet/v1/shop-a/pi-1/state",
        "topic read fleet/v1/shop-a/pi-1/commands",
        "topic read fleet/v1/shop-a/pi-1/ack",
        "topic read fleet/v1/shop-a/state/desired",
        "topic read fleet/v1/_controller/presence",
        "topic read fleet/v1/_controller/clock",
    ]
    with pytest.raises(BrokerConfigError, match="no '.'"):
        render_acl([], controller_user="ctl.x")


def test_cli_writes_files_and_keeps_passwords(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("shop-a/pi-1\n")
    args = parser.parse_args(["broker-config", "--nodes", str(nodes), "--shop", "shop-b", "--node", "pi-1", "--node", "gpu-1", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert "3 nodes" in capsys.readouterr().out
    creds_path = tmp_path / "out" / "credentials.json"
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out" / "passwd").stat().st_mode) == 0o600
    creds = json.loads(creds_path.read_text())
    assert set(creds["nodes"]) == {"shop-a/pi-1", "shop-b/pi-1", "shop-b/gpu-1"}
    again = write_broker_config([("shop-a", "pi-1"), ("shop-c", "pi-1")], tmp_path / "out")
    assert again.generated == 1  # only shop-c/pi-1 is new
    assert json.loads(creds_path.read_text())["nodes"]["shop-a/pi-1"] == creds["nodes"]["shop-a/pi-1"]
    with pytest.raises(SystemExit):
        parser.parse_args(["broker-config", "--node", "pi-1", "--out", str(tmp_path)])
    bad = parser.parse_args(["broker-config", "--out", str(tmp_path / "o2")])
    assert bad.func(bad) == 2 and "no nodes given" in capsys.readouterr().err


def test_mosquitto_passwd_and_our_hash_agree(tmp_path):
    """Our file format is what mosquitto_passwd writes (same scheme, iterations and field sizes)."""
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "u", "secret"], check=True, capture_output=True)
    theirs = f.read_text().strip().split(":", 1)[1]
    assert verify_password("secret", theirs)
    ours = hash_password("secret")
    assert [len(p) for p in ours.split("$")] == [len(p) for p in theirs.split("$")]


# ----- isolation on a real Mosquitto ----------------------------------------------------------


@pytest.fixture
def secured(tmp_path):
    files = write_broker_config(PAIRS, tmp_path / "cfg")
    creds = json.loads(files.credentials_file.read_text())
    (tmp_path / "broker").mkdir()
    b = BrokerProcess(workdir=tmp_path / "broker", engine="mosquitto", password_file=files.password_file, acl_file=files.acl_file)
    b.start()
    yield b, creds
    b.cleanup()


class Client:
    """A paho client that records what it receives, for asserting delivery and non-delivery."""

    def __init__(self, broker: BrokerProcess, username: str, password: str) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.rc: list = []
        self.subacks: list = []
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
        self.c.username_pw_set(username, password)
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, m.payload))
        self.c.on_connect = lambda c, u, f, rc, p: self.rc.append(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.append(rcs)
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        wait_for(lambda: self.rc, what=f"CONNACK for {username}")

    def subscribe(self, topic: str) -> None:
        n = len(self.subacks)
        self.c.subscribe(topic, qos=1)
        wait_for(lambda: len(self.subacks) > n, what=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def received(self, marker_topic: str) -> list[tuple[str, bytes]]:
        """Return everything received up to and including the marker message (which always arrives)."""
        out = []
        while True:
            item = self.got.get(timeout=10)
            out.append(item)
            if item[0] == marker_topic:
                return out

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_wrong_password_is_refused(secured):
    broker, creds = secured
    c = Client(broker, creds["nodes"]["shop-a/pi-1"]["username"], "wrong")
    assert c.rc[0].is_failure
    c.close()


def test_node_cannot_publish_into_another_shop(secured):
    broker, creds = secured
    ctl = Client(broker, creds["controller"]["username"], creds["controller"]["password"])
    ctl.subscribe("fleet/v1/#")
    a = creds["nodes"]["shop-a/pi-1"]
    node_a = Client(broker, a["username"], a["password"])
    forbidden = [
        Topics.node("shop-b", "pi-1", "telemetry"),
        Topics.node("shop-b", "pi-1", "presence"),
        Topics.reported("shop-b", "pi-1"),
        Topics.reported("shop-a", "pi-2"),  # a sibling's reported state: one node never speaks for another
        "fleet/v1/shop-a/state/reported",  # the old shop-wide topic
        Topics.desired("shop-a"),  # not even its own shop's desired state
        Topics.node("shop-a", "pi-2", "telemetry"),  # nor a sibling node's topics
        Topics.node("shop-a", "pi-1", "commands"),  # nor commands to itself
        Topics.controller_clock,
    ]
    for t in forbidden:
        node_a.publish(t, b"forged")
    marker = Topics.node("shop-a", "pi-1", "telemetry")
    node_a.publish(Topics.reported("shop-a", "pi-1"), b"own-report")
    node_a.publish(marker, b"own")
    got = ctl.received(marker)
    assert got == [(Topics.reported("shop-a", "pi-1"), b"own-report"), (marker, b"own")]
    node_a.close()
    ctl.close()


def test_node_cannot_read_another_shops_desired_state(secured):
    broker, creds = secured
    a, b = creds["nodes"]["shop-a/pi-1"], creds["nodes"]["shop-b/pi-1"]
    node_a = Client(broker, a["username"], a["password"])
    node_b = Client(broker, b["username"], b["password"])
    node_a.subscribe("fleet/v1/shop-b/state/desired")
    node_a.subscribe("fleet/v1/shop-b/pi-1/commands")
    node_a.subscribe("fleet/v1/+/state/desired")  # a wildcard must not leak shop-b either
    node_a.subscribe(Topics.controller_clock)
    node_b.subscribe(Topics.desired("shop-b"))
    ctl = Client(broker, creds["controller"]["username"], creds["controller"]["password"])
    ctl.publish(Topics.desired("shop-b"), b"desired-b")
    ctl.publish(Topics.node("shop-b", "pi-1", "commands"), b"cmd-b")
    ctl.publish(Topics.desired("shop-a"), b"desired-a")
    ctl.publish(Topics.controller_clock, b"tick")
    assert node_b.received(Topics.desired("shop-b")) == [(Topics.desired("shop-b"), b"desired-b")]
    got = node_a.received(Topics.controller_clock)
    assert got == [(Topics.desired("shop-a"), b"desired-a"), (Topics.controller_clock, b"tick")]
    for c in (node_a, node_b, ctl):
        c.close()


# ----- identity binding, TLS, zero-loss sizing, ownership, shop brokers -----------------------
# (tests/security/ runs these generated files on real Mosquitto.)


def _conf_lines(path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


def test_every_listener_binds_client_id_to_username_and_tls_requires_a_certificate(tmp_path):
    from fleet_controller.broker_config import BrokerOptions
    from fleet_controller.pki import Pki

    Pki.init(tmp_path / "pki")
    opts = BrokerOptions(pki_dir=tmp_path / "pki", server_names=("mqtt.example",), persistence_dir=tmp_path / "data")
    files = write_broker_config(PAIRS, tmp_path / "out", options=opts)
    lines = _conf_lines(files.conf_file)
    listeners = [i for i, ln in enumerate(lines) if ln.startswith("listener ")]
    assert [lines[i] for i in listeners] == ["listener 1883", "listener 8883"]
    for start, end in zip(listeners, [*listeners[1:], len(lines)], strict=True):
        assert "use_username_as_clientid true" in lines[start:end]
    tls = lines[listeners[1]:]
    for want in ("require_certificate true", "use_identity_as_username true", f"crlfile {(tmp_path / 'pki' / 'crl.pem').resolve()}",
                 f"keyfile {(tmp_path / 'pki' / 'certs' / 'mqtt.example.key').resolve()}"):
        assert want in tls
    assert "allow_anonymous false" in lines and "queue_qos0_messages false" in lines and "persistence true" in lines
    assert files.certificates_issued == 1 + 1 + len(PAIRS)  # server, controller, nodes
    assert write_broker_config(PAIRS, tmp_path / "out", options=opts).certificates_issued == 0  # kept


def test_port_zero_drops_the_password_listener(tmp_path):
    from fleet_controller.broker_config import BrokerOptions

    files = write_broker_config(PAIRS, tmp_path / "out", options=BrokerOptions(port=0, persistence_dir=tmp_path / "d"))
    assert not [ln for ln in _conf_lines(files.conf_file) if ln.startswith("listener")]


@pytest.mark.parametrize(
    ("nodes", "rate", "outage", "size", "messages"),
    [(3, 1.0, 3600, 1024, 10800), (1000, 0.5, 1800, 800, 900_000), (2, 0.1, 10, 1024, 1000)],  # last: Mosquitto's floor
)
def test_queue_sized_from_the_fleet(nodes, rate, outage, size, messages):
    from fleet_controller.broker_config import QueueSizing

    s = QueueSizing(nodes, rate, outage, size)
    assert s.messages == messages and s.bytes == messages * size


def test_sizing_and_packet_limits_are_written(tmp_path):
    from edge_agent.protocol import MAX_PAYLOAD_BYTES
    from fleet_controller.broker_config import BrokerOptions

    opts = BrokerOptions(rate_per_node=2, outage_s=600, message_bytes=500, persistence_dir=tmp_path / "d", autosave_interval=5)
    lines = _conf_lines(write_broker_config(PAIRS, tmp_path / "out", options=opts).conf_file)
    assert {"max_queued_messages 3600", "max_queued_bytes 1800000", "autosave_interval 5",
            f"persistence_location {tmp_path / 'd'}/", f"max_packet_size {MAX_PAYLOAD_BYTES + 4096}"} <= set(lines)
    assert (tmp_path / "d").is_dir()


def test_controller_users_are_unguessable_kept_and_one_per_replica(tmp_path):
    from fleet_controller.broker_config import BrokerOptions

    first = write_broker_config(PAIRS, tmp_path / "out", options=BrokerOptions(controller_replicas=2, persistence_dir=tmp_path / "d"))
    assert len(first.controllers) == 2 and len(set(first.controllers)) == 2
    assert all(u.startswith("controller-") and len(u) == len("controller-") + 12 for u in first.controllers)
    again = write_broker_config(PAIRS, tmp_path / "out", options=BrokerOptions(controller_replicas=2, persistence_dir=tmp_path / "d"))
    assert again.controllers == first.controllers and again.generated == 0
    creds = json.loads(again.credentials_file.read_text())
    assert creds["controller"]["username"] == first.controllers[0]
    assert [c["username"] for c in creds["controllers"]] == list(first.controllers)
    acl = again.acl_file.read_text()
    for user in first.controllers:
        assert f"user {user}\ntopic readwrite fleet/v1/#" in acl


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"shop_brokers": ("shop-a",)}, "needs --central"),
        ({"shop_brokers": ("shop-z",), "central": "c:8883"}, "no node of that shop"),
        ({"shop_brokers": ("shop-a",), "central": "c:8883"}, "needs --pki"),
        ({"owner": "no-such-user-h8"}, "no such user"),
        ({"max_packet_size": 1000}, "below what the protocol allows"),
        ({"outage_s": 0}, "positive numbers"),
        ({"controller_users": ("a.b",)}, "no '.'"),
        ({"shop_brokers": ("shop-a",), "central": "c:8883", "pki_dir": "/nonexistent", "shop_port": 0, "shop_tls_port": 0},
         "needs a listener for its nodes"),
        ({"shop_brokers": ("shop-a",), "central": "c:8883", "pki_dir": "/nonexistent", "shop_port": 8883}, "different ports"),
        ({"denial_log": "/var/log/my log"}, "without blanks"),
    ],
)
def test_bad_options_name_the_fix_and_write_nothing(tmp_path, kwargs, error):
    from fleet_controller.broker_config import BrokerOptions

    with pytest.raises(BrokerConfigError, match=error):
        write_broker_config(PAIRS, tmp_path / "out", options=BrokerOptions(persistence_dir=tmp_path / "d", **kwargs))
    assert not (tmp_path / "out" / "credentials.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owner_makes_the_broker_files_readable_by_mosquitto_and_keeps_credentials_private(tmp_path):
    import pwd

    from fleet_controller.broker_config import BrokerOptions
    from fleet_controller.pki import Pki

    uid = pwd.getpwnam("mosquitto").pw_uid
    Pki.init(tmp_path / "pki")
    opts = BrokerOptions(owner="mosquitto", pki_dir=tmp_path / "pki", server_names=("localhost",), persistence_dir=tmp_path / "d")
    files = write_broker_config(PAIRS, tmp_path / "out", options=opts)
    for p in (files.password_file, files.acl_file, files.conf_file, tmp_path / "d", tmp_path / "pki" / "certs" / "localhost.key"):
        assert p.stat().st_uid == uid, p
    assert files.credentials_file.stat().st_uid == 0 and stat.S_IMODE(files.credentials_file.stat().st_mode) == 0o600
    assert (tmp_path / "pki" / "private" / "ca.key").stat().st_uid == 0


def test_shop_broker_files(tmp_path):
    from fleet_controller.broker_config import BrokerOptions
    from fleet_controller.pki import Pki

    Pki.init(tmp_path / "pki")
    opts = BrokerOptions(pki_dir=tmp_path / "pki", persistence_dir=tmp_path / "d", shop_brokers=("shop-a",), central="mqtt.example",
                         shop_install_dir="/etc/shopfleet/{shop}")
    files = write_broker_config(PAIRS, tmp_path / "out", options=opts)
    d = files.shop_dirs["shop-a"]
    lines = _conf_lines(d / "mosquitto.conf")
    assert "address mqtt.example:8883" in lines and "bridge_certfile /etc/shopfleet/shop-a/bridge.crt" in lines
    assert "allow_anonymous false" in lines and "use_username_as_clientid true" in lines and "max_queued_messages 7200" in lines
    topics = [ln for ln in lines if ln.startswith("topic ")]
    assert topics and all("shop-a/" in t or "_controller/" in t for t in topics)
    assert "topic fleet/v1/shop-a/state/desired in 1" in topics and "topic fleet/v1/shop-a/pi-2/telemetry out 1" in topics
    assert [ln.split(":")[0] for ln in (d / "passwd").read_text().splitlines()] == ["shop-a.pi-1", "shop-a.pi-2"]
    assert "fleet/v1/shop-b" not in (d / "acl").read_text() and "user shop-b" not in (d / "acl").read_text()
    assert stat.S_IMODE((d / "bridge.key").stat().st_mode) == 0o600
    central_acl = files.acl_file.read_text().split("user shop-a._bridge\n")[1].split("\n\n")[0]
    assert "fleet/v1/shop-b" not in central_acl and "topic write fleet/v1/shop-a/pi-1/telemetry" in central_acl


def test_shop_broker_tls_listener_and_its_files(tmp_path):
    from cryptography import x509

    from fleet_controller.broker_config import BrokerOptions
    from fleet_controller.pki import Pki

    Pki.init(tmp_path / "pki")
    opts = BrokerOptions(pki_dir=tmp_path / "pki", persistence_dir=tmp_path / "d", shop_brokers=("all",), central="mqtt.example",
                         shop_install_dir="/etc/shopfleet/{shop}", shop_port=0, shop_tls_port=8884,
                         shop_denial_log="/var/log/{shop}.log")
    files = write_broker_config(PAIRS, tmp_path / "out", options=opts)
    d = files.shop_dirs["shop-a"]
    text = (d / "mosquitto.conf").read_text()
    listener = text.split("listener 8884\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert listener == [
        "cafile /etc/shopfleet/shop-a/ca.crt", "certfile /etc/shopfleet/shop-a/server.crt", "keyfile /etc/shopfleet/shop-a/server.key",
        "crlfile /etc/shopfleet/shop-a/crl.pem", "require_certificate true", "use_identity_as_username true",
        "use_username_as_clientid true", "tls_version tlsv1.2",
    ]
    assert text.count("\nlistener ") == 1  # --shop-port 0: no password listener
    assert "log_dest file /var/log/shop-a.log" in text and "log_type debug" in text
    assert stat.S_IMODE((d / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "server.crt").stat().st_mode) == 0o644
    # Each shop's broker has its own server certificate (a stolen shop-a key does not pass as shop-b's broker).
    certs = {shop: x509.load_pem_x509_certificate((files.shop_dirs[shop] / "server.crt").read_bytes()) for shop in ("shop-a", "shop-b")}
    assert certs["shop-a"].serial_number != certs["shop-b"].serial_number
    cn = certs["shop-b"].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "shop-broker.shop-b.shopfleet"
    sans = certs["shop-b"].extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "shop-broker.shopfleet.svc.cluster.local" in sans
    # The central broker logs at its default levels unless asked.
    assert "log_type" not in files.conf_file.read_text()


def test_cli_shop_and_denial_options(tmp_path, capsys):
    from fleet_controller.pki import Pki

    Pki.init(tmp_path / "pki")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["broker-config", "--shop", "shop-a", "--node", "pi-1", "--out", str(tmp_path / "out"), "--pki", str(tmp_path / "pki"),
                              "--persistence-dir", str(tmp_path / "d"), "--shop-broker", "shop-a", "--central", "c.example",
                              "--shop-tls-port", "9883", "--shop-server-name", "broker.{shop}.lan", "--denial-log", str(tmp_path / "b.log")])
    assert args.func(args) == 0
    assert "nodes: TLS port 9883 (client certificate)" in capsys.readouterr().out
    assert (tmp_path / "pki" / "certs" / "broker.shop-a.lan.crt").exists()
    assert f"log_dest file {tmp_path / 'b.log'}" in (tmp_path / "out" / "mosquitto.conf").read_text()
    assert (tmp_path / "b.log").exists()


def test_inflight_window_is_written_and_refused_out_of_range(tmp_path):
    from fleet_controller.broker_config import DEFAULT_MAX_INFLIGHT, BrokerOptions

    lines = _conf_lines(write_broker_config(PAIRS, tmp_path / "out", options=BrokerOptions(persistence_dir=tmp_path / "d")).conf_file)
    assert DEFAULT_MAX_INFLIGHT == 1000 and "max_inflight_messages 1000" in lines
    lines = _conf_lines(write_broker_config(PAIRS, tmp_path / "o0", options=BrokerOptions(max_inflight=0, persistence_dir=tmp_path / "d")).conf_file)
    assert "max_inflight_messages 0" in lines
    for bad in (-1, 65536):
        with pytest.raises(BrokerConfigError, match=r"--max-inflight .*use 1\.\.65535"):
            write_broker_config(PAIRS, tmp_path / "bad", options=BrokerOptions(max_inflight=bad, persistence_dir=tmp_path / "d"))
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["broker-config", "--shop", "shop-a", "--node", "pi-1", "--out", str(tmp_path / "cli"),
                              "--persistence-dir", str(tmp_path / "d"), "--max-inflight", "250"])
    assert args.func(args) == 0
    assert "max_inflight_messages 250" in _conf_lines(tmp_path / "cli" / "mosquitto.conf")


@pytest.mark.skipif(not shutil.which("mosquitto"), reason="needs mosquitto")
def test_mosquitto_started_with_the_generated_config_holds_the_inflight_window():
    """A backlog reaches the controller ``--max-inflight`` unacknowledged messages at a time, not Mosquitto's 20.

    Exactly the window arrives before the controller's first acknowledgement. (Mosquitto 2.0.11 was
    seen sending the rest of a 100-message backlog at once after the first window's acks: more in
    flight, never fewer, so only the first window is asserted.)
    """
    from fleet_controller.broker_config import BrokerOptions
    from shopfleet.broker import free_port
    from tests.support.security import GeneratedBroker, broker_owner

    window, total = 37, 100
    deploy = Path(tempfile.mkdtemp(prefix="shopfleet-inflight-", dir="/tmp"))
    deploy.chmod(0o755)  # the mosquitto user must traverse it
    port = free_port()
    files = write_broker_config(PAIRS, deploy / "broker", options=BrokerOptions(
        port=port, bind="127.0.0.1", max_inflight=window, persistence_dir=deploy / "data", owner=broker_owner()))
    broker = GeneratedBroker(files.conf_file, [port], deploy).start()
    creds = json.loads(files.credentials_file.read_text())
    ctl_user = creds["controller"]
    got: list[tuple[paho.MQTTMessage, int]] = []  # each message with the acks sent before it arrived
    acks = [0]
    lock = threading.Lock()

    def on_message(c, u, m):
        with lock:
            got.append((m, acks[0]))

    def controller() -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=ctl_user["username"], clean_session=False, manual_ack=True)
        c.username_pw_set(ctl_user["username"], ctl_user["password"])
        c.on_message = on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        return c

    try:
        c = controller()
        wait_for(lambda: c.is_connected(), what="controller connected")
        subacks: list = []
        c.on_subscribe = lambda *a: subacks.append(a)
        c.subscribe("fleet/v1/+/+/events", qos=1)
        wait_for(lambda: subacks, what="SUBACK")
        a = creds["nodes"]["shop-a/pi-1"]
        node = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=a["username"])
        node.username_pw_set(a["username"], a["password"])
        node.connect("127.0.0.1", port)
        node.loop_start()
        for i in range(total):  # a node's backlog (its outbox after an outage) while the controller does not ack yet
            node.publish(Topics.node("shop-a", "pi-1", "events"), f"{i}".encode(), qos=1).wait_for_publish(5)
        node.disconnect()
        node.loop_stop()
        wait_for(lambda: len(got) >= window, 15, f"the first {window} messages (the window) delivered")
        while True:  # acknowledge everything as it comes, until the whole backlog arrived
            with lock:
                todo = [m for m, _ in got[acks[0]:]]
                acks[0] += len(todo)
            for m in todo:
                c.ack(m.mid, m.qos)
            if acks[0] >= total:
                break
            wait_for(lambda: len(got) > acks[0], 15, f"more than {acks[0]} of {total} messages delivered")
        assert [m.payload for m, _ in got] == [f"{i}".encode() for i in range(total)]
        before_any_ack = [i for i, (_, n) in enumerate(got) if n == 0]
        assert before_any_ack == list(range(window)), f"{len(before_any_ack)} delivered before the first ack, the window is {window}"
        c.disconnect()
        c.loop_stop()
    finally:
        broker.stop()
        shutil.rmtree(deploy, ignore_errors=True)


def test_shop_broker_acl_binds_each_stream_to_the_node_user_that_publishes_it(tmp_path):
    """On the shop broker as written: each node user writes detection and track streams under its own node only, reads the
    shop's streams, and nothing of another shop."""
    from fleet_controller.broker_config import BrokerOptions, bridge_topics, render_shop_acl

    acl = render_shop_acl("shop-a", ["pi-1"])
    assert "topic write local/v1/shop-a/detections/pi-1/+" in acl and "topic write local/v1/shop-a/tracks/pi-1/+" in acl
    assert "topic read local/v1/shop-a/detections/+/+" in acl and "topic read local/v1/shop-a/tracks/+/+" in acl
    assert not any(ln.startswith("topic readwrite local/") or ln.startswith("topic write local/v1/shop-a/tracks/+") for ln in acl.splitlines())
    assert not any(ln.split()[1].startswith("local/") for ln in bridge_topics("shop-a", ["pi-1", "pi-2"]))
    from fleet_controller.pki import Pki

    Pki.init(tmp_path / "pki")
    opts = BrokerOptions(pki_dir=tmp_path / "pki", persistence_dir=tmp_path / "d", shop_brokers=("shop-a",), central="mqtt.example")
    files = write_broker_config([*PAIRS, ("shop-a", "gpu-1-floor")], tmp_path / "out", options=opts)
    creds = json.loads(files.credentials_file.read_text())
    d = files.shop_dirs["shop-a"]
    (tmp_path / "broker").mkdir()
    b = BrokerProcess(workdir=tmp_path / "broker", engine="mosquitto", password_file=d / "passwd", acl_file=d / "acl").start()
    try:
        cam = Client(b, creds["nodes"]["shop-a/pi-1"]["username"], creds["nodes"]["shop-a/pi-1"]["password"])
        floor = Client(b, creds["nodes"]["shop-a/gpu-1-floor"]["username"], creds["nodes"]["shop-a/gpu-1-floor"]["password"])
        fusion = Client(b, creds["nodes"]["shop-a/pi-2"]["username"], creds["nodes"]["shop-a/pi-2"]["password"])
        floor.subscribe("local/v1/shop-a/detections/+/+")
        floor.subscribe("local/v1/shop-b/detections/+/+")  # refused by the ACL: nothing of another shop arrives
        fusion.subscribe("local/v1/shop-a/tracks/+/+")
        cam.publish("local/v1/shop-b/detections/pi-1/c0-0", b"forged")  # another shop's stream
        cam.publish("local/v1/shop-a/detections/pi-2/c0-0", b"forged")  # another node's prefix
        cam.publish("local/v1/shop-a/detections/c0-0", b"forged")  # the unbound shape of old
        cam.publish("local/v1/shop-a/detections/pi-1/c0-0", b"frame")
        cam.publish("local/v1/shop-a/tracks/gpu-1-floor/floor", b"forged")  # the floor's merged tracks, from a camera node
        floor.publish("local/v1/shop-a/tracks/gpu-1-floor/floor", b"tracks")
        assert floor.received("local/v1/shop-a/detections/pi-1/c0-0") == [("local/v1/shop-a/detections/pi-1/c0-0", b"frame")]
        assert fusion.received("local/v1/shop-a/tracks/gpu-1-floor/floor") == [("local/v1/shop-a/tracks/gpu-1-floor/floor", b"tracks")]
        for c in (cam, floor, fusion):
            c.close()
    finally:
        b.cleanup()
