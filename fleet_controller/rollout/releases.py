"""Releases: what a shop should run, pinned so that it means the same thing forever.

A release names every component image by digest (``REPO@sha256:...``, never a tag, which can be
moved) and the model package by the SHA-256 of its content, so a rollout of release ``R`` on
Monday and a rollback to ``R`` on Friday apply byte-identical objects. :class:`ReleaseSpec` is the
checked value (pydantic, ``extra="forbid"``); :class:`ReleaseStore` keeps them in SQL, immutable
once created; :func:`model_package_digest` hashes a model directory; :func:`desired_state_for`
renders and signs one shop's desired state for a release.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edge_agent.protocol import DesiredState
from fleet_controller.rollout import manifests
from fleet_controller.rollout.models import ReleaseRecord
from fleet_controller.rollout.models_store import (
    TOKEN_PREFIX,
    TOKEN_TTL_S,
    ModelStore,
    make_token,
    package_files,
    token_payload,
)
from fleet_controller.rollout.signing import Signer

NAME_PATTERN = r"^[a-z0-9][a-z0-9.-]{0,127}$"
COMPONENT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ReleaseError(ValueError):
    """A release that cannot be created or found; the message says what to do."""


class ModelRef(BaseModel):
    """The model package of a release."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=128, description="Model name, e.g. the package directory name.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 over the package's files (see model_package_digest).")
    size_bytes: int = Field(0, ge=0, description="Total size of the package's files.")
    archive_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                       description="SHA-256 of the package's archive as the controller stores and serves it (see models_store).")
    archive_bytes: int = Field(0, ge=0, description="Size of that archive: what a shop downloads.")


class ReleaseSpec(BaseModel):
    """A release: name, version, one image per component pinned by digest, optional model package."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=NAME_PATTERN, description="Unique release name (lowercase, digits, '.', '-').")
    version: str = Field(min_length=1, max_length=64, description="Version shown to people, e.g. 2026.11.2.")
    images: dict[str, str] = Field(default_factory=dict, description="Component (container name) -> REPO@sha256:<64 hex>.")
    model: ModelRef | None = Field(None, description="Model package the vision pipelines load.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels, e.g. {'channel': 'beta'}; stored and shown, never rendered.")

    @field_validator("images")
    @classmethod
    def _pinned(cls, v: dict[str, str]) -> dict[str, str]:
        for comp, ref in v.items():
            if not COMPONENT_PATTERN.match(comp):
                raise ValueError(f"component {comp!r} is not a container name: use lowercase letters, digits and '-'")
            if not manifests.DIGEST_RE.match(ref):
                raise ValueError(f"image for {comp!r} is {ref!r}: pin it by digest as REPO@sha256:<64 hex digits>, never by tag")
        return v

    def render_input(self) -> manifests.RenderInput:
        """Return what manifest rendering needs from this release."""
        return manifests.RenderInput(self.name, dict(self.images), self.model.sha256 if self.model else None)


def parse_image_args(values: list[str]) -> dict[str, str]:
    """Turn ``COMPONENT=REPO@sha256:...`` strings into a dict, or raise ``ReleaseError`` naming the bad one."""
    out: dict[str, str] = {}
    for v in values:
        comp, sep, ref = v.partition("=")
        if not sep or not comp or not ref:
            raise ReleaseError(f"--image {v!r}: write COMPONENT=REPO@sha256:<digest>, e.g. vision=ghcr.io/acme/vision@sha256:...")
        if comp in out:
            raise ReleaseError(f"--image names component {comp!r} twice: give each component one image")
        out[comp] = ref
    return out


def model_package_digest(path: str | os.PathLike[str]) -> ModelRef:
    """Hash a model package directory (or file): SHA-256 over each relative path and content, sorted."""
    root = Path(path)
    if not root.exists():
        raise ReleaseError(f"model package {root} does not exist: pass the directory the vision pipeline loads")
    files = package_files(root)
    if not files:
        raise ReleaseError(f"model package {root} is empty: it must hold the model file(s)")
    h = hashlib.sha256()
    size = 0
    for f in files:
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
        h.update(b"\0")
    return ModelRef(name=root.name, sha256=h.hexdigest(), size_bytes=size)


class ReleaseStore:
    """Releases in SQL; a release is immutable once created."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, spec: ReleaseSpec, now: float | None = None) -> ReleaseSpec:
        """Store a new release; raise ``ReleaseError`` if the name is taken."""
        if spec.model is not None and spec.model.archive_sha256:
            stored = ModelStore(self.engine).get(spec.model.sha256)
            if stored is None or stored.archive_sha256 != spec.model.archive_sha256:
                raise ReleaseError(f"model package {spec.model.name} (sha256 {spec.model.sha256[:16]}...) is not stored on the controller: "
                                   "create the release with 'shopfleet release create --model DIR', which uploads it")
        row = ReleaseRecord(
            name=spec.name,
            version=spec.version,
            images=dict(spec.images),
            model=spec.model.model_dump() if spec.model else None,
            labels=dict(spec.labels),
            created_at=time.time() if now is None else now,
        )
        try:
            with Session(self.engine) as s, s.begin():
                s.add(row)
        except IntegrityError:
            raise ReleaseError(f"release {spec.name!r} exists and releases are immutable: pick a new name") from None
        return spec

    @staticmethod
    def _spec(r: Any) -> ReleaseSpec:
        return ReleaseSpec(name=r.name, version=r.version, images=r.images or {}, model=r.model, labels=r.labels or {})

    def get(self, name: str) -> ReleaseSpec:
        """Return release ``name`` or raise ``ReleaseError``."""
        with self.engine.connect() as c:
            r = c.execute(select(ReleaseRecord.__table__).where(ReleaseRecord.name == name)).first()
        if r is None:
            raise ReleaseError(f"no release named {name!r}: list them with 'shopfleet release list'")
        return self._spec(r)

    def list(self) -> list[dict[str, Any]]:
        """Return every release, newest first, as JSON-ready dicts."""
        with self.engine.connect() as c:
            rows = c.execute(select(ReleaseRecord.__table__).order_by(ReleaseRecord.created_at.desc())).all()
        return [{**self._spec(r).model_dump(), "created_at": r.created_at} for r in rows]


