"""The broker's subcommands: ``shopfleet broker-config`` and ``shopfleet pki``.

Only argparse here; :mod:`fleet_controller.broker_config` and :mod:`fleet_controller.pki` (and
the ``cryptography`` library) are imported by the handlers, so ``shopfleet --help`` stays fast.
docs/broker.md documents every option.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any


def _wrap(text: str) -> str:
    """Wrap each paragraph of a description to 90 columns, leaving indented (example) lines as they are."""
    paras = text.split("\n\n")
    return "\n\n".join(p if p.startswith("  ") else textwrap.fill(p, 90) for p in paras)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pki`` and ``broker-denials`` to the CLI root (``broker-config`` is added by :mod:`fleet_controller.cli`)."""
    register_pki(sub)
    register_broker_denials(sub)


# ----- broker-config ------------------------------------------------------------------------


def register_broker_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``broker-config``."""
    b = sub.add_parser(
        "broker-config",
        help="write the Mosquitto config, passwords and ACL for the fleet (and each shop's broker)",
        description=_wrap(
            "Write the central Mosquitto's files into --out: 'passwd' (PBKDF2-SHA512, the '$7$' "
            "format of mosquitto_passwd), 'acl' (each node user '<shop>.<node>' may publish only its "
            "own topics (its reported state included: never another node's), and read only its own commands, its shop's "
            "desired state and the controller's presence and clock; each controller replica's user "
            "reads and writes everything), 'mosquitto.conf' (a complete config: run 'mosquitto -c "
            "OUT/mosquitto.conf') and 'credentials.json' (mode 0600) with every generated password.\n\n"
            "Every listener replaces the client id with the username, so one node's credentials "
            "cannot take over another node's or the controller's session. With --pki, a mutual-TLS "
            "listener (--tls-port) is added: the client certificate's CN is the username, revoked "
            "certificates are refused (after a broker restart or reload). Persistence and the queue limits are "
            "sized so that nothing is dropped while the controller is away for --outage seconds.\n\n"
            "--shop-broker SHOP also writes OUT/shops/SHOP/: the config of that shop's local broker "
            "(per-node users and ACL at the edge, no anonymous clients, a TLS bridge to --central "
            "carrying only that shop's topics).\n\n"
            "Passwords, controller usernames and certificates already there are kept, so re-running "
            "after adding a node changes nothing else. See docs/broker.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--nodes", type=Path, metavar="FILE", help="text file, one 'shop/node' per line ('#' starts a comment)")
    b.add_argument("--shop", action=_ShopAction, metavar="SHOP", help="a shop id; follow it with one or more --node (repeatable)")
    b.add_argument("--node", action=_NodeAction, metavar="NODE", dest="pairs", default=[], help="a node id of the --shop before it")
    b.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write passwd, acl, mosquitto.conf, credentials.json")
    g = b.add_argument_group("controller users")
    g.add_argument("--controller-user", action="append", default=[], metavar="NAME",
                   help="username of a controller replica (repeat per replica; no '.'). Default: the ones in "
                        "credentials.json, else 'controller-<random>'")
    g.add_argument("--controller-replicas", type=int, default=1, metavar="N",
                   help="how many controller users to keep or generate when --controller-user is not given (default: %(default)s)")
    g = b.add_argument_group("listeners and TLS")
    g.add_argument("--port", type=int, default=1883, help="password listener, kept for migration; 0: none (default: %(default)s)")
    g.add_argument("--tls-port", type=int, default=8883, help="mutual-TLS listener, written with --pki (default: %(default)s)")
    g.add_argument("--bind", metavar="ADDR", help="address the listeners bind to (default: all)")
    g.add_argument("--pki", type=Path, metavar="DIR", help="the fleet CA made by 'shopfleet pki init'; issues missing certificates and adds the TLS listener")
    g.add_argument("--server-name", action="append", default=[], metavar="HOST",
                   help="name or address clients use for this broker (repeatable; the first is the certificate's CN). "
                        "Default: this machine's FQDN, localhost, 127.0.0.1")
    g = b.add_argument_group("zero loss: persistence and queue sizing")
    g.add_argument("--rate-per-node", type=float, default=1.0, metavar="MSG/S", help="messages per second one node sends on average (default: %(default)s)")
    g.add_argument("--outage", type=float, default=3600.0, metavar="SECONDS",
                   help="longest controller (or shop uplink) outage to survive without loss (default: %(default)s)")
    g.add_argument("--message-bytes", type=int, default=1024, metavar="N", help="average message size, for max_queued_bytes (default: %(default)s)")
    g.add_argument("--max-packet-size", type=int, default=None, metavar="BYTES", help="largest MQTT packet accepted (default: the protocol's payload limit + 4096)")
    g.add_argument("--max-inflight", type=int, default=None, metavar="N",
                   help="max_inflight_messages: QoS 1 messages the broker sends one client before its acks; bounds each "
                   "controller batch (0: no limit; default: 1000, two controller batches of 500)")
    g.add_argument("--persistence-dir", type=Path, default=Path("/var/lib/mosquitto"), metavar="DIR", help="persistence_location (default: %(default)s)")
    g.add_argument("--autosave-interval", type=int, default=1, metavar="SECONDS", help="how often the queue is written to disk (default: %(default)s)")
    g.add_argument("--owner", metavar="USER", help="chown the files the broker reads (and the persistence dir) to USER, e.g. mosquitto; needs root")
    g = b.add_argument_group("shop brokers")
    g.add_argument("--shop-broker", action="append", default=[], metavar="SHOP", help="write OUT/shops/SHOP/ for that shop's broker (repeatable; 'all': every shop)")
    g.add_argument("--central", metavar="HOST[:PORT]", help="the central broker's TLS listener the bridges connect to (port default 8883)")
    g.add_argument("--shop-port", type=int, default=1883,
                   help="the shop broker's password listener for its nodes, kept for migration; 0: none (default: %(default)s)")
    g.add_argument("--shop-tls-port", type=int, default=8883,
                   help="the shop broker's mutual-TLS listener for its nodes (client certificate required); 0: none (default: %(default)s)")
    g.add_argument("--shop-server-name", action="append", default=[], metavar="HOST",
                   help="name or address nodes use for their shop broker ('{shop}' is replaced; repeatable; the first is the "
                        "certificate's CN). Default: shop-broker.{shop}.shopfleet, shop-broker.shopfleet.svc.cluster.local, "
                        "shop-broker, localhost, 127.0.0.1")
    g.add_argument("--shop-install-dir", metavar="DIR", help="where OUT/shops/SHOP/ is installed on the shop host ('{shop}' is replaced; default: where it is written)")
    g.add_argument("--shop-persistence-dir", type=Path, metavar="DIR", help="persistence_location of the shop brokers (default: --persistence-dir)")
    g = b.add_argument_group("refused publishes (for 'shopfleet broker-denials')")
    g.add_argument("--denial-log", metavar="DEST",
                   help="log to DEST ('stdout', 'stderr' or a file) at log_type debug, the only level at which Mosquitto logs a "
                        "refused publish (costs broker CPU: docs/broker.md). Default: Mosquitto's default logging")
    g.add_argument("--shop-denial-log", metavar="DEST", help="the same for the shop brokers ('{shop}' is replaced)")
    b.set_defaults(func=_run_broker_config, current_shop=None)


class _ShopAction(argparse.Action):
    """``--shop S``: remember S so the ``--node`` flags after it belong to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        namespace.current_shop = values


