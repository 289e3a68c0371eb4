"""Model packages kept by the controller: stored in its database, served to shops by byte range.

A release names its model package by the SHA-256 over the package's files
(:func:`fleet_controller.rollout.releases.model_package_digest`). The bytes a shop downloads are
a deterministic, uncompressed tar of that directory (sorted names, mtime 0, owner 0, mode 0644,
regular files only), so the same package always gives the same archive and the same
``archive_sha256``. Both hashes go into the signed desired state: the agent checks the archive's
hash before it reads a byte of the tar, then the package digest of what it extracted.

Why the database and not the controller's data dir or an OCI registry (docs/models.md says more):
the CLI creates releases either through the API or straight against the database (``--db``),
controller replicas share one database and nothing else, and backups already cover it; a data
dir exists on one host only. An OCI artifact would need registry credentials on every shop and a
second authentication story. Packages are split into 1 MiB rows (``model_chunks``) so a range
request reads only the rows it needs, on SQLite and PostgreSQL alike, and no row comes near a
database's value limits.

Shops authenticate downloads with a **model token** the controller puts into each shop's signed
desired state: ``v1.<payload>.<signature>``, the payload naming the shop, the package sha256 and
an expiry, signed with the controller's ed25519 desired-state key (domain-separated from
desired-state signatures). The desired state reaches only that shop (broker ACLs), so a token
proves the holder was sent that model; it opens that one package and nothing else, and any
controller holding the public key can check it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import BigInteger, Float, Integer, LargeBinary, String, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from fleet_controller.registry.db import Base
from shopfleet.files import UnsafeArchive, extract_files

CHUNK_BYTES = 1 << 20
"""Size of one stored row of a package archive."""
MAX_ARCHIVE_BYTES = 4 << 30
"""Largest package accepted (4 GiB): well above any model the shops' hardware can run."""
TOKEN_PREFIX = b"shopfleet-model-token/1\0"
"""Prepended to a token's payload before signing, so a token signature can never pass for a
desired-state signature (whose signed bytes are canonical JSON, starting with ``{``)."""
TOKEN_TTL_S = 30 * 86400.0
"""How long a model token stays valid: long enough for a shop offline for weeks to fetch the
model named in its retained desired state, short enough that a leaked token expires."""


class ModelStoreError(ValueError):
    """A package that cannot be stored or found; the message says what to do."""


