"""Refused publishes counted by identity: real Mosquitto run from the generated config, its real log.

The node under test sends another node's client id on purpose: the count must still name it by
the identity it authenticated with (``use_username_as_clientid``), since that is what an
operator has to revoke.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge_agent.protocol import Topics
from fleet_controller.broker_denials import DenialMetrics, DenialWatcher, Refusal, follow
from fleet_controller.web.security_events import FalcoEvent, resolve_shop, rule_slug, to_firing
from shopfleet.broker import free_port
from tests.support.security import Client, tls_of
from tests.support.wait import wait_for

FORGED = [
    Topics.node("shop-b", "pi-1", "telemetry"),
    Topics.node("shop-b", "pi-1", "telemetry"),
    Topics.reported("shop-b", "pi-1"),
    Topics.node("shop-a", "pi-2", "state"),
]


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _watch(path: Path, watcher: DenialWatcher) -> threading.Event:
    stop = threading.Event()

    def loop() -> None:
        for line in follow(path, stop=stop, poll_s=0.05, from_start=True):
            watcher.feed(line)

    threading.Thread(target=loop, daemon=True).start()
    return stop


def test_shop_broker_counts_a_tls_node_publishing_into_another_shop_by_its_certificate_identity(deploy, deploy_dir):
    log_file = deploy_dir / "shop-a-broker.log"
    dep = deploy(shop_brokers=("shop-a",), shop_denial_log=str(log_file), shop_port=0)
    # The shop's log lives on the shop host: created here as broker-config's docs say to.
    log_file.touch(mode=0o666)
    log_file.chmod(0o666)
    conf = (dep.files.shop_dirs["shop-a"] / "mosquitto.conf").read_text()
    assert f"log_dest file {log_file}" in conf and "log_type debug" in conf
    dep.shop("shop-a")
    metrics = DenialMetrics()
    reports: list[dict] = []
    watcher = DenialWatcher(metrics, report=reports.append, summary_interval_s=3600)
    stop = _watch(log_file, watcher)
    try:
        node = Client(dep.options.shop_tls_port, client_id="agent-shop-b-pi-1", tls=tls_of(dep, "shop-a.pi-1"))
        assert node.accepted
        for topic in FORGED:
            node.publish(topic, b"forged")
        node.publish(Topics.node("shop-a", "pi-1", "telemetry"), b"own")  # allowed: not counted
        who = {"username": "shop-a.pi-1", "client_id": "shop-a.pi-1"}
        wait_for(lambda: _sample(metrics.registry, "shopfleet_broker_denied_publishes_total", **who) >= len(FORGED),
                 timeout=15, what="the denials in the broker's log to be counted")
        # Only the forged publishes, all under the certificate's identity (not the client id it sent).
        assert _sample(metrics.registry, "shopfleet_broker_denied_publishes_total", **who) == len(FORGED)
        assert watcher.denials == len(FORGED)
        summary = watcher.flush(force=True)
        assert [s["output_fields"]["mqtt.username"] for s in summary] == ["shop-a.pi-1"]
        assert summary[0]["output_fields"]["mqtt.denied"] == len(FORGED)
        assert set(summary[0]["output_fields"]["mqtt.topics"]) == set(FORGED)
        assert reports == summary
        node.close()
    finally:
        stop.set()


def test_broker_denials_command_serves_counts_of_the_central_broker(deploy, deploy_dir):
    log_file = deploy_dir / "central.log"
    dep = deploy(denial_log=str(log_file))
    assert log_file.exists()  # broker-config created it for the broker's user
    dep.central()
    port = free_port()
    side = subprocess.Popen(
        [sys.executable, "-m", "shopfleet.cli", "broker-denials", "--log", str(log_file), "--from-start",
         "--metrics-port", str(port), "--summary-interval", "3600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        creds = dep.creds["nodes"]
        node = Client(dep.options.port, client_id="shopfleet-controller", username=creds["shop-a/pi-1"]["username"],
                      password=creds["shop-a/pi-1"]["password"])
        assert node.accepted
        for topic in FORGED:
            node.publish(topic, b"forged")
        bad = Client(dep.options.port, username=creds["shop-b/pi-1"]["username"], password="wrong")
        assert not bad.accepted
        bad.c.loop_stop()

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                return ""

        want = f'shopfleet_broker_denied_publishes_total{{client_id="shop-a.pi-1",username="shop-a.pi-1"}} {float(len(FORGED))}'
        text = wait_for(lambda: (t := scrape()) and want in t and 'reason="not_authorised"} 1.0' in t and t, timeout=15,
                        what="the sidecar's metrics to show the denials and the refused connection")
        assert "shopfleet-controller" not in text  # the client id the node sent is never the identity
        node.close()
    finally:
        side.terminate()
        _, err = side.communicate(timeout=10)
    assert f"stopped after {len(FORGED)} refused publishes" in err, err


def test_summary_is_an_event_the_controller_accepts_and_files_under_the_nodes_shop():
    metrics = DenialMetrics()
    clock = [1_800_000_000.0]
    watcher = DenialWatcher(metrics, summary_interval_s=60, clock=lambda: clock[0])
    watcher.feed("1800000000: New client connected from 10.1.2.3:4455 as shop-a.pi-1 (p2, c1, k30, u'shop-a.pi-1').")
    for topic in FORGED:
        watcher.feed(f"1800000001: Denied PUBLISH from shop-a.pi-1 (d0, q1, r0, m1, '{topic}', ... (6 bytes))")
    assert watcher.flush() == []  # not due yet: one summary per identity per interval
    clock[0] += 61
    (summary,) = watcher.flush()
    event = FalcoEvent.model_validate(json.loads(json.dumps(summary)))
    shop, _ = resolve_shop(event, lambda: [("shop-a", "pi-1"), ("shop-b", "pi-1")])
    firing = to_firing(event, shop, "")
    assert (firing.rule, firing.shop, firing.node, firing.severity) == (rule_slug("MQTT publish denied"), "shop-a", "pi-1", "warning")
    assert "4 publish(es) by shop-a.pi-1" in event.output and "10.1.2.3" in event.output


def test_reporter_posts_the_summary_with_the_token():
    from fleet_controller.broker_denials import ControllerReporter

    got: list[tuple[str, str, dict]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, self.headers["Authorization"], json.loads(body)))
            self.send_response(202)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    metrics = DenialMetrics()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/security-events"
        ControllerReporter(url, "v1.secret", metrics)({"rule": "MQTT publish denied"})
        assert got == [("/api/v1/security-events", "Bearer v1.secret", {"rule": "MQTT publish denied"})]
        assert _sample(metrics.registry, "shopfleet_broker_denial_reports_total", outcome="sent") == 1
    finally:
        server.shutdown()
    # The controller unreachable: counted and logged, never raised (the counts stay in the metrics).
    ControllerReporter(url, "v1.secret", metrics, timeout_s=2)({"rule": "x"})
    assert _sample(metrics.registry, "shopfleet_broker_denial_reports_total", outcome="failed") == 1


def test_follow_reads_across_rotation_and_truncation(tmp_path):
    path = tmp_path / "log"
    path.write_text("old line\n")
    stop = threading.Event()
    seen: list[str] = []

    def loop() -> None:
        seen.extend(follow(path, stop=stop, poll_s=0.02, truncate_at=64, from_start=True))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: seen == ["old line"], what="follow to read the file from its start")
        with path.open("a") as f:  # the broker appends (O_APPEND)
            f.write("a" * 70 + "\n")
        wait_for(lambda: path.stat().st_size == 0, what="the log to be truncated past --truncate-at")
        with path.open("a") as f:
            f.write("after truncation\n")
        wait_for(lambda: "after truncation" in seen, what="a line written after the truncation")
        path.rename(tmp_path / "log.1")  # logrotate
        path.write_text("rotated in\n")
        wait_for(lambda: "rotated in" in seen, what="the first line of the new file")
    finally:
        stop.set()
        t.join(5)
    assert seen == ["old line", "a" * 70, "after truncation", "rotated in"]


def test_echo_without_packets_keeps_the_brokers_own_lines():
    from fleet_controller.broker_denials import is_packet_trace

    trace = [
        "1795989758: Received PUBLISH from shop-a.pi-1 (d0, q1, r0, m2, 'fleet/v1/shop-a/pi-1/telemetry', ... (1 bytes))",
        "1795989758: Sending PUBACK to shop-a.pi-1 (m2, rc0)",
        "1795989758: \tfleet/v1/shop-b/# (QoS 1)",
        "1795989758: shop-a.pi-1 1 fleet/v1/shop-b/#",
        "1795989757: No will message specified.",
    ]
    kept = [
        "1795989758: Denied PUBLISH from shop-a.pi-1 (d0, q1, r0, m1, 'fleet/v1/shop-b/pi-1/telemetry', ... (1 bytes))",
        "1795989757: New client connected from 127.0.0.1:38721 as shop-a.pi-1 (p2, c1, k60, u'shop-a.pi-1').",
        "1795989759: Client <unknown> disconnected, not authorised.",
        "1795990147: OpenSSL Error[0]: error:0A0000C7:SSL routines::peer did not return a certificate",
        "1795989757: mosquitto version 2.0.11 running",
    ]
    assert [line for line in trace + kept if not is_packet_trace(line)] == kept


def test_tls_refusals_are_counted_in_both_forms_mosquitto_logs_them_and_a_hang_up_is_not_one():
    # Lines from Mosquitto 2.0.11 refusing a certificate-less client, a foreign CA's certificate and a
    # revoked one. Whether a refusal is logged as 'OpenSSL Error' (after the socket was accepted) or as
    # 'Client connection from ... failed' (within the accept) depends on how fast the client's hello
    # arrived; the readiness probe's bare TCP connect ends in 'unexpected eof' and is no refusal.
    log = [
        "1796135796: New connection from 127.0.0.1:47744 on port 48213.",
        "1796135796: Client connection from 127.0.0.1 failed: error:0A000126:SSL routines::unexpected eof while reading.",
        "1796135796: Client connection from 127.0.0.1 failed: error:0A0000C7:SSL routines::peer did not return a certificate.",
        "1796135797: New connection from 127.0.0.1:60723 on port 38455.",
        "1796135797: OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed",
        "1796135797: Client <unknown> disconnected: Protocol error.",
        "1796135799: Client connection from 10.0.0.7 failed: error:0A000086:SSL routines::certificate verify failed.",
        "1796135799: Client connection from 10.0.0.8 denied: max_connections exceeded.",
    ]
    watcher = DenialWatcher(DenialMetrics())
    refusals = [r for r in map(watcher.feed, log) if r is not None]
    assert refusals == [
        Refusal("tls", "127.0.0.1", "error:0A0000C7:SSL routines::peer did not return a certificate"),
        Refusal("tls", "127.0.0.1:60723", "error:0A000086:SSL routines::certificate verify failed"),
        Refusal("tls", "10.0.0.7", "error:0A000086:SSL routines::certificate verify failed"),
    ]
    assert watcher.metrics.registry.get_sample_value("shopfleet_broker_refused_connections_total", {"reason": "tls"}) == 3