def desired_state_for(
    shop: str,
    spec: ReleaseSpec,
    revision: int,
    signer: Signer,
    *,
    node_classes: frozenset[str] = frozenset(),
    overlay: str = manifests.DEFAULT_EDGE_OVERLAY,
    root: Path = manifests.MANIFESTS_ROOT,
    base: Sequence[Mapping[str, Any]] | None = None,
    now: float | None = None,
) -> DesiredState:
    """Render and sign ``shop``'s desired state for ``spec`` at ``revision``.

    ``base`` (the loaded overlay) may be passed in to render many shops without reloading it.
    A release whose model package the controller stores gets a model token in ``model.token``
    (valid ``TOKEN_TTL_S`` from ``now``): what the shop's applier shows to download the package.
    """
    target = manifests.ShopTarget(shop, node_classes, overlay)
    if base is None:
        objs = manifests.render_shop(target, spec.render_input(), revision, root)
    else:
        objs = manifests.render_objects(base, target, spec.render_input(), revision)
    state = DesiredState(
        shop=shop,
        release=spec.name,
        revision=revision,
        objects=tuple(objs),
        model=model_for(shop, spec.model, signer, now) if spec.model else None,
    )
    return signer.sign(state)


def model_for(shop: str, model: ModelRef, signer: Signer, now: float | None = None) -> dict[str, Any]:
    """Return the ``model`` field of a desired state: the reference plus, if the package is stored, a download token."""
    out = model.model_dump()
    if model.archive_sha256:
        payload = token_payload(shop, model.sha256, (time.time() if now is None else now) + TOKEN_TTL_S)
        out["token"] = make_token(payload, signer.sign_bytes(TOKEN_PREFIX + payload))
    return out


def store_model(engine: Engine, path: str | os.PathLike[str]) -> ModelRef:
    """Store the package at ``path`` in the controller database and return its full reference."""
    p = ModelStore(engine).put_dir(path)
    return ModelRef(name=p.name, sha256=p.sha256, size_bytes=p.size_bytes, archive_sha256=p.archive_sha256, archive_bytes=p.archive_bytes)