class _NodeAction(argparse.Action):
    """``--node N``: add (current shop, N), or fail when no ``--shop`` came before."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        if namespace.current_shop is None:
            parser.error(f"--node {values} needs a --shop before it (e.g. --shop shop-a --node pi-1)")
        namespace.pairs = [*namespace.pairs, (namespace.current_shop, values)]


def _run_broker_config(args: argparse.Namespace) -> int:
    from fleet_controller.broker_config import (
        DEFAULT_MAX_INFLIGHT,
        DEFAULT_MAX_PACKET_SIZE,
        DEFAULT_SHOP_SERVER_NAMES,
        BrokerConfigError,
        BrokerOptions,
        parse_node_file,
        write_broker_config,
    )

    try:
        pairs = list(args.pairs)
        if args.nodes is not None:
            pairs = parse_node_file(args.nodes) + pairs
        if not pairs:
            raise BrokerConfigError("no nodes given: pass --nodes FILE or --shop SHOP --node NODE ...")
        options = BrokerOptions(
            port=args.port,
            tls_port=args.tls_port,
            bind=args.bind,
            pki_dir=args.pki,
            server_names=tuple(args.server_name),
            controller_users=tuple(args.controller_user),
            controller_replicas=args.controller_replicas,
            rate_per_node=args.rate_per_node,
            outage_s=args.outage,
            message_bytes=args.message_bytes,
            max_packet_size=args.max_packet_size or DEFAULT_MAX_PACKET_SIZE,
            persistence_dir=args.persistence_dir,
            autosave_interval=args.autosave_interval,
            max_inflight=DEFAULT_MAX_INFLIGHT if args.max_inflight is None else args.max_inflight,
            owner=args.owner,
            shop_brokers=tuple(args.shop_broker),
            central=args.central,
            shop_port=args.shop_port,
            shop_tls_port=args.shop_tls_port,
            shop_server_names=tuple(args.shop_server_name) or DEFAULT_SHOP_SERVER_NAMES,
            denial_log=args.denial_log,
            shop_denial_log=args.shop_denial_log,
            shop_install_dir=args.shop_install_dir,
            shop_persistence_dir=args.shop_persistence_dir,
        )
        result = write_broker_config(pairs, args.out, options=options)
    except BrokerConfigError as exc:
        print(f"shopfleet broker-config: {exc}", file=sys.stderr)
        return 2
    sizing = result.sizing
    assert sizing is not None
    print(
        f"wrote {result.password_file}, {result.acl_file} and {result.conf_file} for {len(pairs)} nodes; "
        f"passwords ({result.generated} new) are in {result.credentials_file} (mode 0600)"
    )
    print(f"controller users (one per replica): {', '.join(result.controllers)}")
    print(
        f"queue: max_queued_messages {sizing.messages}, max_queued_bytes {sizing.bytes} "
        f"(up to {sizing.bytes / 2**20:.0f} MiB of broker RAM while the controller is away)"
    )
    if result.tls:
        print(f"TLS listener on port {args.tls_port}; {result.certificates_issued} certificates issued into {args.pki}/certs")
    for shop, d in result.shop_dirs.items():
        tls_note = f"; nodes: TLS port {args.shop_tls_port} (client certificate)" if args.shop_tls_port else ""
        pw_note = f"; password port {args.shop_port}" if args.shop_port else ""
        print(f"shop broker of {shop}: {d}/mosquitto.conf{tls_note}{pw_note}")
    return 0


# ----- pki ----------------------------------------------------------------------------------


def register_pki(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pki`` with its ``init``, ``issue``, ``revoke``, ``crl`` and ``list`` subcommands."""
    p = sub.add_parser(
        "pki",
        help="the fleet's certificate authority: init, issue (and rotate), revoke, list",
        description=_wrap(
            "Keep the fleet CA whose certificates the broker's TLS listener requires. Each "
            "certificate's CN is the MQTT username: '<shop>.<node>' for a node, the controller "
            "replica's username, '<shop>._bridge' for a shop broker's bridge, a host name for a "
            "broker. Keys are ECDSA P-256, written 0600; the CA key stays in DIR/private.\n\n"
            "  shopfleet pki init --dir DIR                      make the CA and an empty CRL\n"
            "  shopfleet pki issue --dir DIR node shop-a/pi-1    issue, or re-issue (rotate)\n"
            "  shopfleet pki revoke --dir DIR shop-a.pi-1        add to the CRL, then restart the broker\n"
            "  shopfleet pki crl --dir DIR                       refresh the CRL before it expires\n"
            "  shopfleet pki list --dir DIR                      every certificate and its state\n\n"
            "'shopfleet broker-config --pki DIR' issues any certificate that is missing. "
            "See docs/broker.md and docs/security.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    psub = p.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    def dir_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", type=Path, required=True, help="the PKI directory (ca.crt, crl.pem, certs/, private/)")

    q = psub.add_parser("init", help="create the CA and an empty CRL", description="Create a new fleet CA in --dir (refused if one is there).")
    dir_arg(q)
    q.add_argument("--ca-name", default="shopfleet fleet CA", help="the CA's CN (default: %(default)s)")
    q.add_argument("--days", type=int, default=3650, help="CA validity in days (default: %(default)s)")
    q.set_defaults(func=_run_pki)

    q = psub.add_parser(
        "issue",
        help="issue or re-issue (rotate) a certificate",
        description=(
            "Issue a key and certificate into DIR/certs/<CN>.crt and .key. Issuing again for the same "
            "name rotates: new key and certificate; the old one stays valid until it expires or is "
            "revoked (--revoke-previous does that at once)."
        ),
    )
    dir_arg(q)
    q.add_argument("kind", choices=["node", "controller", "bridge", "server"], help="what the certificate is for")
    q.add_argument("name", help="node: shop/node; controller: its MQTT username; bridge: the shop id; server: host name or address")
    q.add_argument("--san", action="append", default=[], metavar="HOST", help="extra name or address of a server certificate (repeatable)")
    q.add_argument("--days", type=int, default=825, help="validity in days (default: %(default)s)")
    q.add_argument("--revoke-previous", action="store_true", help="revoke this name's earlier certificates now (a key suspected stolen)")
    q.set_defaults(func=_run_pki)

    q = psub.add_parser(
        "revoke",
        help="revoke a certificate (takes effect when the broker restarts or reloads)",
        description="Mark every certificate of CN (or the one --serial) revoked and rewrite DIR/crl.pem. Mosquitto reads the CRL at start and on reload (SIGHUP): restart it to also end a connection the revoked client has open.",
    )
    dir_arg(q)
    q.add_argument("cn", nargs="?", help="the CN to revoke, e.g. shop-a.pi-1 ('shopfleet pki list' shows them)")
    q.add_argument("--serial", help="revoke only this serial (hex)")
    q.set_defaults(func=_run_pki)

    q = psub.add_parser("crl", help="rewrite the CRL with a fresh expiry", description="Rewrite DIR/crl.pem; an expired CRL makes the broker refuse every client.")
    dir_arg(q)
    q.add_argument("--days", type=int, default=365, help="days until the CRL's nextUpdate (default: %(default)s)")
    q.set_defaults(func=_run_pki)

    q = psub.add_parser("list", help="list every certificate issued", description="List serial, kind, CN, expiry and state of every certificate.")
    dir_arg(q)
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=_run_pki)


