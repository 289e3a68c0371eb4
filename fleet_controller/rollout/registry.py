"""Resolve image tags to the digests a release pins, from the OCI registry itself.

``shopfleet release create --image vision=REGISTRY/REPO:TAG`` asks the registry (OCI distribution
API, over HTTPS; plain HTTP only for loopback hosts and hosts named in ``insecure``) which
manifest the tag points at *now*, and pins the release to that digest, so a tag moved later
changes nothing already released. An image index (multi-arch manifest list) must carry every
architecture the fleet's nodes that run the component have (their facts report ``arch``); a
single-arch manifest is accepted only when that one arch is all they need. Anything that cannot
be resolved is refused with the reason and the fix, and nothing is created: the caller resolves
every image before it writes the release.

Anonymous bearer-token auth (``WWW-Authenticate: Bearer realm=...``) is followed, as public
registries (ghcr.io, Docker Hub) require even for anonymous pulls.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from shopfleet.errors import PermanentError

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
LABEL_ARCH = "kubernetes.io/arch"
UNSET_DIGEST = "sha256:" + "0" * 64
"""The digest the manifests give shopfleet's own images: a release sets the real one, per component."""
LABEL_NODE_CLASS = "shopfleet.io/node-class"

_REF_RE = re.compile(
    r"^(?P<host>[A-Za-z0-9.-]+(?::[0-9]+)?)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


class ImageResolveError(PermanentError):
    """A tag that cannot be pinned: unreachable registry, unknown tag, missing arch, bad reference."""

    default_reason = "image_unresolved"


@dataclass(frozen=True)
class ImageRef:
    """A parsed ``HOST[:PORT]/REPO[:TAG][@sha256:...]`` reference (the host is required)."""

    host: str
    repo: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repo}"


@dataclass(frozen=True)
class ResolvedImage:
    """What the registry said about a reference: the pinned form and the arches it carries."""

    ref: str
    pinned: str
    digest: str
    media_type: str
    arches: frozenset[str]


def parse_reference(ref: str) -> ImageRef:
    """Split ``ref``; the registry host must be explicit (no implied docker.io)."""
    m = _REF_RE.match(ref)
    if not m or ("." not in m["host"] and ":" not in m["host"] and m["host"] != "localhost"):
        raise ImageResolveError(
            f"image {ref!r} names no registry host to resolve it from: pin it by digest as REPO@sha256:<64 hex digits>, "
            "or write REGISTRY/REPOSITORY:TAG, e.g. 127.0.0.1:5000/shopfleet/vision:1.4",
            reason="bad_reference",
        )
    if not m["tag"] and not m["digest"]:
        raise ImageResolveError(f"image {ref!r} has neither a tag nor a digest: add :TAG (resolved here) or @sha256:...",
                                reason="bad_reference")
    return ImageRef(m["host"], m["repo"], m["tag"], m["digest"])


def _scheme(host: str, insecure: Iterable[str]) -> str:
    bare = host.rsplit(":", 1)[0]
    return "http" if bare in ("127.0.0.1", "localhost", "::1") or host in set(insecure) else "https"


def _bearer_token(client: httpx.Client, challenge: str, ref: ImageRef) -> str | None:
    """Fetch an anonymous pull token for a ``Bearer realm=...,service=...`` challenge."""
    if not challenge.lower().startswith("bearer "):
        return None
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", None)
    if not realm:
        return None
    params.setdefault("scope", f"repository:{ref.repo}:pull")
    resp = client.get(realm, params=params)
    if resp.status_code != 200:
        return None
    body = resp.json()
    token = body.get("token") or body.get("access_token")
    return str(token) if token else None


def _get(client: httpx.Client, url: str, ref: ImageRef, headers: dict[str, str]) -> httpx.Response:
    resp = client.get(url, headers=headers)
    if resp.status_code == 401:
        token = _bearer_token(client, resp.headers.get("www-authenticate", ""), ref)
        if token:
            resp = client.get(url, headers={**headers, "Authorization": f"Bearer {token}"})
    return resp


def resolve(ref: str, *, client: httpx.Client | None = None, insecure: Sequence[str] = (), timeout: float = 15.0) -> ResolvedImage:
    """Ask the registry what ``ref`` points at; return the digest-pinned reference and its arches."""
    parsed = parse_reference(ref)
    own = client is None
    http = client or httpx.Client(timeout=timeout, follow_redirects=True)
    base = f"{_scheme(parsed.host, insecure)}://{parsed.host}/v2/{parsed.repo}"
    target = parsed.digest or parsed.tag
    try:
        try:
            resp = _get(http, f"{base}/manifests/{target}", parsed, {"Accept": ACCEPT})
        except httpx.HTTPError as exc:
            raise ImageResolveError(
                f"image {ref!r}: registry {parsed.host} unreachable ({type(exc).__name__}: {exc}); check the host and port, "
                f"or that the registry is running", reason="registry_unreachable") from None
        if resp.status_code == 404:
            raise ImageResolveError(f"image {ref!r}: the registry has no manifest for {target!r} in {parsed.repo}; "
                                    "push the image first or check the tag", reason="tag_not_found")
        if resp.status_code in (401, 403):
            raise ImageResolveError(f"image {ref!r}: registry {parsed.host} refused anonymous access (HTTP {resp.status_code})",
                                    reason="registry_denied")
        if resp.status_code != 200:
            raise ImageResolveError(f"image {ref!r}: registry {parsed.host} answered HTTP {resp.status_code} for the manifest",
                                    reason="registry_error")
        body = resp.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        header = resp.headers.get("docker-content-digest")
        if header and header != digest:
            raise ImageResolveError(f"image {ref!r}: the registry says digest {header} but the manifest it sent hashes to {digest}",
                                    reason="digest_mismatch")
        if parsed.digest and parsed.digest != digest:
            raise ImageResolveError(f"image {ref!r}: the manifest for {parsed.digest} hashes to {digest}", reason="digest_mismatch")
        try:
            doc: dict[str, Any] = json.loads(body)
        except ValueError:
            raise ImageResolveError(f"image {ref!r}: the manifest is not JSON", reason="registry_error") from None
        media_type = str(doc.get("mediaType") or resp.headers.get("content-type", "").split(";")[0])
        if media_type in INDEX_TYPES or "manifests" in doc:
            arches = frozenset(
                str(m["platform"]["architecture"]) for m in doc.get("manifests", [])
                if isinstance(m.get("platform"), dict) and m["platform"].get("architecture") not in (None, "unknown")
            )
        else:
            arches = frozenset({_config_arch(http, base, parsed, doc, ref)})
    finally:
        if own:
            http.close()
    return ResolvedImage(ref=ref, pinned=f"{parsed.name}@{digest}", digest=digest, media_type=media_type, arches=arches)


