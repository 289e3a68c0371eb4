"""``shopfleet release``, ``shopfleet rollout`` and ``shopfleet manifests``: the ML engineer's and platform engineer's commands.

Release and rollout commands talk to the controller's REST API (``--api URL``, token from
``--token`` or ``SHOPFLEET_TOKEN``) or, where that is simpler (a single machine, a script next to
the database), straight to the database (``--db URL``); both paths call the same functions, so
they behave the same. ``manifests`` commands are local and need neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def _add_backend(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the controller is (one of)")
    g.add_argument("--api", default=os.environ.get("SHOPFLEET_API"), metavar="URL",
                   help="controller REST API, e.g. http://controller:8080 (env SHOPFLEET_API)")
    g.add_argument("--token", default=os.environ.get("SHOPFLEET_TOKEN"),
                   help="API token sent as 'Authorization: Bearer' (env SHOPFLEET_TOKEN; prefer the env, flags show in ps)")
    g.add_argument("--db", default=os.environ.get("SHOPFLEET_DB_URL"), metavar="URL",
                   help="SQLAlchemy URL of the controller database instead of the API, e.g. sqlite:///controller.db (env SHOPFLEET_DB_URL)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of text")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``release``, ``rollout`` and ``manifests`` subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    # ---- release
    rel = sub.add_parser("release", help="create and list releases (images pinned by digest); make the signing key",
                         description="Releases pin every component image by digest and the model package by sha256. "
                                     "The controller signs each shop's desired state with its ed25519 key.",
                         epilog="See docs/rollouts.md.", formatter_class=fmt)
    rsub = rel.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    p = rsub.add_parser("create", help="create a release", description="Create a release. Releases are immutable: a new build is a new name.")
    p.add_argument("--name", required=True, help="unique release name: lowercase letters, digits, '.' and '-'")
    p.add_argument("--version", required=True, help="version people read, e.g. 2026.11.2")
    p.add_argument("--image", action="append", default=[], metavar="COMPONENT=REGISTRY/REPO:TAG",
                   help="image of one component (container name: agent, applier, vision, vision-gpu, fusion, sensor-driver, mosquitto, fluent-bit, "
                        "device-plugin); repeat per component. A tag is resolved to its index digest from the registry, which "
                        "must carry every arch the fleet's nodes running that component have; REPO@sha256:DIGEST is taken as given")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                   help="talk plain HTTP to this registry when resolving tags (loopback registries always are); repeat")
    p.add_argument("--model", metavar="DIR", help="model package directory: stored on the controller (shops download it from there), its sha256 over every file pinned in the release")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="free-form release label, stored and shown with the release (repeat for several)")
    _add_backend(p)
    p.set_defaults(func=_release_create)
    p = rsub.add_parser("list", help="list releases", description="List releases, newest first.")
    _add_backend(p)
    p.set_defaults(func=_release_list)
    p = rsub.add_parser("keygen", help="create the controller's ed25519 signing key pair",
                        description="Write a new ed25519 key pair: the private key (mode 0600) for the controller, the .pub file for every agent (apply.public_keys).")
    p.add_argument("--out", required=True, metavar="PATH", help="private key file; the public key goes to PATH with suffix .pub")
    p.add_argument("--overwrite", action="store_true", help="replace existing key files (agents then need the new public key)")
    p.set_defaults(func=_release_keygen)

    # ---- rollout
    ro = sub.add_parser("rollout", help="start, watch, pause, resume, abort and roll back rollouts",
                        description="Staged rollouts of a release: canary waves, health gates, maintenance windows, automatic rollback.",
                        epilog="Policy keys are documented in docs/rollouts.md.", formatter_class=fmt)
    osub = ro.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    p = osub.add_parser("start", help="plan and start a rollout of a release", description="Plan a rollout with the policy and start it; prints the plan per wave.")
    p.add_argument("--release", required=True, help="name of the release to roll out")
    p.add_argument("--policy", metavar="FILE", help="rollout policy YAML (waves, gates, windows, ...); default: one wave of every shop with default gates")
    _add_backend(p)
    p.set_defaults(func=_rollout_start)
    p = osub.add_parser("status", help="show a rollout's progress per wave, or list rollouts", description="Without ID: list rollouts. With ID: progress per wave and recent events.")
    p.add_argument("id", nargs="?", type=int, help="rollout id (omit to list)")
    p.add_argument("--watch", action="store_true", help="print the status again every 2 s until the rollout is no longer active")
    _add_backend(p)
    p.set_defaults(func=_rollout_status)
    for action, text in (("pause", "stop starting shops (shops in flight finish)"), ("resume", "continue a paused rollout"),
                         ("abort", "stop the rollout; shops already updated keep the release"),
                         ("rollback", "return every shop the rollout touched to its previous release")):
        p = osub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("id", type=int, help="rollout id")
        p.add_argument("--reason", default="", help="why, for the rollout's event log")
        _add_backend(p)
        p.set_defaults(func=_rollout_action, action=action)

    # ---- manifests
    ma = sub.add_parser("manifests", help="validate and render the Kubernetes manifests",
                        description="Validate manifests against the Kubernetes OpenAPI schemas (strict) of every supported version plus our "
                                    "policy, or render the exact objects one shop gets.", formatter_class=fmt, epilog="See docs/manifests.md.")
    msub = ma.add_subparsers(dest="manifests_command", metavar="ACTION", required=True)
    p = msub.add_parser("validate", help="validate a manifest tree, directory or file",
                        description="Validate every object (every kustomization under PATH) with kubernetes-validate --strict for each "
                                    "Kubernetes version, plus policy: digests only, resources and probes, restrictive securityContext, no "
                                    "privileged/host namespaces/hostPath without a shopfleet.io/why-* annotation. Exit 0 valid, 1 problems.")
    p.add_argument("path", nargs="?", default=None, help="tree, directory or YAML file (default: the repository's manifests/)")
    p.add_argument("--k8s-version", action="append", metavar="X.Y", help="Kubernetes minor version to validate for; repeat (default: the supported K3s versions)")
    p.set_defaults(func=_manifests_validate)
    p = msub.add_parser("render", help="write the exact objects a shop gets", description="Render a shop's desired objects for a release into DIR (one YAML file per object).")
    p.add_argument("--shop", required=True, help="shop id")
    p.add_argument("--release", help="release name, read from the database (--db); or give --image flags instead")
    p.add_argument("--db", default=os.environ.get("SHOPFLEET_DB_URL"), metavar="URL", help="controller database with the release (env SHOPFLEET_DB_URL)")
    p.add_argument("--image", action="append", default=[], metavar="COMPONENT=REPO@sha256:DIGEST", help="image override without a stored release; repeat")
    p.add_argument("--node-classes", default="", metavar="A,B", help="node classes the shop has (default: every class)")
    p.add_argument("--overlay", default="production", help="edge overlay under manifests/edge/overlays (default: %(default)s)")
    p.add_argument("--revision", type=int, default=1, help="revision label to stamp (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the objects to")
    p.set_defaults(func=_manifests_render)


# ----- backends -------------------------------------------------------------------------------


class _Api:
    def __init__(self, url: str, token: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._c = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            r = self._c.request(method, f"/api/v1{path}", json=body)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the controller API: {exc}; check --api") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise CliError(f"controller said {r.status_code}: {detail}")
        return r.json()

    def upload_model(self, path: Path) -> Any:
        """Upload model package ``path`` (as its deterministic tar) to ``POST /api/v1/models``; return its reference."""
        import httpx

        from fleet_controller.rollout.models_store import write_archive

        with tempfile.TemporaryFile() as tmp:
            write_archive(path, tmp)
            tmp.seek(0)
            try:
                r = self._c.post("/api/v1/models", params={"name": path.name}, content=tmp.read(),
                                 headers={"Content-Type": "application/x-tar"}, timeout=600)
            except httpx.HTTPError as exc:
                raise CliError(f"cannot upload model package {path}: {exc}; check --api") from None
        if r.status_code >= 400:
            raise CliError(f"controller refused model package {path}: {r.status_code} {r.text[:500]}")
        return r.json()


class CliError(Exception):
    """A failure to report as one line and exit 1."""


def _backend(args: argparse.Namespace) -> tuple[str, Any]:
    if args.db:
        from fleet_controller.registry.db import create_engine
        from fleet_controller.registry.migrations import pending

        engine = create_engine(args.db)
        behind = pending(engine)
        if behind:
            raise CliError(f"database {args.db} lacks revisions {sorted(behind)}: start the controller once (it migrates) or run it with migration")
        return "db", engine
    if args.api:
        return "api", _Api(args.api, args.token)
    raise CliError("no controller given: pass --api URL (or set SHOPFLEET_API) or --db URL (or set SHOPFLEET_DB_URL)")


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


Command = Callable[[argparse.Namespace], int]


def _guard(fn: Command) -> Command:
    """Turn a command's expected errors into their message on stderr and exit code 2."""

    def wrapper(args: argparse.Namespace) -> int:
        from fleet_controller.rollout.policy import PolicyError
        from fleet_controller.rollout.releases import ReleaseError
        from fleet_controller.rollout.signing import SigningKeyError
        from fleet_controller.rollout.store import RolloutError

        try:
            return fn(args)
        except (CliError, ReleaseError, PolicyError, RolloutError, SigningKeyError, ValueError) as exc:
            print(f"shopfleet {args.command}: {exc}", file=sys.stderr)
            return EXIT_PROBLEM

    wrapper.__doc__ = fn.__doc__
    return wrapper


