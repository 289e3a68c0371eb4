"""Node credentials: enrollment with one-time tokens, rotation, revocation that reaches the broker.

The pieces: one-time tokens (:mod:`fleet_controller.registry.enrollment`), the fleet CA
(:mod:`fleet_controller.pki`), the broker's password file, and a way to make the broker re-read
its CRL and password file. :class:`NodeCredentials` puts them together for the API
(:mod:`fleet_controller.web.enrollment_api`) and the CLI (``shopfleet enroll-token``).

* **Enroll**: a token (unused, unexpired, bound to shop and node) and a CSR made on the node give
  the node a certificate ``<shop>.<node>`` signed by the CA; the token is used up in the same
  transaction. An enrollment supersedes the node's earlier certificates (revoked, the broker
  reloaded): one node, one live certificate.
* **Rotate**: a new token for an existing node; its old certificate keeps working until the node
  enrolls with the new token (that is the grace period), or is revoked at once with
  ``revoke_previous``.
* **Revoke**: every certificate of the node goes on the CRL, its password-file entry is removed,
  its ``user`` block leaves the broker's ACL file (``acl_file``), and the broker reloads
  (``reload_command``, or SIGHUP to the pid in ``reload_pid_file``). Mosquitto re-reads
  ``crlfile``, ``password_file`` and ``acl_file`` on SIGHUP; a reload refuses new connections of
  the revoked node but does **not** end one it already has open (measured on Mosquitto 2.0.11,
  see docs/security.md). Without its ACL block that open connection may no longer publish, and
  nothing more is delivered to it (the broker applies the reloaded ACL to open sessions); a
  restart ends it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine

from edge_agent.protocol import Channel, Topics
from fleet_controller.pki import CertRecord, Pki, PkiError, node_cn
from fleet_controller.registry.enrollment import (
    EnrollmentError,
    EnrollmentToken,
    EnrollmentTokens,
    parse_ttl,
)
from fleet_controller.settings import EnrollmentSettings
from shopfleet.files import write_atomic

log = logging.getLogger(__name__)

RELOAD_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Enrolled:
    """What an enrollment gives the node."""

    shop: str
    node: str
    cn: str
    serial: str
    not_after: str
    certificate_pem: str
    ca_pem: str
    broker_host: str | None
    broker_port: int | None
    token_id: int
    superseded: tuple[str, ...] = ()
    broker_reload: str = "not_needed"

    def response(self) -> dict[str, Any]:
        """Return the JSON body of ``POST /api/v1/enroll``."""
        broker = {"host": self.broker_host, "port": self.broker_port} if self.broker_host else None
        return {"shop": self.shop, "node": self.node, "cn": self.cn, "serial": self.serial, "not_after": self.not_after,
                "certificate": self.certificate_pem, "ca_certificate": self.ca_pem, "broker": broker}


@dataclass(frozen=True)
class Revoked:
    """What a revocation did."""

    shop: str
    node: str
    cn: str
    serials: tuple[str, ...]
    password_removed: bool
    broker_reload: str
    details: dict[str, Any] = field(default_factory=dict)
    acl_removed: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"shop": self.shop, "node": self.node, "cn": self.cn, "revoked_serials": list(self.serials),
                "password_removed": self.password_removed, "acl_removed": self.acl_removed,
                "broker_reload": self.broker_reload}


def _drop_lines(path: Path, keep: Callable[[list[str]], list[str]]) -> bool:
    """Rewrite a broker file with the lines ``keep`` returns, keeping its mode and owner; return whether any went.

    Written to a temporary file in the same directory and renamed over the original, so the broker
    never reads half a file. A missing file has nothing to drop.
    """
    try:
        st = path.stat()
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return False
    kept = keep(lines)
    if len(kept) == len(lines):
        return False
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    write_atomic(path, "".join(kept).encode(), st.st_mode & 0o7777, owner)
    return True


def remove_password_entry(path: Path, username: str) -> bool:
    """Remove ``username``'s line from a Mosquitto password file, keeping its mode and owner; return whether it had one."""
    return _drop_lines(path, lambda lines: [line for line in lines if line.split(":", 1)[0] != username])