class ModelTokenInvalid(ValueError):
    """A model token that is malformed, forged, expired or for another package."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class ModelPackageRecord(Base):
    """One stored model package: its digests and sizes. Created by revision ``0010_model_packages``."""

    __tablename__ = "model_packages"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    archive_sha256: Mapped[str] = mapped_column(String(64))
    archive_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class ModelChunk(Base):
    """One ``CHUNK_BYTES`` slice of a package archive."""

    __tablename__ = "model_chunks"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


@dataclass(frozen=True)
class StoredPackage:
    """What the store knows about one package."""

    sha256: str
    name: str
    size_bytes: int
    archive_sha256: str
    archive_bytes: int


def package_files(root: Path) -> list[Path]:
    """Return the package's files in the order the digest and the archive use (sorted relative paths)."""
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def write_archive(root: Path, out: IO[bytes]) -> None:
    """Write the deterministic tar of package ``root`` (a directory or one file) to ``out``."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in package_files(root):
            info = tarfile.TarInfo(f.name if root.is_file() else f.relative_to(root).as_posix())
            info.size = f.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(f, "rb") as fh:
                tar.addfile(info, fh)


def extract_archive(src: IO[bytes], dest: Path, limit_bytes: int = MAX_ARCHIVE_BYTES) -> None:
    """Extract an uploaded package tar into ``dest``: regular files with relative names only."""
    try:
        with tarfile.open(fileobj=src, mode="r:") as tar:
            total = 0
            for m in tar.getmembers():
                if not m.isfile() and not m.isdir():
                    raise ModelStoreError(f"archive member {m.name!r} is not a regular file: a model package holds files only")
                total += m.size
                if total > limit_bytes:
                    raise ModelStoreError(f"archive unpacks to more than {limit_bytes} bytes: not a model package")
            extract_files(tar, dest)
    except UnsafeArchive as exc:
        raise ModelStoreError(f"{exc}: a model package holds files with relative names only") from None
    except (tarfile.TarError, OSError) as exc:
        raise ModelStoreError(f"not a readable tar of a model package ({exc}): upload 'tar -cf - -C DIR .' of the package directory") from None


class ModelStore:
    """Model packages in the controller database, immutable once stored."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def put_dir(self, path: str | os.PathLike[str], now: float | None = None) -> StoredPackage:
        """Store package directory ``path`` (no-op if a package with its digest is stored); return it."""
        from fleet_controller.rollout.releases import (
            model_package_digest,  # releases imports this module
        )

        root = Path(path)
        ref = model_package_digest(root)
        have = self.get(ref.sha256)
        if have is not None:
            return have
        with tempfile.TemporaryFile() as tmp:
            write_archive(root, tmp)
            size = tmp.tell()
            if size > MAX_ARCHIVE_BYTES:
                raise ModelStoreError(f"model package {root} is {size} bytes, above the {MAX_ARCHIVE_BYTES} limit")
            tmp.seek(0)
            h = hashlib.sha256()
            with Session(self.engine) as s, s.begin():
                for idx, chunk in enumerate(iter(lambda: tmp.read(CHUNK_BYTES), b"")):
                    h.update(chunk)
                    s.add(ModelChunk(sha256=ref.sha256, idx=idx, data=chunk))
                rec = ModelPackageRecord(sha256=ref.sha256, name=ref.name, size_bytes=ref.size_bytes, archive_sha256=h.hexdigest(),
                                         archive_bytes=size, created_at=time.time() if now is None else now)
                s.add(rec)
        return StoredPackage(ref.sha256, ref.name, ref.size_bytes, h.hexdigest(), size)

    def put_archive(self, src: IO[bytes], name: str) -> StoredPackage:
        """Store an uploaded tar of a package directory named ``name``; return what was stored."""
        with tempfile.TemporaryDirectory() as d:
            root = Path(d) / name
            root.mkdir()
            extract_archive(src, root)
            if not any(p.is_file() for p in root.rglob("*")):
                raise ModelStoreError("the uploaded archive holds no file: a model package needs model.onnx and model.json")
            return self.put_dir(root)

    def get(self, sha256: str) -> StoredPackage | None:
        """Return the stored package with digest ``sha256``, or None."""
        with Session(self.engine) as s:
            r = s.get(ModelPackageRecord, sha256)
            return None if r is None else StoredPackage(r.sha256, r.name, r.size_bytes, r.archive_sha256, r.archive_bytes)

    def list(self) -> list[StoredPackage]:
        """Return every stored package, newest first."""
        with Session(self.engine) as s:
            rows = s.scalars(select(ModelPackageRecord).order_by(ModelPackageRecord.created_at.desc())).all()
            return [StoredPackage(r.sha256, r.name, r.size_bytes, r.archive_sha256, r.archive_bytes) for r in rows]

    def read(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Yield archive bytes ``start``..``end`` (inclusive) of package ``sha256``, one stored row at a time."""
        first, last = start // CHUNK_BYTES, end // CHUNK_BYTES
        for idx in range(first, last + 1):
            with self.engine.connect() as c:
                data = c.execute(select(ModelChunk.data).where(ModelChunk.sha256 == sha256, ModelChunk.idx == idx)).scalar_one_or_none()
            if data is None:
                raise ModelStoreError(f"package {sha256} lacks stored row {idx}: store the package again")
            lo = start - idx * CHUNK_BYTES if idx == first else 0
            hi = end - idx * CHUNK_BYTES + 1 if idx == last else len(data)
            yield bytes(data[lo:hi])

    def delete(self, sha256: str) -> None:
        """Remove a package (tests and operators clearing a package no release names)."""
        with Session(self.engine) as s, s.begin():
            s.execute(delete(ModelChunk).where(ModelChunk.sha256 == sha256))
            s.execute(delete(ModelPackageRecord).where(ModelPackageRecord.sha256 == sha256))


# ----- model tokens ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_payload(shop: str, sha256: str, expires_at: float) -> bytes:
    """Return the bytes a model token's payload part encodes (canonical JSON)."""
    return json.dumps({"exp": int(expires_at), "sha256": sha256, "shop": shop}, sort_keys=True, separators=(",", ":")).encode()


def make_token(payload: bytes, signature: bytes) -> str:
    """Return the token text for a payload and its signature over ``TOKEN_PREFIX + payload``."""
    return f"v1.{_b64(payload)}.{_b64(signature)}"


def check_token(token: str, sha256: str, public_keys: list[Ed25519PublicKey], now: float | None = None) -> str:
    """Return the shop a valid token for package ``sha256`` was issued to; raise ``ModelTokenInvalid`` otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != "v1":
        raise ModelTokenInvalid("malformed", "not a model token: use the token of the shop's desired state (model.token)")
    try:
        payload, sig = _unb64(parts[1]), _unb64(parts[2])
        claims = json.loads(payload)
        shop, sha, exp = str(claims["shop"]), str(claims["sha256"]), float(claims["exp"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise ModelTokenInvalid("malformed", "the token does not decode: use the token of the shop's desired state (model.token)") from None
    for key in public_keys:
        try:
            key.verify(sig, TOKEN_PREFIX + payload)
            break
        except InvalidSignature:
            continue
    else:
        raise ModelTokenInvalid("forged", "the token's signature does not verify with the controller's key")
    if sha != sha256:
        raise ModelTokenInvalid("wrong_package", f"the token opens package {sha[:16]}..., not {sha256[:16]}...")
    if (time.time() if now is None else now) > exp:
        raise ModelTokenInvalid("expired", "the token expired: the controller issues a fresh one with the shop's next desired state")
    return shop


def archive_bytes_of(root: Path) -> bytes:
    """Return the deterministic archive of ``root`` in memory (tests and small packages)."""
    buf = io.BytesIO()
    write_archive(root, buf)
    return buf.getvalue()