# ----- release --------------------------------------------------------------------------------


@_guard
def _release_create(args: argparse.Namespace) -> int:
    """Create a release from flags."""
    from pydantic import ValidationError

    from fleet_controller.rollout.manifests import DIGEST_RE
    from fleet_controller.rollout.releases import (
        ModelRef,
        ReleaseSpec,
        ReleaseStore,
        model_package_digest,
        parse_image_args,
        store_model,
    )

    labels = {}
    for item in args.label:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CliError(f"--label {item!r}: write KEY=VALUE")
        labels[k] = v
    images = parse_image_args(args.image)
    model = model_package_digest(args.model) if args.model else None  # refuses a missing or empty package before any upload
    kind, be = _backend(args)
    if any(not DIGEST_RE.match(ref) for ref in images.values()):
        # Before the model is stored: an image that cannot be pinned leaves nothing behind.
        images = _resolve_images(images, kind, be, args.insecure_registry)
    if args.model:
        # The package is stored on the controller (shops download it from there); the release pins what was stored.
        model = store_model(be, args.model) if kind == "db" else ModelRef(**be.upload_model(Path(args.model)))
    try:
        spec = ReleaseSpec(name=args.name, version=args.version, images=images, model=model, labels=labels)
    except ValidationError as exc:
        raise CliError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None
    data = ReleaseStore(be).create(spec).model_dump() if kind == "db" else be.call("POST", "/releases", spec.model_dump())
    model_text = f", model {model.name} sha256:{model.sha256[:12]}" if model else ""
    _print(args, data, f"release {spec.name} ({spec.version}): {len(spec.images)} images{model_text}")
    return EXIT_OK


