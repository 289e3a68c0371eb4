"""Build the ``kubectl shopfleet`` plugin for Krew: a single-file zipapp, its archive, its manifest.

Krew installs a plugin from a manifest that names an archive by URL and sha256. The plugin uses
only the standard library, so the archive holds one executable zipapp (``kubectl-shopfleet``)
that runs on any Linux or macOS machine with Python 3.11 or newer.

    python scripts/build_kubectl_plugin.py --uri-base https://fleet.example/downloads --out dist/krew

writes ``kubectl-shopfleet`` (the zipapp), ``kubectl-shopfleet-vVERSION.tar.gz`` and
``shopfleet.yaml`` (the Krew manifest) into ``--out``. Publish the archive at
``URI_BASE/kubectl-shopfleet-vVERSION.tar.gz``; users then run
``kubectl krew install --manifest=shopfleet.yaml`` (or drop ``kubectl-shopfleet`` on PATH).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
import tempfile
import tomllib
import zipapp
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SOURCE = ROOT / "shopfleet" / "kubectl_plugin.py"
BIN = "kubectl-shopfleet"


def version() -> str:
    """Return the package version from pyproject.toml (the plugin is versioned with shopfleet)."""
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def build_zipapp(out: Path) -> Path:
    """Write the executable zipapp ``out/kubectl-shopfleet`` and return its path."""
    target = out / BIN
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        (staging / "kubectl_plugin.py").write_text(PLUGIN_SOURCE.read_text())
        (staging / "__main__.py").write_text("import sys\n\nfrom kubectl_plugin import main\n\nsys.exit(main())\n")
        zipapp.create_archive(staging, target, interpreter="/usr/bin/env python3")
    target.chmod(0o755)
    return target


def build_archive(binary: Path, out: Path, ver: str) -> Path:
    """Write a reproducible tar.gz holding the zipapp (fixed mtime and owner, so the sha256 is stable)."""
    archive = out / f"{BIN}-v{ver}.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tar.gettarinfo(str(binary), arcname=BIN)
        info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o755
        with binary.open("rb") as f:
            tar.addfile(info, f)
    archive.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return archive


def manifest(archive: Path, uri_base: str, ver: str) -> dict[str, object]:
    """Return the Krew plugin manifest for ``archive`` published under ``uri_base``."""
    return {
        "apiVersion": "krew.googlecontainertools.github.com/v1alpha2",
        "kind": "Plugin",
        "metadata": {"name": "shopfleet"},
        "spec": {
            "version": f"v{ver}",
            "shortDescription": "Status and rollouts of a shopfleet fleet of cashierless shops",
            "description": (
                "Shows the shopfleet fleet from kubectl: shops with nodes online/stale/offline,\n"
                "a shop's nodes and pipelines, rollouts with their waves, and pause/resume/abort/rollback.\n"
                "A client of the shopfleet controller's REST API; authenticate with an API token\n"
                "(SHOPFLEET_SERVER, SHOPFLEET_TOKEN). Needs python3 (3.11+) on PATH."
            ),
            "caveats": "Set SHOPFLEET_SERVER to your controller's URL and SHOPFLEET_TOKEN to a token from\n'shopfleet tokens create'.",
            "platforms": [{
                "selector": {"matchExpressions": [{"key": "os", "operator": "In", "values": ["linux", "darwin"]}]},
                "uri": f"{uri_base.rstrip('/')}/{archive.name}",
                "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
                "bin": BIN,
                "files": [{"from": BIN, "to": "."}],
            }],
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the kubectl-shopfleet zipapp, its tar.gz and its Krew manifest.")
    p.add_argument("--uri-base", required=True, help="URL the archive will be published under, e.g. https://fleet.example/downloads")
    p.add_argument("--out", type=Path, default=ROOT / "dist" / "krew", help="output directory (default: dist/krew)")
    args = p.parse_args(argv)
    if not args.uri_base.startswith(("https://", "http://", "file://")):
        p.error(f"--uri-base {args.uri_base!r} must be an https://, http:// or file:// URL")
    args.out.mkdir(parents=True, exist_ok=True)
    ver = version()
    binary = build_zipapp(args.out)
    archive = build_archive(binary, args.out, ver)
    doc = manifest(archive, args.uri_base, ver)
    (args.out / "shopfleet.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"wrote {binary}, {archive} and {args.out / 'shopfleet.yaml'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
