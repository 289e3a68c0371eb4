#!/usr/bin/env python3
"""Build shopfleet's container images for amd64 and arm64 and push one multi-arch index per image.

What it does, in order (docs/images.md has the why of each step):

1. The base images, once per arch and then cached in local container storage: a Debian bookworm
   minbase root made by debootstrap (arm64 through qemu-user-static and binfmt), cleaned by
   images/base/clean-rootfs.sh into ``localhost/shopfleet/base:bookworm-ARCH`` (Python 3.11,
   no pip, no docs), and ``localhost/shopfleet/base-build:bookworm-ARCH`` on top of it
   (python3-venv and binutils, for build stages only). No base image is pulled from anywhere.
2. The shopfleet wheel, built from a copy of the tree, and per role a ``requirements.txt`` (the
   role's extra expanded from pyproject.toml) for the cached dependency layer.
3. Every image of IMAGES per arch from the one images/Containerfile, the role given as build
   arguments (title, uid, import check, dropped paths), with ``buildah bud --layers --isolation
   chroot``, pip's cache mounted into the build; an import check per arch (arm64 vision with /sys
   hidden, where ONNX Runtime otherwise segfaults under qemu); its uncompressed size; its
   CycloneDX SBOM copied out beside it.
4. One manifest list per image (``localhost/shopfleet/NAME:TAG``), each arch's entry annotated with
   its SBOM's sha256, pushed with every arch to the registry: by default a local
   ``docker-registry`` this script starts on 127.0.0.1:5000 (config in a temp dir, storage in the
   cache dir) and leaves running for the next push.
5. ``build/images/images.json``: per image its reference, index digest, arches, sizes and SBOMs.
   Written only once every push succeeded, so a registry that fails mid-push leaves the previous
   record (and the previous tags of the images not yet pushed) as they were.

Usage: python3 scripts/build_images.py [--images agent,vision] [--arches amd64,arm64]
           [--registry HOST:PORT] [--tag TAG] [--no-push] [--with-cuda-libs]
Needs root (debootstrap, buildah with chroot isolation). Progress goes to stderr; the last stdout
line is a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
MIRROR = os.environ.get("SHOPFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ARCHES = ("amd64", "arm64")
QEMU = {"arm64": "qemu-aarch64"}
"""binfmt entries a foreign arch needs (host arch amd64)."""
ORT_GPU = "onnxruntime-gpu==1.31.1"
"""The newest onnxruntime-gpu on PyPI; the CPU build is pinned at 1.32.0 by constraints.txt."""


@dataclass(frozen=True)
class ImageSpec:
    """One image built from images/Containerfile: its extra, uid, import checks and arches."""

    name: str
    extra: str
    # The uid (and gid) the image runs as: its pod's securityContext runAsUser in the manifests.
    uid: int
    # Python run in the build's app stage, on the build arch (under qemu for arm64).
    build_check: str
    arches: tuple[str, ...] = ARCHES
    # Python run inside the finished image per arch after the build (read-only root, its uid).
    check: str = "import shopfleet.cli"
    swap: dict[str, str] = field(default_factory=dict)
    # Paths under site-packages this image drops from the wheel: the dashboard's static assets
    # (vendored JavaScript, several MB) are the controller's alone.
    drop: tuple[str, ...] = ("fleet_controller/web/static",)

    @property
    def title(self) -> str:
        """The image's org.opencontainers.image.title label."""
        return f"shopfleet-{self.name}"

    def build_args(self) -> dict[str, str]:
        """The build arguments images/Containerfile takes for this image (ARCH and PIP_CERT aside)."""
        return {"TITLE": self.title, "USER_ID": str(self.uid), "IMPORT_CHECK": self.build_check, "DROP": " ".join(self.drop)}


CONTAINERFILE = ROOT / "images/Containerfile"
"""The one Containerfile of every image in IMAGES (images/mosquitto, not released, has its own)."""