def _fleet_nodes(kind: str, be: Any) -> list[Any]:
    """Every node's shop, node class and arch (from its facts), from the database or the API."""
    from fleet_controller.rollout.registry import NodeArch

    if kind == "db":
        from fleet_controller.registry.read import RegistryReader

        reader = RegistryReader(be)
        return [NodeArch(n.shop, n.node, n.node_class, n.arch) for s in reader.shops() for n in reader.get_shop(s.id).nodes]
    nodes: list[Any] = []
    offset = 0
    while True:
        page = be.call("GET", f"/shops?limit=1000&offset={offset}")
        for shop in page["items"]:
            detail = be.call("GET", f"/shops/{shop['id']}")
            nodes += [NodeArch(n["shop"], n["node"], n.get("node_class", ""), n.get("arch", "")) for n in detail["nodes"]]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return nodes


def _resolve_images(images: dict[str, str], kind: str, be: Any, insecure: list[str]) -> dict[str, str]:
    """Pin tags by the registry's digests, checked against the arches the fleet runs each component on."""
    from fleet_controller.rollout.manifests import (
        DEFAULT_EDGE_OVERLAY,
        edge_overlay_dir,
        load_overlay,
    )
    from fleet_controller.rollout.registry import (
        ImageResolveError,
        component_selectors,
        resolve_release_images,
    )

    selectors = component_selectors(load_overlay(edge_overlay_dir(DEFAULT_EDGE_OVERLAY)))
    try:
        return resolve_release_images(images, _fleet_nodes(kind, be), selectors, insecure=insecure)
    except ImageResolveError as exc:
        raise CliError(str(exc)) from None


