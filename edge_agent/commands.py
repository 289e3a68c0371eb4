"""Signed commands: what the agent checks before it runs a command, and the built-in remote actions.

A command makes the node do something (restart a pipeline, tare a scale), so like a desired state
it must prove it comes from the controller. The controller signs each
:class:`~edge_agent.protocol.Command` with its ed25519 key (the one that signs desired states);
the agent holds the public key(s) in ``commands.public_keys`` and :class:`CommandGuard` refuses,
with a reason the reply carries back:

* ``unsigned``: no signature (only ``ping`` may come unsigned: it changes nothing and answers only
  "alive", the queue depth and the session, which the node's heartbeats publish anyway);
* ``no_keys``: a signed command but no ``commands.public_keys`` configured (this node takes no
  remote actions until it is given the controller's public key);
* ``wrong_target``: signed for another shop or node (a copy published to this node's topic);
* ``unknown_key`` / ``forged``: not signed by a trusted key, or altered after signing;
* ``replay``: its ``counter`` is not above the last accepted one (kept in memory and in
  ``commands.state_path``, so a restart does not reopen the window);
* ``expiry_too_far``: an expiry further ahead than ``commands.max_ttl_s`` (the signature is
  valid, but a long-lived command would widen the window a lost state file reopens).

Expired commands never get here: the agent ignores them before (protocol: ``expires_at``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shopfleet.errors import PermanentError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edge_agent.protocol import Command
    from edge_agent.supervisor import Supervisor

UNSIGNED_ALLOWED = frozenset({"ping"})
"""Commands a node runs without a signature. Keep it to what changes nothing."""


class CommandRefused(PermanentError):
    """A command the agent must not run; ``reason`` is a short stable code (metric label), the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"refused: {reason}: {detail}", reason=reason)
        self.detail = detail


class CommandGuard:
    """Check commands for this node: signature, target, counter, expiry bound. Thread-safe."""

    def __init__(self, shop: str, node: str, keys: Iterable[Ed25519PublicKey], state_path: str | os.PathLike[str] | None,
                 *, max_ttl_s: float = 3600.0) -> None:
        keys = list(keys)
        self.shop = shop
        self.node = node
        self._keys: dict[str, Ed25519PublicKey] = {}
        if keys:  # cryptography is loaded only by an agent that trusts a key
            from edge_agent.apply.verify import public_key_id

            self._keys = {public_key_id(k): k for k in keys}
        self.state_path = Path(state_path) if state_path else None
        self.max_ttl_s = max_ttl_s
        self._lock = threading.Lock()
        self._highest = self._load()

    @classmethod
    def from_files(cls, shop: str, node: str, paths: Iterable[str | os.PathLike[str]], state_path: str | os.PathLike[str] | None,
                   *, max_ttl_s: float = 3600.0) -> CommandGuard:
        """Return a guard trusting the PEM public keys in ``paths`` (none: only unsigned ``ping`` passes)."""
        paths = list(paths)
        keys: list[Ed25519PublicKey] = []
        if paths:
            from edge_agent.apply.verify import load_public_key

            keys = [load_public_key(Path(p).read_bytes(), str(p)) for p in paths]
        return cls(shop, node, keys, state_path, max_ttl_s=max_ttl_s)

    @property
    def highest_counter(self) -> int:
        """Return the highest counter accepted so far."""
        with self._lock:
            return self._highest

    def _load(self) -> int:
        if self.state_path is None:
            return 0
        try:
            return max(0, int(json.loads(self.state_path.read_text())["highest_counter"]))
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError):
            return 0  # expiry still bounds what a replay can do; the next accepted command rewrites the file

    def _save(self, counter: int) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with contextlib.suppress(OSError):  # memory still holds it for this process's lifetime
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(json.dumps({"highest_counter": counter}))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)

    def check(self, cmd: Command, now: float) -> None:
        """Return if ``cmd`` may run (and remember its counter), else raise :class:`CommandRefused`."""
        sig = cmd.signature
        if sig is None:
            if cmd.name in UNSIGNED_ALLOWED:
                return
            raise CommandRefused("unsigned", f"command {cmd.name!r} carries no signature; only {', '.join(sorted(UNSIGNED_ALLOWED))} "
                                 "may come unsigned")
        if not self._keys:
            raise CommandRefused("no_keys", "this node has no commands.public_keys: copy the controller's .pub file to the node "
                                 "and list it under commands.public_keys")
        if cmd.shop != self.shop or cmd.node != self.node:
            raise CommandRefused("wrong_target", f"signed for {cmd.shop}/{cmd.node}, this is {self.shop}/{self.node}")
        key = self._keys.get(sig.key_id)
        if key is None:
            raise CommandRefused("unknown_key", f"signed by key {sig.key_id!r}; trusted keys are {sorted(self._keys)}")
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(base64.b64decode(sig.sig, validate=True), cmd.signing_bytes())
        except (InvalidSignature, binascii.Error, ValueError):
            raise CommandRefused("forged", f"signature of command {cmd.name!r} ({cmd.correlation_id}) does not match its content") from None
        if cmd.expires_at - now > self.max_ttl_s:
            raise CommandRefused("expiry_too_far", f"expires in {cmd.expires_at - now:.0f} s, more than commands.max_ttl_s "
                                 f"({self.max_ttl_s:.0f} s)")
        with self._lock:
            if cmd.counter is None or cmd.counter <= self._highest:
                raise CommandRefused("replay", f"counter {cmd.counter} is not above {self._highest}, the last accepted "
                                     "(a replayed or reordered command)")
            self._highest = cmd.counter
            self._save(cmd.counter)


def restart_pipeline(supervisor: Supervisor, cmd: Command, stop_timeout_s: float = 10.0) -> dict[str, Any]:
    """Restart the pipeline ``cmd.args['pipeline']``: stop it, start it again (also one that gave up, state ``failed``)."""
    name = cmd.args.get("pipeline")
    runner = supervisor.runners.get(name) if isinstance(name, str) else None
    if runner is None:
        raise ValueError(f"no pipeline {name!r} on this node; it runs: {', '.join(sorted(supervisor.runners)) or 'none'}")
    before = runner.state
    runner.stop(stop_timeout_s)
    thread = getattr(runner, "_thread", None)
    if thread is not None and thread.is_alive():
        raise RuntimeError(f"pipeline {name} did not stop within {stop_timeout_s:.0f} s; not restarted (two copies would run)")
    runner.start()
    return {"pipeline": name, "was": before, "state": runner.state}