IMAGES = (
    # The shop node agent (DaemonSet shopfleet-agent): `shopfleet agent` with the agent extra only
    # (process and sensor-board pipelines, signed desired state); no Kubernetes client, no vision.
    ImageSpec("agent", "agent", uid=10001,
              build_check="import shopfleet.cli, edge_agent.agent, edge_agent.pipelines.hardware",
              check="import edge_agent.agent, edge_agent.pipelines.hardware"),
    # The sensor driver (DaemonSet sensor-driver): the agent, same extra, run with one hardware
    # pipeline reading the shelf board over the serial device the pod is given (supplementalGroups
    # [20], dialout).
    ImageSpec("sensor-driver", "agent", uid=10003,
              build_check="import shopfleet.cli, edge_agent.agent, edge_agent.pipelines.hardware, serial",
              check="import edge_agent.pipelines.hardware, serial"),
    # The applier (DaemonSet shopfleet-applier, one node per shop): the agent plus the Kubernetes
    # client that applies the shop's signed desired state. A separate image, so the agent image on
    # every other node carries no Kubernetes client (about 120 MB). Same uid as the agent: same
    # node, same state directory.
    ImageSpec("applier", "applier", uid=10001,
              build_check="import shopfleet.cli, edge_agent.agent, edge_agent.apply.kube, kubernetes",
              check="import edge_agent.apply.kube, kubernetes"),
    # Vision, CPU build (DaemonSet vision-arm64 on Pi-class nodes; amd64 too): the camera pipeline
    # (OpenCV headless, ONNX Runtime's CPU build, numpy, scipy); the camera comes with
    # supplementalGroups [44] (video). The build's import check leaves ONNX Runtime out: under qemu
    # it segfaults on import while /sys is visible, and check_image runs with /sys hidden.
    ImageSpec("vision", "vision", uid=10002,
              build_check="import shopfleet.cli, edge_agent.agent, edge_agent.pipelines.vision, cv2, numpy, scipy",
              check="import onnxruntime, cv2, vision.detector; print(onnxruntime.get_available_providers())"),
    # Vision, GPU build (DaemonSet vision-gpu, runtimeClassName nvidia): onnxruntime replaced by
    # onnxruntime-gpu (CUDA and TensorRT execution providers) in requirements.txt. amd64 only: the
    # GPU DaemonSet selects kubernetes.io/arch=amd64 nodes. CUDA 12 and cuDNN 9 (about 3 GB of
    # wheels) come with --with-cuda-libs, else from the node (docs/images.md).
    ImageSpec("vision-gpu", "vision", uid=10002, arches=("amd64",), swap={"onnxruntime": ORT_GPU},
              build_check="import shopfleet.cli, edge_agent.agent, edge_agent.pipelines.vision, cv2, onnxruntime; "
                          "assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers()",
              check="import onnxruntime; assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers()"),
    # The fleet controller (StatefulSet shopfleet-controller): registry, API, dashboard, releases
    # and rollouts (FastAPI, SQLAlchemy, psycopg, kubernetes-validate).
    ImageSpec("controller", "controller", uid=10010,
              build_check="import shopfleet.cli, fleet_controller.service, fleet_controller.web",
              check="import fleet_controller.service", drop=()),
)

_T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress line on stderr with the elapsed time."""
    el = int(time.monotonic() - _T0)
    print(f"[{el // 60:02d}:{el % 60:02d}] {msg}", file=sys.stderr, flush=True)


class BuildError(Exception):
    """A step failed; the message names the step and what to do."""


def run(argv: list[str], *, capture: bool = True, timeout: float = 7200, env: dict[str, str] | None = None,
        what: str = "") -> str:
    """Run ``argv``; return stdout, or raise BuildError with the command and its output's tail."""
    proc = subprocess.run(argv, capture_output=capture, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = ((proc.stdout or "")[-1500:] + (proc.stderr or "")[-3000:]) if capture else ""
        raise BuildError(f"{what or argv[0]} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")
    return proc.stdout or ""


def default_cache() -> Path:
    """Where base roots, pip's cache and the registry's storage live between builds."""
    env = os.environ.get("SHOPFLEET_IMAGE_CACHE")
    if env:
        return Path(env)
    return Path("/var/cache/shopfleet-images") if os.geteuid() == 0 else Path.home() / ".cache/shopfleet-images"


RECIPE_LABEL = "dev.shopfleet.base-recipe"


def image_label(ref: str, label: str) -> str:
    out = subprocess.run(["podman", "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', ref],
                         capture_output=True, text=True)
    return out.stdout.strip()


def image_exists(ref: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True).returncode == 0


def check_tools(arches: tuple[str, ...], push: bool, registry: str) -> None:
    """Fail early with what to install, rather than half-way through a build."""
    need = ["buildah", "podman", "debootstrap"]
    if push and registry == "127.0.0.1:5000":
        need.append("docker-registry")
    missing = [t for t in need if not shutil.which(t)]
    if missing:
        raise BuildError(f"missing tools: {', '.join(missing)}; run scripts/install-system-deps.sh (Debian: "
                         "apt-get install buildah podman debootstrap docker-registry qemu-user-static binfmt-support)")
    if os.geteuid() != 0:
        raise BuildError("building images needs root (debootstrap, buildah --isolation chroot); run it with sudo")
    for arch in arches:
        if arch in QEMU:
            binfmt = Path("/proc/sys/fs/binfmt_misc") / QEMU[arch]
            if not binfmt.exists():
                # Mount binfmt_misc and enable the handler Debian's qemu-user-static registered.
                if not Path("/proc/sys/fs/binfmt_misc/status").exists():
                    subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], check=False)
                subprocess.run(["update-binfmts", "--enable", QEMU[arch]], check=False, capture_output=True)
            if not binfmt.exists() or "enabled" not in binfmt.read_text():
                raise BuildError(f"{arch}: binfmt handler {QEMU[arch]} is not enabled; install qemu-user-static and "
                                 f"binfmt-support, then: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
                                 f"update-binfmts --enable {QEMU[arch]}")


