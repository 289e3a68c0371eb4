"""Installed size of each role's venv: the wheel installed with one extra into a fresh venv.

Issue 14 asks for the agent role under 60 MB installed: a Raspberry Pi that only runs
``shopfleet agent`` must not carry OpenCV, scipy, onnxruntime, FastAPI or kubernetes-validate.
For each role (agent, applier, vision, controller) this builds the wheel once, installs
``shopfleet[ROLE]`` pinned by constraints.txt into a new venv, and reports:

* ``packages``: site-packages without what every fresh venv has (pip, setuptools), i.e. what
  the role itself installs;
* ``venv``: the whole venv directory (adds pip, setuptools and the venv's own files);
* the five largest distributions of the role, so a regression names its cause.

The reference is a bare venv with nothing installed (pip and setuptools). Sizes count regular
files (no symlinks, no filesystem block rounding), for this machine's platform wheels.

Usage: .venv/bin/python bench/role_sizes.py [--roles agent,vision] [--keep DIR]
The last line is a JSON summary (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.roles import (
    ROLES,
    build_wheel,
    is_venv_own,
    make_role_venv,
    role_bytes,
    site_packages,
    tree_bytes,
)

GOAL_AGENT_MB = 60.0


def mb(n: int) -> float:
    return round(n / 1e6, 1)


def largest(venv: Path, n: int = 5) -> list[tuple[str, float]]:
    """Return the ``n`` largest top-level entries of site-packages (package folders, with their .libs)."""
    sp = site_packages(venv)
    sizes: dict[str, int] = {}
    for entry in sp.iterdir():
        if is_venv_own(entry.name) or entry.name.endswith((".dist-info", ".pth")) or entry.name == "__pycache__":
            continue
        key = entry.name.removesuffix(".libs").removesuffix(".py")
        sizes[key] = sizes.get(key, 0) + (tree_bytes(entry) if entry.is_dir() else entry.stat().st_size)
    return [(k, mb(v)) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--roles", default=",".join(ROLES), help="comma-separated roles (default: %(default)s)")
    ap.add_argument("--keep", type=Path, default=None, help="build the venvs under DIR and keep them")
    args = ap.parse_args()
    roles = [r for r in args.roles.split(",") if r]
    with tempfile.TemporaryDirectory(prefix="role-sizes-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        wheel = build_wheel(work / "wheel")
        import venv as _venv

        bare = work / "bare"
        _venv.create(bare, with_pip=True)
        reference = role_bytes(bare)["venv"]
        print(f"wheel {wheel.name}: {mb(wheel.stat().st_size)} MB; bare venv (pip, setuptools): {mb(reference)} MB")
        result: dict[str, dict[str, float]] = {}
        for role in roles:
            venv = work / role
            make_role_venv(venv, wheel, role)
            sizes = role_bytes(venv)
            result[role] = {"packages_mb": mb(sizes["packages"]), "venv_mb": mb(sizes["venv"])}
            top = ", ".join(f"{k} {v}" for k, v in largest(venv))
            print(f"{role:<10} packages {mb(sizes['packages']):7.1f} MB  venv {mb(sizes['venv']):7.1f} MB  largest: {top}")
        if "agent" in result:
            agent = result["agent"]["packages_mb"]
            print(f"agent role: {agent} MB installed vs goal {GOAL_AGENT_MB} MB ({agent / GOAL_AGENT_MB:.2f} of the goal)")
    print(json.dumps({
        "bench": "role_sizes",
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        "bare_venv_mb": mb(reference),
        "roles": result,
        "agent_goal_mb": GOAL_AGENT_MB,
        "agent_within_goal": result.get("agent", {}).get("packages_mb", 0) < GOAL_AGENT_MB if "agent" in result else None,
        "seconds": round(time.monotonic() - t0, 1),
    }))


if __name__ == "__main__":
    main()
