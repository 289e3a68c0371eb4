"""Mosquitto password and ACL files that enforce shop isolation: a node reaches only its own shop's topics.

Each node gets its own user ``<shop>.<node>`` (ids cannot contain ``.``, so this never collides
with another node or with the controller user, which has no dot). The ACL is rendered by the pure
function :func:`render_acl`; per-user ``topic`` lines rather than ``pattern`` lines, because a
pattern cannot split a username into shop and node.

A node may write: its own ``presence``, ``telemetry``, ``events`` and ``replies`` topics, and its
shop's ``state/reported``. It may read: its own ``commands``, its shop's ``state/desired`` and the
controller's presence and clock. The controller reads and writes all of ``fleet/v1/#``.

Passwords are hashed as Mosquitto 2 does (``$7$``: PBKDF2-HMAC-SHA512, 12-byte salt, base64),
written here rather than by calling ``mosquitto_passwd`` so no broker package is needed on the
machine that generates the files; the test suite checks a real Mosquitto accepts them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol import TOPIC_ROOT, Channel, Topics, validate_id

PBKDF2_ITERATIONS = 101
"""mosquitto_passwd's default. More iterations resist offline cracking of a stolen file better,
but every connection costs the broker that much CPU; the passwords are 32 random bytes anyway."""
SALT_BYTES = 12


class BrokerConfigError(ValueError):
    """Input that cannot be turned into broker files; the message says what to fix."""


@dataclass(frozen=True)
class BrokerFiles:
    """Paths written by :func:`write_broker_config`, and how many passwords were new."""

    password_file: Path
    acl_file: Path
    conf_file: Path
    credentials_file: Path
    generated: int


def node_username(shop: str, node: str) -> str:
    """Return the MQTT username of a node: ``<shop>.<node>``."""
    return f"{validate_id(shop, 'shop id')}.{validate_id(node, 'node id')}"


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


def node_acl(shop: str, node: str) -> list[str]:
    """Return the ACL lines of one node user."""
    lines = [f"user {node_username(shop, node)}"]
    for ch in (Channel.PRESENCE, Channel.TELEMETRY, Channel.EVENTS, Channel.REPLIES):
        lines.append(f"topic write {Topics.node(shop, node, ch)}")
    lines += [
        f"topic write {Topics.reported(shop)}",
        f"topic read {Topics.node(shop, node, Channel.COMMANDS)}",
        f"topic read {Topics.desired(shop)}",
        f"topic read {Topics.controller_presence}",
        f"topic read {Topics.controller_clock}",
    ]
    return lines


def render_acl(pairs: Sequence[tuple[str, str]], controller_user: str = "controller") -> str:
    """Return a Mosquitto ACL file for the controller and each (shop, node)."""
    if "." in controller_user or not controller_user:
        raise BrokerConfigError(f"controller user {controller_user!r} must be non-empty and contain no '.' (node users do)")
    out = [
        "# Written by 'shopfleet broker-config'. Nodes may write only their own topics and read only",
        "# their own commands, their shop's desired state and the controller's presence and clock.",
        f"user {controller_user}",
        f"topic readwrite {TOPIC_ROOT}/#",
        "",
    ]
    for shop, node in pairs:
        out += [*node_acl(shop, node), ""]
    return "\n".join(out)


def render_password_file(passwords: dict[str, str]) -> str:
    """Return a Mosquitto password file for ``{username: password}``."""
    return "".join(f"{user}:{hash_password(pw)}\n" for user, pw in sorted(passwords.items()))


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


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def write_broker_config(pairs: Sequence[tuple[str, str]], out: Path, *, controller_user: str = "controller") -> BrokerFiles:
    """Write passwd, acl, mosquitto.conf and credentials.json (0600) into ``out``; keep known passwords."""
    for shop, node in pairs:
        try:
            node_username(shop, node)
        except ValueError as exc:
            raise BrokerConfigError(str(exc)) from None
    acl = render_acl(pairs, controller_user)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    creds_path = out / "credentials.json"
    known: dict[str, str] = {}
    if creds_path.exists():
        try:
            data = json.loads(creds_path.read_text())
            known = {e["username"]: e["password"] for e in [data["controller"], *data["nodes"].values()]}
        except (ValueError, KeyError, TypeError) as exc:
            raise BrokerConfigError(f"{creds_path} is not a credentials file this command wrote ({exc}); move it away to start afresh") from None
    generated = 0

    def password_for(user: str) -> str:
        nonlocal generated
        if user not in known:
            known[user] = secrets.token_urlsafe(32)
            generated += 1
        return known[user]

    controller_creds = {"username": controller_user, "password": password_for(controller_user)}
    node_creds = {f"{s}/{n}": {"username": node_username(s, n), "password": password_for(node_username(s, n))} for s, n in pairs}
    creds = {"controller": controller_creds, "nodes": node_creds}
    users = {controller_creds["username"]: controller_creds["password"]}
    users.update({e["username"]: e["password"] for e in node_creds.values()})
    _write_private(creds_path, json.dumps(creds, indent=2) + "\n")
    passwd = out / "passwd"
    _write_private(passwd, render_password_file(users))
    acl_path = out / "acl"
    acl_path.write_text(acl)
    conf = out / "mosquitto.conf"
    conf.write_text(
        "# Include from your mosquitto.conf, or run: mosquitto -c this-file (add a listener line).\n"
        "allow_anonymous false\n"
        f"password_file {passwd.resolve()}\n"
        f"acl_file {acl_path.resolve()}\n"
    )
    return BrokerFiles(passwd, acl_path, conf, creds_path, generated)