def _run_pki(args: argparse.Namespace) -> int:
    from fleet_controller.pki import Pki, PkiError

    try:
        cmd = args.pki_command
        if cmd == "init":
            pki = Pki.init(args.dir, ca_name=args.ca_name, days=args.days)
            print(f"CA written to {pki.ca_cert_path} (key: {pki.ca_key_path}, 0600); CRL: {pki.crl_path}")
            return 0
        pki = Pki(args.dir)
        if cmd == "issue":
            rec = pki.issue(args.kind, args.name, sans=args.san, days=args.days, revoke_previous=args.revoke_previous)
            print(f"issued {rec.kind} certificate CN={rec.cn} serial={rec.serial} until {rec.not_after}: "
                  f"{pki.cert_path(rec.cn)}, {pki.key_path(rec.cn)} (0600)")
            if args.revoke_previous:
                print("earlier certificates of this CN are revoked: restart the broker to apply the new CRL")
            return 0
        if cmd == "revoke":
            done = pki.revoke(args.cn, serial=args.serial)
            for rec in done:
                print(f"revoked CN={rec.cn} serial={rec.serial}")
            print(f"wrote {pki.crl_path}; restart the broker(s) using it (a reload refuses new handshakes; a restart also ends open connections)")
            return 0
        if cmd == "crl":
            nu = pki.write_crl(args.days)
            print(f"wrote {pki.crl_path}; valid until {nu.isoformat()}")
            return 0
        records = pki.records()
        if args.json:
            print(json.dumps({"crl_next_update": pki.crl_next_update().isoformat(),
                              "certificates": [{**r.__dict__, "expired": r.expired()} for r in records]}, indent=2))
            return 0
        print(f"{'SERIAL':<40} {'KIND':<10} {'CN':<32} {'NOT AFTER':<25} STATE")
        for r in records:
            state = f"revoked {r.revoked_at}" if r.revoked else ("expired" if r.expired() else "valid")
            print(f"{r.serial:<40} {r.kind:<10} {r.cn:<32} {r.not_after:<25} {state}")
        print(f"CRL {pki.crl_path} valid until {pki.crl_next_update().isoformat()}")
        return 0
    except PkiError as exc:
        print(f"shopfleet pki {args.pki_command}: {exc}", file=sys.stderr)
        return 2