def build_base(arch: str, cache: Path) -> None:
    """Make localhost/shopfleet/base and base-build for ``arch`` unless they are in local storage."""
    base, builder = f"localhost/shopfleet/base:{SUITE}-{arch}", f"localhost/shopfleet/base-build:{SUITE}-{arch}"
    debian = f"localhost/shopfleet/base-debian:{SUITE}-{arch}"
    # The base images carry the hash of their recipe: a changed clean-rootfs.sh or builder
    # Containerfile rebuilds them (and so every layer above them), an unchanged one never does.
    recipe = hashlib.sha256((ROOT / "images/base/clean-rootfs.sh").read_bytes()
                            + (ROOT / "images/base/Containerfile.builder").read_bytes()).hexdigest()[:16]
    stale = [ref for ref in (base, debian, builder) if image_exists(ref) and image_label(ref, RECIPE_LABEL) != recipe]
    if stale:
        say(f"base {arch}: recipe changed, rebuilding {', '.join(stale)}")
        subprocess.run(["buildah", "rmi", "-f", base, debian, builder], capture_output=True)
    if not (image_exists(base) and image_exists(debian)):
        rootfs = cache / f"rootfs-{arch}"
        if not (rootfs / "usr/bin/python3").exists():
            tmp = cache / f"rootfs-{arch}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"base {arch}: debootstrap --variant=minbase {SUITE} with python3 (a few minutes; arm64 runs under qemu)")
            run(["debootstrap", "--variant=minbase", f"--arch={arch}", "--include=python3,python3-venv",
                 SUITE, str(tmp), MIRROR], what=f"debootstrap {arch}")
            tmp.rename(rootfs)
        say(f"base {arch}: importing and cleaning the root into {debian} and {base}")
        ctr = run(["buildah", "from", "--arch", arch, "scratch"]).strip()
        try:
            tar = cache / f"rootfs-{arch}.tar"
            # The build machine's name and resolver must not ship (a runtime mounts its own);
            # the .debs debootstrap downloaded are not part of the root.
            (rootfs / "etc/hostname").write_text("")
            (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
            (rootfs / "etc/resolv.conf").write_text("")
            (rootfs / "etc/machine-id").unlink(missing_ok=True)
            for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tar), "."], what="tar rootfs")
            run(["buildah", "add", ctr, str(tar), "/"], what="buildah add rootfs")
            tar.unlink()
            run(["buildah", "copy", ctr, str(ROOT / "images/base/clean-rootfs.sh"), "/clean-rootfs.sh"])
            run(["buildah", "config", "--arch", arch, "--os", "linux", "--env", "LANG=C.UTF-8",
                 "--cmd", "/usr/bin/python3", "--label", f"org.opencontainers.image.base.name=debian:{SUITE}-minbase",
                 "--label", f"{RECIPE_LABEL}={recipe}", ctr])
            # One container, two commits: the builder's parent keeps apt; the runtime base is the
            # same root slimmed further, committed as a single layer (a later RUN could only add).
            run(["buildah", "run", "--isolation", "chroot", ctr, "--", "/bin/sh", "/clean-rootfs.sh"], what=f"cleaning the {arch} root")
            run(["buildah", "commit", "-q", ctr, debian], what="commit base-debian")
            run(["buildah", "run", "--isolation", "chroot", ctr, "--", "/bin/sh", "-c", "/clean-rootfs.sh slim; rm /clean-rootfs.sh"],
                what=f"slimming the {arch} root")
            run(["buildah", "commit", "--rm", "-q", ctr, base], what="commit base")
        except BaseException:
            subprocess.run(["buildah", "rm", ctr], capture_output=True)
            raise
    if not image_exists(builder):
        say(f"base {arch}: builder image {builder} (python3-venv, binutils)")
        run(["buildah", "bud", "--isolation", "chroot", "--arch", arch, "--build-arg", f"ARCH={arch}",
             "--label", f"{RECIPE_LABEL}={recipe}",
             "-f", str(ROOT / "images/base/Containerfile.builder"), "-t", builder, str(ROOT / "images/base")],
            what=f"builder base {arch}")