def _config_arch(http: httpx.Client, base: str, parsed: ImageRef, doc: Mapping[str, Any], ref: str) -> str:
    """A single-arch manifest names its arch only in its config blob."""
    cfg = (doc.get("config") or {}).get("digest")
    if not cfg:
        raise ImageResolveError(f"image {ref!r}: the manifest has no config", reason="registry_error")
    try:
        resp = _get(http, f"{base}/blobs/{cfg}", parsed, {})
        arch = resp.json().get("architecture") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        arch = None
    if not arch:
        raise ImageResolveError(f"image {ref!r}: could not read the architecture from config {cfg}", reason="registry_error")
    return str(arch)


def unset_images(objects: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Container name -> repository of every image still at the manifests' unset digest."""
    out: dict[str, str] = {}
    for obj in objects:
        template = ((obj.get("spec") or {}).get("template") or {}) if obj.get("kind") != "Pod" else obj
        spec = template.get("spec") or {}
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
            image = str(c.get("image", ""))
            if image.endswith("@" + UNSET_DIGEST):
                out[str(c.get("name"))] = image.split("@", 1)[0]
    return out


# --------------------------------------------------------------------------------------------
# Which arches a component needs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeArch:
    """A node of the fleet as its facts describe it."""

    shop: str
    node: str
    node_class: str
    arch: str


def component_selectors(objects: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[str | None, str | None]]]:
    """Per container name, the (arch, node class) each workload running it is pinned to (None: any)."""
    out: dict[str, list[tuple[str | None, str | None]]] = {}
    for obj in objects:
        template = ((obj.get("spec") or {}).get("template") or {}) if obj.get("kind") != "Pod" else obj
        spec = template.get("spec") or {}
        if not spec:
            continue
        arch = (spec.get("nodeSelector") or {}).get(LABEL_ARCH)
        node_class = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_NODE_CLASS)
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
            out.setdefault(str(c.get("name")), []).append((arch, node_class))
    return out


def required_arches(component: str, nodes: Iterable[NodeArch], selectors: Mapping[str, list[tuple[str | None, str | None]]]) -> dict[str, list[str]]:
    """Arch -> the ``shop/node`` names that would run ``component`` on it (nodes with no arch are skipped)."""
    need: dict[str, list[str]] = {}
    # A component no manifest names (an extra image of the release) is needed wherever a node is.
    pins = selectors.get(component) or [(None, None)]
    for n in nodes:
        if not n.arch:
            continue
        if any((a is None or a == n.arch) and (c is None or c == n.node_class) for a, c in pins):
            need.setdefault(n.arch, []).append(f"{n.shop}/{n.node}")
    return need


def resolve_release_images(
    images: Mapping[str, str],
    nodes: Sequence[NodeArch],
    selectors: Mapping[str, list[tuple[str | None, str | None]]],
    *,
    client: httpx.Client | None = None,
    insecure: Sequence[str] = (),
) -> dict[str, str]:
    """Pin every ``COMPONENT -> REF`` by digest, checking each against the arches its nodes need.

    References already pinned (``REPO@sha256:...`` with no tag) are kept as they are, without
    asking the registry. All images are resolved before anything is returned, and every problem
    is reported at once, so a release is created with all of its images pinned or not at all.
    """
    out: dict[str, str] = {}
    problems: list[str] = []
    for comp, ref in images.items():
        if "@sha256:" in ref and ":" not in ref.split("@", 1)[0].split("/", 1)[-1]:
            out[comp] = ref
            continue
        try:
            res = resolve(ref, client=client, insecure=insecure)
        except ImageResolveError as exc:
            problems.append(f"{comp}: {exc}")
            continue
        need = required_arches(comp, nodes, selectors)
        missing = sorted(set(need) - res.arches)
        if missing:
            where = "; ".join(f"{a} on {', '.join(need[a][:3])}{' ...' if len(need[a]) > 3 else ''}" for a in missing)
            problems.append(f"{comp}: image {ref} ({res.digest[:19]}...) has arches {sorted(res.arches) or 'none'} "
                            f"but the fleet runs it on {where}; build and push those arches into the index "
                            f"(make images) or exclude those shops")
            continue
        out[comp] = res.pinned
    if problems:
        raise ImageResolveError("release not created: " + " | ".join(problems),
                                reason="arch_missing" if all("has arches" in p for p in problems) else "image_unresolved")
    return out