@_guard
def _release_list(args: argparse.Namespace) -> int:
    """List releases."""
    from fleet_controller.rollout.releases import ReleaseStore

    kind, be = _backend(args)
    rows = ReleaseStore(be).list() if kind == "db" else be.call("GET", "/releases")
    lines = [f"{r['name']:<32} {r['version']:<16} {len(r['images'])} images  {time.strftime('%Y-%m-%d %H:%M', time.localtime(r.get('created_at', 0)))}" for r in rows]
    _print(args, rows, "\n".join(lines) or "no releases")
    return EXIT_OK


@_guard
def _release_keygen(args: argparse.Namespace) -> int:
    """Write a signing key pair."""
    from fleet_controller.rollout.signing import generate_keypair

    kid = generate_keypair(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (private, mode 0600) and {Path(args.out).with_suffix('.pub')} (give it to every agent); key id {kid}")
    return EXIT_OK


# ----- rollout --------------------------------------------------------------------------------


def _status_text(st: dict[str, Any]) -> str:
    lines = [f"rollout {st['id']}: {st['release']} {st['status'].upper()}" + (f" ({st['reason']})" if st.get("reason") else "")]
    for w in st["waves"]:
        marker = ">" if w["index"] == st["current_wave"] and st["status"] in ("running", "paused") else " "
        states = ", ".join(f"{k} {v}" for k, v in sorted(w["states"].items()))
        bar = "#" * round(20 * w["done"] / w["shops"]) if w["shops"] else ""
        lines.append(f" {marker} wave {w['index']} {w['name']:<12} [{bar:<20}] {w['done']}/{w['shops']} done  ({states})")
    if st.get("skipped"):
        lines.append(f"   {st['skipped']} shops skipped (outside target or already on the release)")
    for p in st.get("problem_shops", [])[:10]:
        lines.append(f"   ! {p['shop']}: {p['reason']}")
    return "\n".join(lines)


@_guard
def _rollout_start(args: argparse.Namespace) -> int:
    """Start a rollout."""
    from fleet_controller.rollout.policy import load_policy
    from fleet_controller.rollout.store import start_rollout

    policy = load_policy(args.policy)
    kind, be = _backend(args)
    st = start_rollout(be, args.release, policy) if kind == "db" else be.call("POST", "/rollouts", {"release": args.release, "policy": policy.model_dump(mode="json")})
    _print(args, st, _status_text(st))
    return EXIT_OK


@_guard
def _rollout_status(args: argparse.Namespace) -> int:
    """Show or list rollouts."""
    from fleet_controller.rollout.store import list_rollouts, rollout_status

    kind, be = _backend(args)
    if args.id is None:
        rows = list_rollouts(be) if kind == "db" else be.call("GET", "/rollouts")
        _print(args, rows, "\n".join(f"{r['id']:>5} {r['release']:<32} {r['status']:<12} {r['reason']}" for r in rows) or "no rollouts")
        return EXIT_OK
    while True:
        st = rollout_status(be, args.id) if kind == "db" else be.call("GET", f"/rollouts/{args.id}")
        _print(args, st, _status_text(st))
        if not args.watch or st["status"] not in ("running", "paused", "rolling_back"):
            return EXIT_OK
        time.sleep(2)  # a human is watching; the API has no push for rollouts


@_guard
def _rollout_action(args: argparse.Namespace) -> int:
    """Pause, resume, abort or roll back."""
    from fleet_controller.rollout.store import request_action

    kind, be = _backend(args)
    if kind == "db":
        st = request_action(be, args.id, args.action, args.reason)
    else:
        body = {"reason": args.reason}
        if args.action in ("abort", "rollback"):  # the API acts only on the scope it showed (its token)
            shown = be.call("GET", f"/rollouts/{args.id}/{args.action}/scope")
            body["confirm"] = shown["token"]
            print(shown["scope"], file=sys.stderr)
        st = be.call("POST", f"/rollouts/{args.id}/{args.action}", body)
    _print(args, st, _status_text(st))
    return EXIT_OK


# ----- manifests ------------------------------------------------------------------------------


@_guard
def _manifests_validate(args: argparse.Namespace) -> int:
    """Validate manifests."""
    from fleet_controller.rollout import manifests

    versions = tuple(args.k8s_version or manifests.SUPPORTED_K8S_VERSIONS)
    path = Path(args.path) if args.path else manifests.MANIFESTS_ROOT
    if not path.exists():
        raise CliError(f"{path} does not exist")
    count, findings = manifests.validate_path(path, versions)
    for f in findings:
        print(f.describe())
    print(f"{count} objects, Kubernetes {', '.join(versions)}: {len(findings)} problems")
    return EXIT_PROBLEM if findings else EXIT_OK


@_guard
def _manifests_render(args: argparse.Namespace) -> int:
    """Render a shop's objects."""
    from fleet_controller.rollout import manifests
    from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore, parse_image_args

    if args.release:
        if not args.db:
            raise CliError("--release reads the release from the database: pass --db URL too (or use --image flags)")
        from fleet_controller.registry.db import create_engine

        spec = ReleaseStore(create_engine(args.db)).get(args.release)
    else:
        spec = ReleaseSpec(name="unreleased", version="0", images=parse_image_args(args.image))
    classes = frozenset(c for c in args.node_classes.split(",") if c)
    objs = manifests.render_shop(manifests.ShopTarget(args.shop, classes, args.overlay), spec.render_input(), args.revision)
    findings = manifests.validate([manifests.Sourced(o, f"render:{args.shop}") for o in objs])
    paths = manifests.write_objects(objs, args.out)
    for f in findings:
        print(f.describe())
    from fleet_controller.rollout.registry import unset_images

    unset = unset_images(objs)
    if unset:
        # Not a problem of the objects (they validate), but they cannot run as they are.
        print(f"images not set by {spec.name} (still the manifests' all-zero digest): "
              + ", ".join(f"{c} ({repo})" for c, repo in sorted(unset.items()))
              + "; set them with --image COMPONENT=REGISTRY/REPO@sha256:... or render a release that has them")
    print(f"wrote {len(paths)} objects for shop {args.shop} ({spec.name}) to {args.out}: {len(findings)} problems")
    return EXIT_PROBLEM if findings else EXIT_OK


def main(argv: list[str]) -> int:
    """Run one of this module's commands (what ``shopfleet`` does for them); for tests and scripts."""
    parser = argparse.ArgumentParser(prog="shopfleet")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