# ----- broker-denials ---------------------------------------------------------------------


def register_broker_denials(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``broker-denials``: the sidecar that counts what the broker refuses, from its log."""
    p = sub.add_parser(
        "broker-denials",
        help="count the publishes and connections Mosquitto refuses, by identity, from its log (Prometheus, alerts)",
        description=_wrap(
            "Read Mosquitto's log and count every publish its ACL refused, by the publisher's username "
            "and client id (shopfleet_broker_denied_publishes_total), and every refused connection "
            "(shopfleet_broker_refused_connections_total{reason}); serve them on --metrics-port and, "
            "with --controller, send a summary per identity to the controller as a security event, "
            "which opens an alert for the node's shop.\n\n"
            "Mosquitto logs refused publishes only at 'log_type debug': generate the broker's config "
            "with 'shopfleet broker-config --denial-log FILE' (or '--denial-log stdout' and pipe the "
            "broker's output in with '--log -').\n\n"
            "  shopfleet broker-denials --log /var/log/mosquitto/mosquitto.log --metrics-port 9466\n"
            "  mosquitto -c OUT/mosquitto.conf 2>&1 | shopfleet broker-denials --log - --echo\n\n"
            "See docs/broker.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log", required=True, metavar="FILE|-", help="the broker's log file (followed across rotation), or '-' for standard input")
    p.add_argument("--from-start", action="store_true", help="read the file from its start instead of only new lines")
    p.add_argument("--truncate-at", type=int, default=0, metavar="BYTES",
                   help="truncate the log file to zero once read past this size (a debug log nobody rotates); 0: never (default)")
    p.add_argument("--echo", nargs="?", const="all", choices=["all", "no-packets"], metavar="all|no-packets",
                   help="copy the lines read to standard output, so the broker's log stays visible ('kubectl logs', the journal); "
                        "'no-packets' leaves out debug's per-packet lines (Received/Sending ...)")
    p.add_argument("--metrics-port", type=int, default=9466, help="Prometheus /metrics port; 0: none (default: %(default)s)")
    p.add_argument("--metrics-bind", default="127.0.0.1", metavar="ADDR", help="address /metrics binds to (default: %(default)s)")
    p.add_argument("--controller", metavar="URL", help="the controller's base URL (https://...): summaries go to URL/api/v1/security-events")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="file holding an API token of a user with role security-ingest (needed with --controller)")
    p.add_argument("--summary-interval", type=float, default=60.0, metavar="SECONDS",
                   help="at most one summary per identity this often (default: %(default)s)")
    p.set_defaults(func=_run_broker_denials)


def _run_broker_denials(args: argparse.Namespace) -> int:
    import contextlib
    import logging
    import signal
    import threading

    from prometheus_client import start_http_server

    from fleet_controller.broker_denials import (
        ControllerReporter,
        DenialMetrics,
        DenialWatcher,
        follow,
        run,
        stdin_lines,
    )

    def fail(msg: str) -> int:
        print(f"shopfleet broker-denials: {msg}", file=sys.stderr)
        return 2

    if args.summary_interval <= 0:
        return fail(f"--summary-interval {args.summary_interval}: use a positive number of seconds")
    if args.truncate_at < 0:
        return fail(f"--truncate-at {args.truncate_at}: use a size in bytes, or 0 to never truncate")
    if not 0 <= args.metrics_port <= 65535:
        return fail(f"--metrics-port {args.metrics_port}: use 1..65535, or 0 for none")
    metrics = DenialMetrics()
    report = None
    if args.controller:
        if not args.controller.startswith(("https://", "http://")):
            return fail(f"--controller {args.controller!r}: give the controller's base URL, e.g. https://fleet.example.com")
        if args.token_file is None:
            return fail("--controller needs --token-file: an API token of a user with role security-ingest")
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            return fail(f"cannot read --token-file {args.token_file}: {exc.strerror}")
        if not token:
            return fail(f"--token-file {args.token_file} is empty: put the API token in it")
        report = ControllerReporter(args.controller.rstrip("/") + "/api/v1/security-events", token, metrics)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    watcher = DenialWatcher(metrics, report=report, summary_interval_s=args.summary_interval)
    if args.metrics_port:
        try:
            start_http_server(args.metrics_port, addr=args.metrics_bind, registry=metrics.registry)
        except OSError as exc:
            return fail(f"cannot serve metrics on {args.metrics_bind}:{args.metrics_port}: {exc.strerror}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    source = stdin_lines() if args.log == "-" else follow(Path(args.log), stop=stop, from_start=args.from_start, truncate_at=args.truncate_at)
    print(f"shopfleet broker-denials: reading {'standard input' if args.log == '-' else args.log}"
          f"{f'; metrics on {args.metrics_bind}:{args.metrics_port}' if args.metrics_port else ''}", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        run(source, watcher, stop=stop, echo=sys.stdout if args.echo else None, echo_packets=args.echo != "no-packets")
    print(f"shopfleet broker-denials: stopped after {watcher.denials} refused publishes", file=sys.stderr)
    return 0
