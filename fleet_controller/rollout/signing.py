"""The controller's ed25519 signing key: generate it, load it, sign each shop's desired state.

A shop applies whatever its desired state says to its own cluster, so the message must prove it
came from the controller (the shop pulls a retained message from a broker that other parties
can reach). The controller signs ``DesiredState.signing_bytes()`` (the
canonical JSON of everything but the signature) with its private key; the agent holds only the
public key (``edge_agent.apply.verify``). ed25519 because signatures are small (64 bytes), fast
on a Raspberry Pi, and have no parameters to get wrong.

Keys are PEM files: the private key PKCS#8 (mode 0600), the public key SubjectPublicKeyInfo.
The key id is the first 16 hex digits of the SHA-256 of the raw public key, so an operator can
tell which key signed a message without having the key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.protocol import DesiredState, Signature, b64


class SigningKeyError(ValueError):
    """A signing key file that is missing, unreadable or not an ed25519 key."""


def key_id(public: Ed25519PublicKey) -> str:
    """Return the fingerprint of a public key (16 hex digits of SHA-256 of its raw bytes)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str] | None = None, *, overwrite: bool = False) -> str:
    """Write a new ed25519 key pair as PEM files; return its key id. Refuse to overwrite unless told."""
    priv_p = Path(private_path)
    pub_p = Path(public_path) if public_path else priv_p.with_suffix(".pub")
    for p in (priv_p, pub_p):
        if p.exists() and not overwrite:
            raise SigningKeyError(f"{p} exists: pass --overwrite to replace it (every agent then needs the new public key)")
    key = Ed25519PrivateKey.generate()
    priv_p.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv_p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_p.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a PEM ed25519 private key, or raise ``SigningKeyError`` naming the file and the fix."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}; create one with 'shopfleet release keygen'") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key ({exc}); create one with 'shopfleet release keygen'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an ed25519 key; create one with 'shopfleet release keygen'")
    return key


class Signer:
    """Sign desired states with one private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        """Return a signer for the PEM private key at ``path``."""
        return cls(load_private_key(path))

    def public_pem(self) -> bytes:
        """Return the PEM public key agents need."""
        return self._key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign_bytes(self, data: bytes) -> bytes:
        """Return the raw signature of ``data`` (model tokens; callers domain-separate what they sign)."""
        return self._key.sign(data)

    def sign(self, state: DesiredState) -> DesiredState:
        """Return ``state`` with a signature over its signing bytes (any old signature replaced)."""
        unsigned = state.model_copy(update={"signature": None})
        sig = self._key.sign(unsigned.signing_bytes())
        return unsigned.model_copy(update={"signature": Signature(key_id=self.key_id, sig=b64(sig))})