def remove_acl_user(path: Path, username: str, topics: frozenset[str] = frozenset()) -> bool:
    """Remove ``username``'s rights from a Mosquitto ACL file, keeping its mode and owner; return whether it had any.

    Mosquitto gives the ``topic`` lines after a ``user NAME`` line to that user, up to the next
    ``user`` or ``pattern`` line. The ``user`` line and those ``topic`` lines are removed; comments and
    blank lines stay (a ``topic`` line left behind would fall to the user above it). Every ``topic``
    line naming exactly one of ``topics`` (the node's own ``fleet/v1/{shop}/{node}/...``) goes too,
    whoever it belongs to: the shop bridge's user carries each of its nodes' topics, and would
    otherwise keep carrying the revoked node's.
    """

    def keep(lines: list[str]) -> list[str]:
        kept: list[str] = []
        inside = False
        for line in lines:
            words = line.split()
            head = words[0] if words else ""
            if head in ("user", "pattern"):
                inside = head == "user" and " ".join(words[1:]) == username
                if inside:
                    continue
            elif head == "topic" and (inside or words[-1] in topics):
                continue
            kept.append(line)
        return kept

    return _drop_lines(path, keep)


class BrokerReloader:
    """Make the broker re-read its CRL and password file: a command, or SIGHUP to a pid file's process."""

    def __init__(self, command: tuple[str, ...] = (), pid_file: Path | None = None) -> None:
        self.command = tuple(command)
        self.pid_file = pid_file

    @property
    def configured(self) -> bool:
        """Return whether there is any way to reload."""
        return bool(self.command) or self.pid_file is not None

    def reload(self) -> str:
        """Reload the broker; return ``ok``, ``not_configured`` or ``failed: <why>`` (never raises)."""
        if self.command:
            try:
                done = subprocess.run(self.command, capture_output=True, text=True, timeout=RELOAD_TIMEOUT_S, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"failed: {' '.join(self.command)}: {exc}"
            if done.returncode != 0:
                return f"failed: {' '.join(self.command)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[:300]}"
            return "ok"
        if self.pid_file is not None:
            try:
                pid = int(self.pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGHUP)
            except (OSError, ValueError, IndexError) as exc:
                return f"failed: SIGHUP to the pid in {self.pid_file}: {exc}"
            return "ok"
        return "not_configured"


class NodeCredentials:
    """Enroll, rotate and revoke node credentials (see the module docstring)."""

    def __init__(self, settings: EnrollmentSettings, engine: Engine, *, clock: Callable[[], float] = time.time,
                 on_reload: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.tokens = EnrollmentTokens(engine, clock)
        self.pki = Pki(settings.pki_dir)
        self.reloader = BrokerReloader(settings.reload_command, settings.reload_pid_file)
        self.on_reload = on_reload or (lambda _result: None)
        host, _, port = (settings.broker_address or "").rpartition(":")
        self.broker_host = host or None
        self.broker_port = int(port) if port else None

    def check(self) -> None:
        """Raise ``PkiError`` if the CA is not usable (called at start, so a bad pki_dir fails early)."""
        self.pki._ca()

    def reload_broker(self) -> str:
        """Reload the broker and report the result (logged, and passed to ``on_reload`` for the metric)."""
        result = self.reloader.reload()
        if result.startswith("failed"):
            log.error("broker reload after a credential change %s: the broker still uses the old CRL/password file; "
                      "reload it by hand (kill -HUP its pid, or systemctl reload mosquitto)", result)
        elif result == "not_configured":
            log.warning("credentials changed but enrollment.reload_command/reload_pid_file is unset: reload the broker by hand")
        self.on_reload(result)
        return result

    # ----- tokens ---------------------------------------------------------------------------

    def create_token(self, shop: str, node: str, ttl: str | float | None, created_by: str) -> tuple[str, EnrollmentToken]:
        """Return (token, record) for a new node; ``ttl`` None uses ``token_ttl_s``."""
        return self.tokens.create(shop, node, parse_ttl(self.settings.token_ttl_s if ttl is None else ttl), created_by)

    # ----- enrollment -----------------------------------------------------------------------

    def enroll(self, token: str, csr_pem: str, source: str) -> Enrolled:
        """Redeem ``token`` and sign ``csr_pem``; raise ``TokenRefused`` or ``PkiError`` (token then unused)."""
        ca_pem = self.pki.ca_cert_path.read_text()
        previous: list[str] = []

        def issue(rec: EnrollmentToken, _conn: Connection) -> tuple[CertRecord, bytes]:
            cn = node_cn(rec.shop, rec.node)
            previous.extend(r.serial for r in self.pki.records() if r.cn == cn and not r.revoked)
            return self.pki.sign_csr(rec.shop, rec.node, csr_pem, days=self.settings.cert_days, revoke_previous=True)

        rec, (cert, pem) = self.tokens.redeem(token, source, issue)
        reload = self.reload_broker() if previous else "not_needed"
        return Enrolled(rec.shop, rec.node, cert.cn, cert.serial, cert.not_after, pem.decode(), ca_pem,
                        self.broker_host, self.broker_port, rec.id, tuple(previous), reload)

    # ----- rotation and revocation ------------------------------------------------------------

    def certificates(self, shop: str, node: str) -> list[CertRecord]:
        """Return every certificate the CA issued to the node, oldest first."""
        cn = self._cn(shop, node)
        return [r for r in self.pki.records() if r.cn == cn]

    def revoke(self, shop: str, node: str) -> Revoked:
        """Revoke every certificate of the node, remove its password entry, reload the broker.

        Raise ``EnrollmentError`` if the node has neither a live certificate nor a password entry.
        """
        cn = self._cn(shop, node)
        live = [r for r in self.pki.records() if r.cn == cn and not r.revoked]
        serials: tuple[str, ...] = ()
        if live:
            serials = tuple(r.serial for r in self.pki.revoke(cn))
        pw, acl = self.settings.password_file, self.settings.acl_file
        removed = pw is not None and remove_password_entry(pw, cn)
        acl_removed = acl is not None and remove_acl_user(acl, cn, frozenset(Topics.node(shop, node, ch) for ch in Channel))
        if not serials and not removed and not acl_removed:
            raise EnrollmentError(f"node {shop}/{node} has no live certificate (CN {cn}), no password entry and no ACL "
                                  "block: nothing to revoke")
        reload = self.reload_broker()
        log.warning("credentials of %s revoked: certificates %s, password entry %s, ACL block %s, broker reload %s",
                    cn, ", ".join(serials) or "none", "removed" if removed else "none",
                    "removed" if acl_removed else ("none" if acl is not None else "not configured"), reload)
        return Revoked(shop, node, cn, serials, removed, reload, acl_removed=acl_removed)

    def rotate(self, shop: str, node: str, ttl: str | float | None, created_by: str, *,
               revoke_previous: bool) -> tuple[str, EnrollmentToken, Revoked | None]:
        """Return a new token for the node (and, with ``revoke_previous``, revoke its credentials now)."""
        self._cn(shop, node)
        revoked = None
        if revoke_previous:
            try:
                revoked = self.revoke(shop, node)
            except EnrollmentError:
                revoked = None  # nothing live to revoke: the token alone is the rotation
        token, rec = self.create_token(shop, node, ttl, created_by)
        return token, rec, revoked

    @staticmethod
    def _cn(shop: str, node: str) -> str:
        try:
            return node_cn(shop, node)
        except ValueError as exc:
            raise EnrollmentError(str(exc)) from None


__all__ = ["BrokerReloader", "Enrolled", "EnrollmentError", "NodeCredentials", "PkiError", "Revoked", "remove_password_entry"]
