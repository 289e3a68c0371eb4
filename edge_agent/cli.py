"""``shopfleet agent``: run the node agent from a config file, with flags overriding it.

The agent is configured by one YAML file (docs/agent.md lists every key); each flag here sets
one key of that file, so a K3s manifest can keep a shared file and vary only the node id. The
heavy imports (paho, psutil, the pipelines) happen inside the handler, so ``shopfleet --help``
stays fast.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

# flag dest -> dotted config key it overrides
FLAG_KEYS: dict[str, str] = {
    "shop": "shop",
    "node": "node",
    "node_class": "node_class",
    "broker_host": "broker.host",
    "broker_port": "broker.port",
    "username": "broker.username",
    "password": "broker.password",
    "tls_ca": "broker.tls.ca_file",
    "tls_cert": "broker.tls.cert_file",
    "tls_key": "broker.tls.key_file",
    "tls_insecure": "broker.tls.insecure",
    "heartbeat_interval": "heartbeat_interval_s",
    "outbox": "outbox.path",
    "outbox_max_messages": "outbox.max_messages",
    "outbox_max_bytes": "outbox.max_bytes",
    "metrics_port": "metrics.port",
    "metrics_host": "metrics.host",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``agent`` subcommand."""
    p = sub.add_parser(
        "agent",
        help="run the node agent (heartbeats, durable outbox, pipelines, commands, desired state)",
        description=(
            "Run the shopfleet node agent on a shop computer. It connects to the MQTT broker with "
            "its own credentials, announces itself (birth message, Last Will), sends a heartbeat "
            "with node facts every interval, supervises the local pipelines, and stores every "
            "uplink message in a durable SQLite outbox until the broker acknowledged it. Flags "
            "override the keys of the config file named in brackets. SIGTERM or SIGINT shut it "
            "down gracefully: pipelines stop, the outbox is flushed, presence goes offline."
        ),
        epilog="Every config key is documented in docs/agent.md.",
        # No abbreviations: 'agent enroll --out DIR' must not be read as an abbreviation of --outbox.
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file (optional when flags give shop and node)")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config (file plus flags), print the result and exit: 0 if valid, 2 if not",
    )
    g = p.add_argument_group("identity")
    g.add_argument("--shop", help="shop id, a DNS label such as 'berlin-01' [shop]")
    g.add_argument("--node", help="node id, unique in its shop, such as 'pi-2' [node]")
    g.add_argument("--node-class", help="node class reported in facts: 'pi', 'gpu', ... [node_class]")
    g = p.add_argument_group("broker")
    g.add_argument("--broker-host", help="MQTT broker host name or address [broker.host]")
    g.add_argument("--broker-port", type=int, help="MQTT broker port [broker.port]")
    g.add_argument("--username", help="MQTT user name of this node [broker.username]")
    g.add_argument(
        "--password",
        help="MQTT password of this node [broker.password]; prefer the config file or "
        "broker.password_file, since flags are visible in the process list",
    )
    g.add_argument("--tls-ca", metavar="FILE", help="CA bundle that signed the broker's certificate; enables TLS [broker.tls.ca_file]")
    g.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS [broker.tls.cert_file]")
    g.add_argument("--tls-key", metavar="FILE", help="private key of the client certificate [broker.tls.key_file]")
    g.add_argument(
        "--tls-insecure",
        action="store_const",
        const=True,
        help="do not check the broker's host name against its certificate (testing only) [broker.tls.insecure]",
    )
    g = p.add_argument_group("behaviour")
    g.add_argument("--heartbeat-interval", type=float, metavar="SECONDS", help="seconds between heartbeats [heartbeat_interval_s]")
    g.add_argument("--outbox", metavar="PATH", help="SQLite file of the durable outbox [outbox.path]")
    g.add_argument("--outbox-max-messages", type=int, metavar="N", help="most messages the outbox keeps [outbox.max_messages]")
    g.add_argument("--outbox-max-bytes", type=int, metavar="N", help="most payload bytes the outbox keeps [outbox.max_bytes]")
    g.add_argument("--metrics-port", type=int, metavar="PORT", help="port of the Prometheus /metrics endpoint, 0 = off [metrics.port]")
    g.add_argument("--metrics-host", metavar="ADDR", help="address the metrics endpoint binds to [metrics.host]")
    p.set_defaults(func=run)
    # 'shopfleet agent enroll ...': get the node's certificate with a one-time token (edge_agent/enroll.py).
    from edge_agent.enroll import register as register_enroll

    register_enroll(p.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", title="subcommands",
                                    help="enroll: obtain this node's broker certificate with a one-time token (without one, the agent runs)"))


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Return the dotted config keys the given flags set."""
    return {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest, None) is not None}


def run(args: argparse.Namespace) -> int:
    """Load the config, then run the agent until SIGTERM/SIGINT (or only check the config)."""
    from edge_agent.config import ConfigError, load_config

    try:
        config = load_config(args.config, overrides_from_args(args))
    except ConfigError as exc:
        print(f"shopfleet agent: invalid configuration\n{exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(
            f"config OK: shop={config.shop} node={config.node} broker={config.broker.host}:{config.broker.port} "
            f"outbox={config.outbox.path} pipelines={[p.name for p in config.pipelines]}"
        )
        return 0

    from edge_agent.agent import Agent
    from edge_agent.outbox import OutboxError

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent = Agent(config)
    except OutboxError as exc:
        print(f"shopfleet agent: {exc}", file=sys.stderr)
        return 1
    if config.apply.enabled:
        from edge_agent.apply.plugin import attach

        attach(agent, config.apply)
    # Everything imported so far lives as long as the process: move it out of the garbage
    # collector's reach, so a full collection walks only what heartbeats allocate (a measured
    # CPU saving on a Pi; see docs/benchmarks.md).
    gc.freeze()
    try:
        agent.start()
    except OSError as exc:
        print(
            f"shopfleet agent: cannot serve metrics on {config.metrics.bind_host}:{config.metrics.port} ({exc.strerror}); "
            "fix: choose another metrics.port, or 0 to turn the endpoint off",
            file=sys.stderr,
        )
        agent.stop(timeout=0)
        return 1
    try:
        while not stop.wait(1.0):
            pass
    finally:
        agent.stop()
    return 0
