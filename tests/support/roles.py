"""Build shopfleet's wheel and install it per role into fresh venvs (tests/packaging, bench/role_sizes.py).

The wheel is built from a copy of the source tree, so the checkout gets no ``build/`` or
``*.egg-info`` and a test run sees exactly the files it would ship. Installs go through pip with
constraints.txt (the versions CI tests with) and pip's cache, so after the first run no package
is downloaded again; pass ``find_links`` to install from a local wheelhouse with no index at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
ROLES = ("agent", "applier", "vision", "controller")
"""The roles whose venvs are measured; each is an extra of pyproject.toml."""

HEAVY = ("cv2", "onnxruntime", "scipy", "fastapi", "kubernetes_validate", "sqlalchemy", "uvicorn")
"""Modules a shop's agent-only install must not have (README.md, "Install per role")."""

_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"
)


def _run(argv: Sequence[str | os.PathLike[str]], timeout: float, cwd: Path | None = None) -> str:
    """Run ``argv``; return its stdout, or fail with the command and the tail of its output."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def build_wheel(out_dir: Path, python: str = sys.executable) -> Path:
    """Build shopfleet's wheel from a copy of the tree into ``out_dir`` and return its path."""
    src = out_dir / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_IGNORE)
    wheels = out_dir / "wheels"
    _run([python, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", wheels, src], timeout=600)
    (wheel,) = wheels.glob("shopfleet-*.whl")
    return wheel


def make_role_venv(venv: Path, wheel: Path, role: str, *, find_links: Path | None = None,
                   python: str = sys.executable) -> Path:
    """Create ``venv`` and install the wheel with ``role``'s extra, pinned by constraints.txt; return its bin/."""
    _run([python, "-m", "venv", venv], timeout=300)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "-c", CONSTRAINTS]
    if find_links is not None:
        pip += ["--find-links", find_links]
    _run([*pip, f"shopfleet[{role}] @ {wheel.as_uri()}"], timeout=1200)
    return venv / "bin"


def installed(bin_dir: Path, modules: Sequence[str]) -> list[str]:
    """Return which of ``modules`` the venv of ``bin_dir`` can import (found on its path, not imported)."""
    code = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    return _run([bin_dir / "python", "-c", code, *modules], timeout=60).split()


def tree_bytes(path: Path) -> int:
    """Return the bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def site_packages(venv: Path) -> Path:
    """Return the venv's site-packages directory."""
    (sp,) = (venv / "lib").glob("python3*/site-packages")
    return sp


VENV_OWN = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence.pth")
"""What ``python -m venv`` itself puts in site-packages (Python 3.11 seeds pip and setuptools)."""


def is_venv_own(name: str) -> bool:
    """Return True for a site-packages entry that every venv has, whatever it installs."""
    return name.startswith(VENV_OWN)


def role_bytes(venv: Path) -> dict[str, int]:
    """Return the venv's installed size: ``venv`` (all of it) and ``packages`` (site-packages without
    what every fresh venv has, i.e. what the role installs)."""
    sp = site_packages(venv)
    base = sum(tree_bytes(p) if p.is_dir() else p.stat().st_size for p in sp.iterdir() if is_venv_own(p.name))
    return {"venv": tree_bytes(venv), "packages": tree_bytes(sp) - base}
