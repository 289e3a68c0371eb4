"""Mosquitto configuration that enforces shop isolation and bound identities, and loses nothing.

``shopfleet broker-config`` writes, for the central broker: ``passwd``, ``acl``,
``mosquitto.conf`` and ``credentials.json``; and with ``--shop-broker`` a directory per shop for
that shop's local broker. docs/broker.md is the operator's guide; docs/security.md says what
each control stops.

**Users.** Each node gets its own user ``<shop>.<node>`` (ids cannot contain ``.``, so this
never collides with another node). Each controller replica gets its own user, by default
``controller-<random>`` (no ``.``, so never a node's), generated once and kept. A shop broker's
bridge is ``<shop>._bridge`` (``_`` cannot start a node id). The ACL is rendered by pure
functions; per-user ``topic`` lines rather than ``pattern`` lines, because a pattern cannot
split a username into shop and node.

**Identity bound to credentials.** Every listener sets ``use_username_as_clientid``: the broker
replaces whatever client id a client sends with its username (the certificate's CN on the TLS
listener), so one node's credentials can never take over another node's or the controller's
session, and each controller replica's persistent session lives under its own username.

**What a node may do.** Write its own ``presence``, ``telemetry``, ``events``, ``replies`` and
``state`` (its reported state: never another node's, never the shop's) topics; read its own ``commands`` and ``ack``
(the controller's stored-acks, which only controllers write), its shop's
``state/desired`` and the controller's presence and clock. Controllers read and write all of
``fleet/v1/#``. A bridge may do, for its shop, what that shop's nodes may together. On its shop
broker a node also writes shop-local track and detection streams under its own node only, and
reads the shop's streams and events (:func:`shop_local_acl`).

**Zero loss while the controller is away.** The broker queues the controller's messages while it
is disconnected; Mosquitto's default queue (1,000 messages per client) drops the rest silently,
and without persistence a broker restart loses the queue. So the config enables persistence and
sizes ``max_queued_messages`` as nodes x messages per second per node x the longest outage to
survive (:class:`QueueSizing`), with ``max_queued_bytes`` as the memory bound.

Passwords are hashed as Mosquitto 2 does (``$7$``: PBKDF2-HMAC-SHA512, 12-byte salt, base64),
written here rather than by calling ``mosquitto_passwd`` so no broker package is needed on the
machine that generates the files; the test suite checks a real Mosquitto accepts them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import pwd
import secrets
import shutil
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.protocol import (
    MAX_PAYLOAD_BYTES,
    TOPIC_ROOT,
    Channel,
    LocalStream,
    Topics,
    validate_id,
)
from shopfleet.errors import PermanentError

PBKDF2_ITERATIONS = 101
"""mosquitto_passwd's default. More iterations resist offline cracking of a stolen file better,
but every connection costs the broker that much CPU; the passwords are 32 random bytes anyway."""
SALT_BYTES = 12
PACKET_OVERHEAD = 4096
"""Room above the largest payload the protocol allows for the topic, the fixed header and MQTT 5
properties, so that ``max_packet_size`` refuses only what the protocol would refuse anyway."""
DEFAULT_MAX_PACKET_SIZE = MAX_PAYLOAD_BYTES + PACKET_OVERHEAD
MOSQUITTO_DEFAULT_QUEUE = 1000
DEFAULT_MAX_INFLIGHT = 1000
"""``max_inflight_messages``: QoS 1 messages the broker sends one client before that client's
PUBACKs. Mosquitto's default, 20, caps each controller batch at 20 messages (the controller
acknowledges after the batch commits), which makes catching up after an outage slow. The
controller batches 500 (``intake.batch_max_messages``) and keeps 2 batches with the writer, so
1,000 lets it fill both; past its own ``intake.max_queue`` it stops reading (flow control), so a
larger window costs the broker no memory it does not already spend on the queue."""
BRIDGE_SUFFIX = "._bridge"
CONNECTION_NAME = "shopfleet-central"
DEFAULT_SHOP_SERVER_NAMES = ("shop-broker.{shop}.shopfleet", "shop-broker.shopfleet.svc.cluster.local", "shop-broker", "localhost", "127.0.0.1")
"""A shop broker's certificate names: the first (the CN) differs per shop and has two dots, so it is
never a node's (``<shop>.<node>``), a bridge's or a controller's CN; the rest are the names the
manifests' agents and the broker's own node use (docs/broker.md)."""
DENIAL_LOG_TYPES = ("error", "warning", "notice", "information", "subscribe", "unsubscribe", "debug")
"""``log_type`` lines written with a denial log: Mosquitto 2.0 logs a refused publish only at ``debug``."""


class BrokerConfigError(PermanentError, ValueError):
    """Input that cannot be turned into broker files; the message says what to fix."""

    default_reason = "broker_config"


@dataclass(frozen=True)
class QueueSizing:
    """How many messages the broker must hold for a disconnected controller (or bridge).

    ``messages = ceil(nodes x rate_per_node x outage_s)``, never below Mosquitto's own default;
    ``bytes = messages x message_bytes`` bounds the memory the queue may take (Mosquitto keeps
    queued messages in RAM and writes them to its persistence file). Whichever limit is reached
    first drops messages, so size ``message_bytes`` as the average message, not the smallest.
    """

    nodes: int
    rate_per_node: float = 1.0
    outage_s: float = 3600.0
    message_bytes: int = 1024

    def __post_init__(self) -> None:
        if self.rate_per_node <= 0 or self.outage_s <= 0 or self.message_bytes <= 0:
            raise BrokerConfigError(
                f"queue sizing needs positive numbers (got --rate-per-node {self.rate_per_node}, "
                f"--outage {self.outage_s}, --message-bytes {self.message_bytes})"
            )

    @property
    def messages(self) -> int:
        """Return ``max_queued_messages``."""
        return max(MOSQUITTO_DEFAULT_QUEUE, math.ceil(self.nodes * self.rate_per_node * self.outage_s))

    @property
    def bytes(self) -> int:
        """Return ``max_queued_bytes``."""
        return self.messages * self.message_bytes


@dataclass(frozen=True)
class BrokerOptions:
    """Everything ``broker-config`` can be told besides the node list (defaults as documented in docs/broker.md)."""

    port: int = 1883
    """Password listener (kept for migration); 0 writes none."""
    tls_port: int = 8883
    """Mutual-TLS listener, written when ``pki_dir`` is set."""
    bind: str | None = None
    """Address both listeners bind to; None: every address."""
    pki_dir: Path | None = None
    server_names: tuple[str, ...] = ()
    """Host names and addresses clients use to reach the central broker (its certificate's names)."""
    controller_users: tuple[str, ...] = ()
    """Explicit controller usernames, one per replica; empty: keep known ones / generate ``controller-<random>``."""
    controller_replicas: int = 1
    rate_per_node: float = 1.0
    outage_s: float = 3600.0
    message_bytes: int = 1024
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    """``max_inflight_messages``: unacknowledged QoS 1 messages in flight to one client (0: no limit)."""
    persistence_dir: Path = Path("/var/lib/mosquitto")
    autosave_interval: int = 1
    owner: str | None = None
    shop_brokers: tuple[str, ...] = ()
    """Shops to write a shop-broker directory for; ``("all",)`` means every shop in the node list."""
    central: str | None = None
    """HOST[:PORT] the shop brokers' bridges connect to (the central TLS listener)."""
    shop_port: int = 1883
    """The shop broker's password listener for its nodes (kept for migration); 0 writes none."""
    shop_tls_port: int = 8883
    """The shop broker's mutual-TLS listener for its nodes; 0 writes none."""
    shop_server_names: tuple[str, ...] = DEFAULT_SHOP_SERVER_NAMES
    """Names nodes use to reach a shop broker (``{shop}`` is replaced); the first is its certificate's CN."""
    denial_log: str | None = None
    """Where the central broker logs (``stdout``, ``stderr`` or a file), with ``log_type debug`` so that
    refused publishes are logged for ``shopfleet broker-denials``; None: Mosquitto's default logging."""
    shop_denial_log: str | None = None
    """The same for the shop brokers (``{shop}`` is replaced)."""
    shop_install_dir: str | None = None
    """Where a shop's directory is installed on the shop host (``{shop}`` is replaced); None: where it is written."""
    shop_persistence_dir: Path | None = None
    """Persistence directory of the shop brokers; None: ``persistence_dir``."""


@dataclass(frozen=True)
class BrokerFiles:
    """Paths written by :func:`write_broker_config`, and how many passwords were new."""

    password_file: Path
    acl_file: Path
    conf_file: Path
    credentials_file: Path
    generated: int
    controllers: tuple[str, ...] = ()
    sizing: QueueSizing | None = None
    shop_dirs: dict[str, Path] = field(default_factory=dict)
    certificates_issued: int = 0
    tls: bool = False


def node_username(shop: str, node: str) -> str:
    """Return the MQTT username of a node: ``<shop>.<node>``."""
    return f"{validate_id(shop, 'shop id')}.{validate_id(node, 'node id')}"


def bridge_username(shop: str) -> str:
    """Return the MQTT username (certificate CN) of a shop broker's bridge: ``<shop>._bridge``."""
    return f"{validate_id(shop, 'shop id')}{BRIDGE_SUFFIX}"


def new_controller_username() -> str:
    """Return a fresh, unguessable controller username: ``controller-<12 hex digits>``."""
    return f"controller-{secrets.token_hex(6)}"


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Return a Mosquitto ``$7$`` (PBKDF2-SHA512) hash of ``password``."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Return whether ``password`` matches a ``$7$`` hash."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
    except ValueError:
        return False
    if kind != "7":
        return False
    calc = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    return secrets.compare_digest(calc, base64.b64decode(digest))


def _node_writes(shop: str, node: str) -> list[str]:
    return [Topics.node(shop, node, ch) for ch in (Channel.PRESENCE, Channel.TELEMETRY, Channel.EVENTS, Channel.REPLIES, Channel.STATE)]


def _node_reads(shop: str, node: str) -> list[str]:
    """Topics only this node may read: its commands and the controller's stored-acks of its stream."""
    return [Topics.node(shop, node, Channel.COMMANDS), Topics.node(shop, node, Channel.ACK)]


def _shop_reads(shop: str) -> list[str]:
    return [Topics.desired(shop), Topics.controller_presence, Topics.controller_clock]


def node_acl(shop: str, node: str) -> list[str]:
    """Return the ACL lines of one node user."""
    lines = [f"user {node_username(shop, node)}"]
    lines += [f"topic write {t}" for t in _node_writes(shop, node)]
    lines += [
        *(f"topic read {t}" for t in _node_reads(shop, node)),
        *(f"topic read {t}" for t in _shop_reads(shop)),
    ]
    return lines


def bridge_acl(shop: str, nodes: Sequence[str]) -> list[str]:
    """Return the central broker's ACL lines of a shop's bridge: what the shop's nodes may do together, nothing of another shop."""
    lines = [f"user {bridge_username(shop)}"]
    for node in nodes:
        lines += [f"topic write {t}" for t in _node_writes(shop, node)]
    lines += [f"topic read {t}" for node in nodes for t in _node_reads(shop, node)]
    lines += [f"topic read {t}" for t in _shop_reads(shop)]
    return lines


def _check_controller_user(user: str) -> str:
    if not user or "." in user or user.startswith("_") or any(c.isspace() or c in ":#+/" for c in user):
        raise BrokerConfigError(
            f"controller user {user!r} must be non-empty and contain no '.' (node users do), no blanks and none of ':#+/'"
        )
    return user


def _shops(pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for shop, node in pairs:
        out.setdefault(shop, []).append(node)
    return out


def render_acl(
    pairs: Sequence[tuple[str, str]],
    controller_user: str | Sequence[str] = "controller",
    *,
    bridges: Sequence[str] = (),
) -> str:
    """Return the central broker's ACL for the controller user(s), each (shop, node) and each shop's bridge."""
    users = [controller_user] if isinstance(controller_user, str) else list(controller_user)
    out = [
        "# Written by 'shopfleet broker-config'. Nodes may write only their own topics and read only",
        "# their own commands, their shop's desired state and the controller's presence and clock.",
    ]
    for user in users:
        out += [f"user {_check_controller_user(user)}", f"topic readwrite {TOPIC_ROOT}/#", ""]
    for shop, node in pairs:
        out += [*node_acl(shop, node), ""]
    shops = _shops(pairs)
    for shop in bridges:
        out += [f"# The bridge of shop {shop}'s broker (its certificate's CN); the shop broker enforces per-node ACLs.", *bridge_acl(shop, shops.get(shop, [])), ""]
    return "\n".join(out)


def shop_local_acl(shop: str, node: str) -> list[str]:
    """Return the extra ACL lines node user ``<shop>.<node>`` has on its shop broker only.

    The shop-local streams are bound to the identity that publishes them: a stream's topic
    carries the publisher's node (``local/v1/{shop}/tracks/{node}/{stream}``,
    ``local/v1/{shop}/detections/{node}/{camera}``), and each node user may write only under its
    own node, so one node's credentials cannot publish another node's camera or ``tracks/floor``
    (the broker drops it). Every node user of the shop may read the shop's streams (the floor and
    fusion pipelines, each a user of its own, read them; they accept a camera only from the node
    their config binds it to) and the shop's events, which a fusion pipeline joins. Nothing of
    another shop.
    """
    node = validate_id(node, "node id")
    return [
        *(f"topic write {Topics.local_filter(shop, kind, node)}" for kind in LocalStream),
        *(f"topic read {Topics.local_filter(shop, kind)}" for kind in LocalStream),
        f"topic read {Topics.root}/{shop}/+/{Channel.EVENTS.value}",
    ]


def render_shop_acl(shop: str, nodes: Sequence[str]) -> str:
    """Return the ACL of a shop broker: the shop's node users only, each as at the central broker."""
    out = [
        f"# Written by 'shopfleet broker-config --shop-broker {shop}': the same per-node rules as the",
        "# central broker, enforced at the edge, because the bridge carries the shop's traffic as one user.",
    ]
    for node in nodes:
        out += [*node_acl(shop, node), *shop_local_acl(shop, node), ""]
    return "\n".join(out)


def render_password_file(passwords: dict[str, str]) -> str:
    """Return a Mosquitto password file for ``{username: password}``."""
    return "".join(f"{user}:{hash_password(pw)}\n" for user, pw in sorted(passwords.items()))


def persistence_lines(sizing: QueueSizing, options: BrokerOptions, location: Path, who: str) -> list[str]:
    """Return the lines of a written broker config that decide what it keeps and delivers: persistence in ``location``,
    the queue sized by ``sizing``, ``max_inflight_messages`` and ``max_packet_size`` (``who`` names the queue's client in a comment).

    Shared by the central and shop configs, and by ``bench/scale.py``, which runs its Mosquitto with these lines so that its
    broker delivers as a deployed one does.
    """
    return [
        f"# Nothing lost while {who} is away: queued messages are persisted (a restart keeps them) and",
        f"# the queue holds {sizing.nodes} nodes x {sizing.rate_per_node:g} msg/s x {sizing.outage_s:g} s of outage",
        f"# (at most {sizing.message_bytes} bytes each on average). Mosquitto keeps the queue in RAM.",
        "persistence true",
        f"persistence_location {str(location).rstrip('/')}/",
        f"autosave_interval {options.autosave_interval}",
        f"max_queued_messages {sizing.messages}",
        f"max_queued_bytes {sizing.bytes}",
        "queue_qos0_messages false",
        "# QoS 1 messages sent to one client before its PUBACKs (Mosquitto's default 20 caps each",
        "# controller batch, which slows catching up after an outage); 0 means no limit.",
        f"max_inflight_messages {options.max_inflight}",
        "# The protocol refuses payloads above its own limit; the broker drops a client that sends more.",
        f"max_packet_size {options.max_packet_size}",
    ]


def logging_lines(dest: str | None) -> list[str]:
    """Return the ``log_dest``/``log_type`` lines that make Mosquitto log refused publishes, for ``shopfleet broker-denials``."""
    if dest is None:
        return []
    if any(c.isspace() for c in dest) or not dest:
        raise BrokerConfigError(f"--denial-log {dest!r}: give 'stdout', 'stderr' or a file path without blanks")
    target = dest if dest in ("stdout", "stderr") else f"file {dest}"
    return [
        "# Refused publishes are logged only at 'debug' (which also logs every packet: see docs/broker.md for",
        "# its cost); 'shopfleet broker-denials' reads this log and counts them by identity.",
        f"log_dest {target}",
        *(f"log_type {t}" for t in DENIAL_LOG_TYPES),
        "log_timestamp true",
        "connection_messages true",
    ]


def shop_server_names(shop: str, names: Sequence[str]) -> list[str]:
    """Return a shop broker's certificate names with ``{shop}`` replaced (the first is the CN)."""
    out = list(dict.fromkeys(n.replace("{shop}", shop) for n in names))
    if not out:
        raise BrokerConfigError("--shop-server-name: a shop broker needs at least one name for its certificate")
    return out


def _listener(port: int, bind: str | None) -> str:
    return f"listener {port} {bind}" if bind else f"listener {port}"


def render_central_conf(
    *,
    password_file: Path,
    acl_file: Path,
    sizing: QueueSizing,
    options: BrokerOptions,
    tls: tuple[Path, Path, Path, Path] | None,
) -> str:
    """Return the central broker's ``mosquitto.conf``; ``tls`` is (cafile, certfile, keyfile, crlfile) or None."""
    lines = [
        "# Written by 'shopfleet broker-config'. Run: mosquitto -c THIS-FILE (see docs/broker.md).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        *persistence_lines(sizing, options, options.persistence_dir, "the controller"),
        *logging_lines(options.denial_log),
        "",
    ]
    if options.port:
        lines += [
            "# Password listener: kept for nodes not yet given a certificate; close it (--port 0) once all have one.",
            _listener(options.port, options.bind),
            "# The broker replaces the client id with the username: no one can take another's session.",
            "use_username_as_clientid true",
            "",
        ]
    if tls is not None:
        cafile, certfile, keyfile, crlfile = tls
        lines += [
            "# Mutual-TLS listener (use this one): a client certificate from the fleet CA is required, its",
            "# CN is the username the ACL names and the client id; revoked certificates are in the CRL,",
            "# which Mosquitto reads at start and on reload: restart the broker after 'shopfleet pki revoke'.",
            _listener(options.tls_port, options.bind),
            f"cafile {cafile}",
            f"certfile {certfile}",
            f"keyfile {keyfile}",
            f"crlfile {crlfile}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "tls_version tlsv1.2",
            "",
        ]
    return "\n".join(lines)


def bridge_topics(shop: str, nodes: Sequence[str]) -> list[str]:
    """Return the bridge's ``topic`` lines: the shop's nodes' uplink out, their downlink in, nothing else.

    An explicit list, never a wildcard over the shop: shop-local topics (``local/v1/...``, the
    high-rate track stream fusion reads) must stay in the shop.
    """
    lines = []
    for node in nodes:
        lines += [f"topic {t} out 1" for t in _node_writes(shop, node)]
    lines += [f"topic {t} in 1" for node in nodes for t in _node_reads(shop, node)]
    lines += [f"topic {t} in 1" for t in _shop_reads(shop)]
    return lines


def render_shop_conf(
    shop: str,
    nodes: Sequence[str],
    *,
    install_dir: Path,
    central: str,
    sizing: QueueSizing,
    options: BrokerOptions,
) -> str:
    """Return the ``mosquitto.conf`` of a shop's broker: per-node users, edge ACL, TLS bridge to the central broker."""
    host, _, port = central.rpartition(":") if ":" in central else (central, "", "8883")
    location = options.shop_persistence_dir or options.persistence_dir
    lines = [
        f"# Written by 'shopfleet broker-config --shop-broker {shop}': the broker of shop {shop}, run on",
        "# the shop's host network for its nodes. See docs/broker.md.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {install_dir / 'passwd'}",
        f"acl_file {install_dir / 'acl'}",
        *persistence_lines(sizing, options, location, "the uplink"),
        *logging_lines(options.shop_denial_log.replace("{shop}", shop) if options.shop_denial_log else None),
        "",
    ]
    if options.shop_tls_port:
        lines += [
            "# Mutual-TLS listener for the shop's nodes (use this one): a client certificate from the fleet CA",
            "# is required and its CN (<shop>.<node>) is the username the ACL below names and the client id.",
            "# crl.pem is a copy: re-run broker-config and copy it here after 'shopfleet pki revoke', then",
            "# restart this broker.",
            _listener(options.shop_tls_port, None),
            f"cafile {install_dir / 'ca.crt'}",
            f"certfile {install_dir / 'server.crt'}",
            f"keyfile {install_dir / 'server.key'}",
            f"crlfile {install_dir / 'crl.pem'}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "tls_version tlsv1.2",
            "",
        ]
    if options.shop_port:
        lines += [
            "# Password listener for nodes not yet given a certificate; close it (--shop-port 0) once all have one.",
            _listener(options.shop_port, None),
            "use_username_as_clientid true",
            "",
        ]
    lines += [
        "# Bridge to the central broker's TLS listener with this shop's own certificate (CN",
        f"# {bridge_username(shop)}); only this shop's topics cross it, and the central ACL allows no more.",
        f"connection {CONNECTION_NAME}",
        f"address {host}:{port}",
        "bridge_protocol_version mqttv311",
        f"bridge_cafile {install_dir / 'ca.crt'}",
        f"bridge_certfile {install_dir / 'bridge.crt'}",
        f"bridge_keyfile {install_dir / 'bridge.key'}",
        "bridge_insecure false",
        f"remote_clientid {bridge_username(shop)}",
        "cleansession false",
        "notifications false",
        "try_private true",
        "restart_timeout 1 30",
        f"bridge_max_packet_size {options.max_packet_size}",
        *bridge_topics(shop, nodes),
        "",
    ]
    return "\n".join(lines)


def parse_node_lines(lines: Iterable[str], source: str = "<input>") -> list[tuple[str, str]]:
    """Parse ``shop/node`` lines (``#`` comments, blank lines allowed); raise ``BrokerConfigError`` naming the line."""
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        shop, sep, node = line.partition("/")
        if not sep:
            raise BrokerConfigError(f"{source}:{n}: {line!r} is not 'shop/node' (e.g. shop-a/pi-1)")
        try:
            validate_id(shop.strip(), "shop id")
            validate_id(node.strip(), "node id")
        except ValueError as exc:
            raise BrokerConfigError(f"{source}:{n}: {exc}") from None
        pair = (shop.strip(), node.strip())
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def parse_node_file(path: Path) -> list[tuple[str, str]]:
    """Read a node list file (see :func:`parse_node_lines`)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BrokerConfigError(f"cannot read node list {path}: {exc.strerror}") from None
    return parse_node_lines(text.splitlines(), str(path))


def _write_private(path: Path, text: str | bytes, mode: int = 0o600) -> None:
    """Write a file created with ``mode`` from the start (never briefly world-readable)."""
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    """Return (uid, gid) of ``owner``, after checking this process may chown to it."""
    if owner is None:
        return None
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise BrokerConfigError(f"--owner {owner}: no such user on this machine (Mosquitto's packages create 'mosquitto')") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise BrokerConfigError(f"--owner {owner} needs root to change file owners: run with sudo, or omit --owner and chown the files the broker reads (docs/broker.md)")
    return pw.pw_uid, pw.pw_gid


def _load_credentials(path: Path) -> tuple[dict[str, str], list[str]]:
    """Return ({username: password}, controller usernames in order) from an existing credentials file."""
    if not path.exists():
        return {}, []
    try:
        data = json.loads(path.read_text())
        controllers = data.get("controllers") or [data["controller"]]
        known = {e["username"]: e["password"] for e in [*controllers, *data["nodes"].values()]}
        return known, [e["username"] for e in controllers]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BrokerConfigError(f"{path} is not a credentials file this command wrote ({exc}); move it away to start afresh") from None


def _choose_controllers(options: BrokerOptions, known: list[str], controller_user: str | None) -> list[str]:
    if controller_user is not None:
        return [_check_controller_user(controller_user)]
    if options.controller_users:
        return [_check_controller_user(u) for u in dict.fromkeys(options.controller_users)]
    if options.controller_replicas < 1:
        raise BrokerConfigError(f"--controller-replicas {options.controller_replicas}: at least one controller is needed")
    users = known[: options.controller_replicas]
    while len(users) < options.controller_replicas:
        users.append(new_controller_username())
    return users


def write_broker_config(
    pairs: Sequence[tuple[str, str]],
    out: Path,
    *,
    controller_user: str | None = None,
    options: BrokerOptions | None = None,
) -> BrokerFiles:
    """Write passwd, acl, mosquitto.conf and credentials.json (0600) into ``out``; keep known passwords.

    With ``options.pki_dir`` (a CA made by ``shopfleet pki init``) also issue the missing
    certificates (the broker's server certificate, one per node, controller and bridge) and
    write the TLS listener; with ``options.shop_brokers`` write ``out/shops/<shop>/``.
    ``controller_user`` (one name) overrides ``options.controller_users``.
    """
    options = options or BrokerOptions()
    for shop, node in pairs:
        try:
            node_username(shop, node)
        except ValueError as exc:
            raise BrokerConfigError(str(exc)) from None
    if not 1 <= options.max_packet_size <= 268435455:
        raise BrokerConfigError(f"--max-packet-size {options.max_packet_size}: use 1..268435455 (MQTT's limit)")
    if options.max_packet_size < DEFAULT_MAX_PACKET_SIZE:
        raise BrokerConfigError(
            f"--max-packet-size {options.max_packet_size} is below what the protocol allows ({MAX_PAYLOAD_BYTES} bytes of payload "
            f"+ {PACKET_OVERHEAD}); the broker would drop valid messages. Use at least {DEFAULT_MAX_PACKET_SIZE}"
        )
    if options.max_inflight < 0 or options.max_inflight > 65535:
        raise BrokerConfigError(
            f"--max-inflight {options.max_inflight}: use 1..65535 (MQTT's packet-id space), or 0 for no limit; "
            f"the default {DEFAULT_MAX_INFLIGHT} fills two controller batches"
        )
    if options.autosave_interval < 1:
        raise BrokerConfigError(f"--autosave-interval {options.autosave_interval}: use 1 second or more")
    shops = _shops(pairs)
    shop_brokers = list(shops) if tuple(options.shop_brokers) == ("all",) else list(dict.fromkeys(options.shop_brokers))
    for shop in shop_brokers:
        if shop not in shops:
            raise BrokerConfigError(f"--shop-broker {shop}: no node of that shop is in the node list; add them (--shop {shop} --node ...)")
    if shop_brokers and not options.central:
        raise BrokerConfigError("--shop-broker needs --central HOST[:PORT]: the central broker's TLS listener the bridges connect to")
    if shop_brokers and options.pki_dir is None:
        raise BrokerConfigError("--shop-broker needs --pki DIR: the bridges authenticate to the central broker with certificates")
    if shop_brokers and not options.shop_port and not options.shop_tls_port:
        raise BrokerConfigError("--shop-port 0 and --shop-tls-port 0: a shop broker needs a listener for its nodes; keep --shop-tls-port")
    if shop_brokers and options.shop_port and options.shop_port == options.shop_tls_port:
        raise BrokerConfigError(f"--shop-port and --shop-tls-port are both {options.shop_port}: give them different ports")
    logging_lines(options.denial_log)  # validates the destination before anything is written
    ids = _owner_ids(options.owner)
    sizing = QueueSizing(len(pairs), options.rate_per_node, options.outage_s, options.message_bytes)

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    creds_path = out / "credentials.json"
    known, known_controllers = _load_credentials(creds_path)
    controllers = _choose_controllers(options, known_controllers, controller_user)
    generated = 0

    def password_for(user: str) -> str:
        nonlocal generated
        if user not in known:
            known[user] = secrets.token_urlsafe(32)
            generated += 1
        return known[user]

    ctl_creds = [{"username": u, "password": password_for(u)} for u in controllers]
    creds: dict[str, Any] = {
        "controller": ctl_creds[0],
        "controllers": ctl_creds,
        "nodes": {f"{s}/{n}": {"username": node_username(s, n), "password": password_for(node_username(s, n))} for s, n in pairs},
    }

    tls = None
    issued = 0
    if options.pki_dir is not None:
        from fleet_controller.pki import Pki, PkiError

        pki = Pki(options.pki_dir)
        names = list(options.server_names) or [socket.getfqdn(), "localhost", "127.0.0.1"]
        wanted: list[tuple[str, str, Sequence[str]]] = [("server", names[0], names[1:])]
        wanted += [("controller", u, ()) for u in controllers]
        wanted += [("node", f"{s}/{n}", ()) for s, n in pairs]
        wanted += [("bridge", s, ()) for s in shop_brokers]
        if options.shop_tls_port:
            for s in shop_brokers:
                shop_names = shop_server_names(s, options.shop_server_names)
                wanted.append(("server", shop_names[0], shop_names[1:]))
        try:
            issued = len(pki.ensure(wanted))
        except PkiError as exc:
            raise BrokerConfigError(str(exc)) from None
        server = names[0]
        tls = (pki.ca_cert_path.resolve(), pki.cert_path(server).resolve(), pki.key_path(server).resolve(), pki.crl_path.resolve())

    users = {c["username"]: c["password"] for c in ctl_creds}
    users.update({e["username"]: e["password"] for e in creds["nodes"].values()})
    _write_private(creds_path, json.dumps(creds, indent=2) + "\n")
    passwd = out / "passwd"
    _write_private(passwd, render_password_file(users))
    acl_path = out / "acl"
    _write_private(acl_path, render_acl(pairs, controllers, bridges=shop_brokers), 0o640)
    conf = out / "mosquitto.conf"
    _write_private(conf, render_central_conf(password_file=passwd, acl_file=acl_path, sizing=sizing, options=options, tls=tls), 0o644)
    broker_reads: list[Path] = [passwd, acl_path, conf]
    if tls is not None:
        broker_reads.append(tls[2])  # the server key (0600); the certificates and CRL are 0644
    persist_dirs = [options.persistence_dir]

    shop_dirs: dict[str, Path] = {}
    for shop in shop_brokers:
        d = out / "shops" / shop
        d.mkdir(parents=True, exist_ok=True)
        install = Path(options.shop_install_dir.replace("{shop}", shop)) if options.shop_install_dir else d
        nodes = shops[shop]
        _write_private(d / "passwd", render_password_file({node_username(shop, n): known[node_username(shop, n)] for n in nodes}))
        _write_private(d / "acl", render_shop_acl(shop, nodes), 0o640)
        shop_sizing = QueueSizing(len(nodes), options.rate_per_node, options.outage_s, options.message_bytes)
        _write_private(d / "mosquitto.conf", render_shop_conf(shop, nodes, install_dir=install, central=options.central or "", sizing=shop_sizing, options=options), 0o644)
        cn = bridge_username(shop)
        shutil.copyfile(pki.ca_cert_path, d / "ca.crt")
        shutil.copyfile(pki.cert_path(cn), d / "bridge.crt")
        _write_private(d / "bridge.key", pki.key_path(cn).read_bytes())
        broker_reads += [d / "passwd", d / "acl", d / "mosquitto.conf", d / "bridge.key"]
        if options.shop_tls_port:
            # The node-facing TLS listener: this shop's own server certificate, and the CRL as of now.
            server_cn = shop_server_names(shop, options.shop_server_names)[0]
            shutil.copyfile(pki.cert_path(server_cn), d / "server.crt")
            _write_private(d / "server.key", pki.key_path(server_cn).read_bytes())
            shutil.copyfile(pki.crl_path, d / "crl.pem")
            for public in ("ca.crt", "bridge.crt", "server.crt", "crl.pem"):
                os.chmod(d / public, 0o644)
            broker_reads.append(d / "server.key")
        persist_dirs.append(options.shop_persistence_dir or options.persistence_dir)
        shop_dirs[shop] = d

    for p in dict.fromkeys(persist_dirs):
        p.mkdir(parents=True, exist_ok=True)
    if options.denial_log not in (None, "stdout", "stderr"):
        # Mosquitto opens its log after dropping to its user: create the file for it (0640).
        log_file = Path(str(options.denial_log))
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if not log_file.exists():
            _write_private(log_file, b"", 0o640)
        broker_reads.append(log_file)
    if ids is not None:
        for p in [*broker_reads, *dict.fromkeys(persist_dirs)]:
            os.chown(p, *ids)
    return BrokerFiles(passwd, acl_path, conf, creds_path, generated, tuple(controllers), sizing, shop_dirs, issued, tls is not None)