def role_requirements(extra: str, swap: dict[str, str]) -> list[str]:
    """The extra's requirements, with the package's own extras expanded (shopfleet[agent] -> agent's)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    out: list[str] = list(project["dependencies"])
    seen: set[str] = set()

    def expand(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for req in extras[name]:
            if req.startswith("shopfleet["):
                for inner in req[len("shopfleet["):-1].split(","):
                    expand(inner.strip())
            else:
                out.append(req)

    expand(extra)
    result = []
    for req in out:
        bare = req.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip()
        result.append(swap.get(bare, req))
    return sorted(set(result))


def build_wheel(dest: Path) -> Path:
    """Build shopfleet's wheel from a copy of the tree (no build/ or egg-info in the checkout)."""
    src = dest / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")
    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(dest), str(src)], what="building the wheel")
    shutil.rmtree(src)
    (wheel,) = dest.glob("shopfleet-*.whl")
    return wheel


def default_tag() -> str:
    """The commit's short hash, with -dirty when the tree has uncommitted changes."""
    sha = run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"]).strip()
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]).strip()
    return f"{sha}-dirty" if dirty else sha


def ensure_registry(registry: str, cache: Path) -> None:
    """Start Debian's docker-registry on 127.0.0.1:5000 unless something answers /v2/ there."""
    if registry_up(registry):
        return
    if registry != "127.0.0.1:5000":
        raise BuildError(f"registry {registry} does not answer http://{registry}/v2/; start it or pass --no-push")
    conf_dir = Path(tempfile.mkdtemp(prefix="shopfleet-registry-"))
    storage = cache / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "config.yml"
    conf.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: " + str(storage)
        + "\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:5000\n"
    )
    with open(cache / "registry.log", "ab") as log:
        # Detached: it outlives this script, so the next build pushes only what changed.
        proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=log, stderr=log, start_new_session=True)
    (cache / "registry.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if registry_up(registry):
            say(f"registry: docker-registry started on {registry} (pid {proc.pid}, storage {storage}; "
                f"stop it with: kill $(cat {cache / 'registry.pid'}))")
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise BuildError(f"docker-registry did not come up on {registry}; see {cache / 'registry.log'}")


def registry_up(registry: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def build_image(spec: ImageSpec, arch: str, tag: str, ctx: Path, cache: Path, with_cuda: bool) -> str:
    """buildah bud one image for one arch; return its local reference."""
    ref = f"localhost/shopfleet/{spec.name}:{tag}-{arch}"
    args = [a for k, v in spec.build_args().items() for a in ("--build-arg", f"{k}={v}")]
    argv = ["buildah", "bud", "--layers", "--isolation", "chroot", "--arch", arch, "--build-arg", f"ARCH={arch}", *args,
            "-v", f"{cache / 'pip'}:/root/.cache/pip", "-f", str(CONTAINERFILE), "-t", ref, str(ctx)]
    del with_cuda  # carried by requirements.txt (onnxruntime-gpu[cuda,cudnn]), see main()
    # The build machine's CA bundle (PIP_CERT or the system's), so pip works behind a
    # TLS-intercepting proxy; it sits in the mounted pip cache, never in a layer.
    ca = Path(os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():
        shutil.copy2(ca, cache / "pip" / "build-ca.pem")
        argv[2:2] = ["--build-arg", "PIP_CERT=/root/.cache/pip/build-ca.pem"]
    run(argv, what=f"building {spec.name} ({arch})")
    return ref


def check_image(spec: ImageSpec, ref: str, arch: str) -> None:
    """Import-check the image as it runs: read-only root, its own uid; /sys hidden under qemu."""
    argv = ["podman", "run", "--rm", "--runtime", "runc", "--network", "none", "--read-only",
            "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096", "--entrypoint", "/opt/shopfleet/bin/python"]
    if arch in QEMU:
        # ONNX Runtime reads /sys/devices/system/cpu at import and crashes under qemu-user.
        argv += ["--mount", "type=tmpfs,destination=/sys"]
    run([*argv, ref, "-c", spec.check], what=f"import check of {spec.name} ({arch})", timeout=600)


def image_size(ref: str) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", ref]).strip())


def extract_sbom(ref: str, dest: Path) -> str:
    """Copy /opt/shopfleet/sbom.cdx.json out of the image to ``dest``; return its sha256."""
    ctr = run(["podman", "create", "--runtime", "runc", ref]).strip()
    try:
        run(["podman", "cp", f"{ctr}:/opt/shopfleet/sbom.cdx.json", str(dest)], what="copying the SBOM out")
    finally:
        subprocess.run(["podman", "rm", ctr], capture_output=True)
    return hashlib.sha256(dest.read_bytes()).hexdigest()


def make_index(name: str, tag: str, refs: dict[str, str], sboms: dict[str, str]) -> str:
    """(Re)create the manifest list localhost/shopfleet/NAME:TAG with one entry per arch."""
    index = f"localhost/shopfleet/{name}:{tag}"
    subprocess.run(["buildah", "manifest", "rm", index], capture_output=True)
    run(["buildah", "manifest", "create", index], what=f"manifest list {index}")
    for arch, ref in refs.items():
        digest = run(["buildah", "manifest", "add", index, f"containers-storage:{ref}"], what=f"adding {arch}").strip().split()[-1]
        run(["buildah", "manifest", "annotate", "--annotation", f"dev.shopfleet.sbom.sha256={sboms[arch]}",
             "--annotation", "dev.shopfleet.sbom.path=/opt/shopfleet/sbom.cdx.json", index, digest])
    return index


def push_index(index: str, dest: str) -> str:
    """Push the list with every arch's image; return the index digest the registry now holds.

    buildah 1.28 can exit 0 from a push whose connection was cut (tests/containers/
    test_registry_push.py), so success is what the registry says afterwards: the tag must
    resolve to the digest buildah wrote.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".digest") as df:
        proc = subprocess.run(["buildah", "manifest", "push", "--all", "--tls-verify=false", "--digestfile", df.name, index,
                               f"docker://{dest}"], capture_output=True, text=True, timeout=3600)
        digest = Path(df.name).read_text().strip()
    if proc.returncode != 0 or not digest:
        raise BuildError(f"pushing {dest} failed (exit {proc.returncode}, digest {digest or 'none'}): the registry refused "
                         f"or went away mid-push; its tag was not moved. Check the registry and run again "
                         f"(blobs already pushed are not sent twice).\n{proc.stderr.strip()[-2000:]}")
    host, _, rest = dest.partition("/")
    repo, _, tag = rest.rpartition(":")
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", method="HEAD", headers={
        "Accept": "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            held = resp.headers.get("Docker-Content-Digest", "")
    except (urllib.error.URLError, OSError) as exc:
        raise BuildError(f"pushing {dest} failed: the registry does not answer for the tag afterwards ({exc})") from None
    if held != digest:
        raise BuildError(f"pushing {dest} failed: the registry's tag points at {held or 'nothing'}, not the pushed {digest}")
    return digest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=",".join(s.name for s in IMAGES), help="comma-separated images (default: all)")
    p.add_argument("--arches", default=",".join(ARCHES), help="comma-separated arches (default: amd64,arm64)")
    p.add_argument("--registry", default=os.environ.get("SHOPFLEET_REGISTRY", "127.0.0.1:5000"),
                   help="registry HOST:PORT to push to, plain HTTP (default: a docker-registry started on 127.0.0.1:5000)")
    p.add_argument("--repo-prefix", default="shopfleet", help="repository prefix in the registry (REGISTRY/PREFIX/NAME)")
    p.add_argument("--tag", default=None, help="image tag (default: the commit's short hash, -dirty if modified)")
    p.add_argument("--no-push", action="store_true", help="build and index locally only")
    p.add_argument("--with-cuda-libs", action="store_true", help="vision-gpu also gets CUDA 12 and cuDNN 9 from PyPI (~3 GB)")
    p.add_argument("--cache-dir", type=Path, default=default_cache(), help="base roots, pip cache, registry storage")
    p.add_argument("--out", type=Path, default=ROOT / "build/images", help="images.json and SBOMs go here")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.images.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in IMAGES})
    if unknown:
        p.error(f"unknown image(s) {unknown}; known: {[s.name for s in IMAGES]}")
    arches = tuple(a.strip() for a in args.arches.split(",") if a.strip())
    if set(arches) - set(ARCHES):
        p.error(f"arches must be among {ARCHES}")
    specs = [s for s in IMAGES if s.name in names]
    try:
        check_tools(arches, not args.no_push, args.registry)
        cache: Path = args.cache_dir
        (cache / "pip").mkdir(parents=True, exist_ok=True)
        tag = args.tag or default_tag()
        for arch in arches:
            build_base(arch, cache)
        out: Path = args.out
        (out / "sbom").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="shopfleet-images-"))
        say("wheel: building shopfleet's wheel")
        wheel = build_wheel(work / "wheel")
        jobs = [(s, a) for s in specs for a in s.arches if a in arches]
        results: dict[str, dict[str, object]] = {}
        for i, (spec, arch) in enumerate(jobs, 1):
            ctx = work / f"ctx-{spec.name}"
            if not ctx.exists():
                ctx.mkdir()
                shutil.copy2(wheel, ctx / wheel.name)
                shutil.copy2(ROOT / "constraints.txt", ctx / "constraints.txt")
                shutil.copy2(ROOT / "images/prune.py", ctx / "prune.py")
                swap = dict(spec.swap)
                if args.with_cuda_libs and "onnxruntime" in swap:
                    swap["onnxruntime"] = swap["onnxruntime"].replace("onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn]")
                (ctx / "requirements.txt").write_text("\n".join(role_requirements(spec.extra, swap)) + "\n")
            t0 = time.monotonic()
            say(f"[{i}/{len(jobs)}] {spec.name} ({arch}): building")
            ref = build_image(spec, arch, tag, ctx, cache, args.with_cuda_libs)
            check_image(spec, ref, arch)
            size = image_size(ref)
            sbom_path = out / "sbom" / f"{spec.name}-{arch}.cdx.json"
            sbom_sha = extract_sbom(ref, sbom_path)
            entry = results.setdefault(spec.name, {"arches": {}, "image_mb": {}, "sbom": {}})
            entry["arches"][arch] = ref  # type: ignore[index]
            entry["image_mb"][arch] = round(size / 1e6, 1)  # type: ignore[index]
            entry["sbom"][arch] = {"path": str(sbom_path.relative_to(ROOT) if sbom_path.is_relative_to(ROOT) else sbom_path),  # type: ignore[index]
                                   "sha256": sbom_sha}
            say(f"[{i}/{len(jobs)}] {spec.name} ({arch}): done in {time.monotonic() - t0:.0f}s, {size / 1e6:.1f} MB uncompressed")
        # Builds of a subset with the same tag (e.g. amd64 of some images, then arm64 of one) add
        # to the record, and each index covers every arch of that tag still in local storage; a
        # new tag starts a new record.
        record_path = out / "images.json"
        merged: dict[str, dict[str, object]] = {}
        if record_path.exists():
            old = json.loads(record_path.read_text())
            if old.get("tag") == tag:
                merged = old.get("images", {})
        for name, entry in results.items():
            prev = merged.get(name, {})
            for key in ("arches", "image_mb", "sbom"):
                kept = {a: v for a, v in prev.get(key, {}).items() if image_exists(f"localhost/shopfleet/{name}:{tag}-{a}")}
                entry[key] = {**kept, **entry[key]}  # type: ignore[dict-item]
            refs: dict[str, str] = entry["arches"]  # type: ignore[assignment]
            shas = {a: v["sha256"] for a, v in entry["sbom"].items()}  # type: ignore[attr-defined]
            entry["index"] = make_index(name, tag, refs, shas)
        if not args.no_push:
            ensure_registry(args.registry, cache)
            for name, entry in results.items():
                dest = f"{args.registry}/{args.repo_prefix}/{name}:{tag}"
                say(f"push: {dest} ({', '.join(entry['arches'])})")  # type: ignore[arg-type]
                entry["ref"] = dest
                entry["digest"] = push_index(str(entry["index"]), dest)
        merged.update(results)
        record = {"tag": tag, "registry": None if args.no_push else args.registry, "images": merged,
                  "built_s": round(time.monotonic() - _T0)}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    except BuildError as exc:
        say(f"FAILED: {exc}")
        say("nothing was recorded: build/images/images.json still describes the previous complete build")
        return 1
    summary = {"tag": tag, "built_s": round(time.monotonic() - _T0),
               "images": {n: {"digest": e.get("digest"), "image_mb": e["image_mb"]} for n, e in results.items()}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
