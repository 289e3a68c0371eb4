"""Check that a desired state comes from the controller and is newer than what was applied.

The agent holds the controller's ed25519 public key(s) (several during a key rotation) and the
revision it last applied, persisted in a small JSON file written atomically (write to a temp file,
fsync, rename), so a replayed old message is refused even after a reboot. Beside it the store
keeps the signed desired state being applied (``<state>.desired.json``): an agent that replaced
its own pod, or restarted mid-apply, resumes from it, and drift correction re-applies it; it is
verified again when loaded, so the file grants no trust of its own. Verification is over
``DesiredState.signing_bytes()``, the same canonical bytes the controller signed.

**Replay and downgrade without local state.** The applied revision alone is not enough: delete
``applied.json`` and a captured, validly signed older revision would be applied again. So the
agent also keeps a *high-water mark*: the highest revision of any validly signed desired state it
has seen, whether applied or not (:class:`HighWater`). It is raised by every signed message the
agent receives, first of all the shop's **retained** desired state, which the broker delivers on
every (re)connection and which only the controller can write (broker ACL); it lives in memory
for the process's lifetime and in a second file (``<state>.seen``). A desired state below the
mark is refused as a replay. So after the state file is lost, the retained message re-teaches the
agent the newest revision before anything else it receives. docs/security.md says what this does
not stop (an agent with no files behind a rogue broker).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.apply.errors import ReplayRefused, SignatureInvalid, StateRefused, StateStoreCorrupt
from edge_agent.protocol import DesiredState


def public_key_id(key: Ed25519PublicKey) -> str:
    """Return a public key's fingerprint: 16 hex digits of SHA-256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(data: bytes, source: str = "(key)") -> Ed25519PublicKey:
    """Parse a PEM ed25519 public key, or raise ``ValueError`` naming the source and the fix."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source} is not a PEM public key ({exc}): copy the controller's .pub file") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{source} holds a {type(key).__name__}, not an ed25519 key: copy the controller's .pub file")
    return key


class Verifier:
    """Verify desired-state signatures against a set of trusted public keys."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {public_key_id(k): k for k in keys}
        if not self._keys:
            raise ValueError("no trusted public key: set apply.public_keys to the controller's .pub file(s)")

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> Verifier:
        """Return a verifier trusting the PEM public keys in ``paths``."""
        return cls(load_public_key(Path(p).read_bytes(), str(p)) for p in paths)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Return the ids of the trusted keys."""
        return tuple(self._keys)

    def verify(self, state: DesiredState) -> None:
        """Return if the signature is valid, else raise ``SignatureInvalid`` with the reason."""
        sig = state.signature
        if sig is None:
            raise SignatureInvalid("unsigned", f"revision {state.revision} carries no signature")
        key = self._keys.get(sig.key_id)
        if key is None:
            raise SignatureInvalid("unknown_key", f"signed by key {sig.key_id!r}, trusted keys are {sorted(self._keys)}")
        try:
            raw = base64.b64decode(sig.sig, validate=True)
            key.verify(raw, state.signing_bytes())
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureInvalid("forged", f"signature of revision {state.revision} does not match its content") from None


@dataclass(frozen=True)
class AppliedRecord:
    """What the agent last applied: the revision, its release, and whether it succeeded."""

    revision: int = 0
    release: str | None = None
    status: str = "none"  # "applying" | "retrying" | "applied" | "failed" | "none"

    @property
    def unfinished(self) -> bool:
        """Return True when an apply of ``revision`` started and has not reached applied or failed."""
        return self.status in ("applying", "retrying")


class RevisionStore:
    """The last applied revision, persisted atomically in a JSON file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> AppliedRecord:
        """Return the stored record; a missing file means nothing applied yet."""
        try:
            data = json.loads(self.path.read_text())
            return AppliedRecord(int(data["revision"]), data.get("release"), str(data.get("status", "applied")))
        except FileNotFoundError:
            return AppliedRecord()
        except (ValueError, KeyError, TypeError) as exc:
            # A corrupt file must not unlock replays: refuse until an operator looks at it.
            raise StateStoreCorrupt(f"{self.path} is corrupt ({exc}): restore it or delete it to accept the next desired state") from None

    @property
    def seen_path(self) -> Path:
        """Return the file of the :class:`HighWater` mark (beside the state file, separate from it)."""
        return self.path.with_name(self.path.name + ".seen")

    @property
    def state_path(self) -> Path:
        """Return the file holding the signed desired state being (or last) applied."""
        return self.path.with_name(self.path.name + ".desired.json")

    def save(self, record: AppliedRecord) -> None:
        """Persist ``record`` atomically (temp file, fsync, rename)."""
        _write_atomic(self.path, json.dumps({"revision": record.revision, "release": record.release, "status": record.status}).encode())

    def save_state(self, state: DesiredState) -> None:
        """Persist the signed desired state atomically, before the first write to the cluster."""
        _write_atomic(self.state_path, state.model_dump_json().encode())

    def load_state(self) -> DesiredState | None:
        """Return the persisted desired state, None if there is none or it does not parse (it is only a cache)."""
        try:
            return DesiredState.model_validate_json(self.state_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return None


class HighWater:
    """The highest signed revision seen since start and on disk; thread-safe (MQTT thread and apply worker).

    Raised only by :meth:`observe` with a state whose signature verified, so a forged message
    with a huge revision cannot lock the agent out of real ones.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._value = self._load()

    def _load(self) -> int:
        try:
            return max(0, int(json.loads(self.path.read_text())["highest_seen"]))
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError):
            return 0  # the applied record and the retained state still protect; the next raise rewrites it

    @property
    def value(self) -> int:
        """Return the highest revision seen."""
        with self._lock:
            return self._value

    def raise_to(self, revision: int) -> None:
        """Raise the mark to ``revision`` (never lowers it); persist when it moved."""
        with self._lock:
            if revision <= self._value:
                return
            self._value = revision
            # On a write error memory still holds it, and the retained state teaches it again after a restart.
            with contextlib.suppress(OSError):
                _write_atomic(self.path, json.dumps({"highest_seen": revision}).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_admissible(state: DesiredState, shop: str, last: AppliedRecord, verifier: Verifier, highest_seen: int = 0) -> bool:
    """Raise ``StateRefused`` if ``state`` must not be applied; return False if it is already applied.

    Order matters: the signature is checked before the revision, so a forged message is reported
    as forged and never updates anything. ``highest_seen`` is the :class:`HighWater` mark: a
    revision below it is a replay even when the applied record is gone.
    """
    if state.shop != shop:
        raise StateRefused("wrong_shop", f"desired state is for shop {state.shop!r}, this is {shop!r}")
    verifier.verify(state)
    if state.revision < last.revision:
        raise ReplayRefused(f"revision {state.revision} is older than the applied revision {last.revision}")
    if state.revision < highest_seen:
        raise ReplayRefused(f"revision {state.revision} is older than signed revision {highest_seen} already received")
    return not (state.revision == last.revision and last.status == "applied")
