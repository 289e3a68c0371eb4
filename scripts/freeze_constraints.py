"""Write constraints.txt: the exact version of every package the extras pull, as installed here.

Run it from the venv CI tests with (``make constraints``). It walks the requirements of
pyproject.toml's extras (the ``dev`` extra includes all of them) through the installed packages'
metadata, so the file pins exactly what the roles install and nothing else in the venv (pip,
build tools, packages installed by hand). ``pip install -c constraints.txt`` then installs the
versions that were tested.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def closure(project: dict) -> dict[str, str]:
    """Return {distribution name: installed version} for everything the extras pull."""
    extras = project["optional-dependencies"]
    todo: list[tuple[Requirement, frozenset[str]]] = [(Requirement(r), frozenset()) for r in project["dependencies"]]
    for reqs in extras.values():
        todo += [(Requirement(r), frozenset()) for r in reqs]
    seen: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        if name == "shopfleet":
            continue  # the project's own extras are listed above
        key = (name, frozenset(req.extras))
        if key in visited:
            continue
        visited.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            sys.exit(f"{req.name} is not installed in {sys.prefix}: install '.[dev]' first")
        seen[dist.metadata["Name"]] = dist.version
        for spec in dist.requires or []:
            sub = Requirement(spec)
            env_ok = sub.marker is None or any(
                sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})
            )
            if env_ok:
                todo.append((sub, frozenset()))
    return seen


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = closure(project)
    lines = [
        "# The versions CI tests with: every package the extras of pyproject.toml pull, pinned.",
        "# Used by the Makefile's installs (pip install -c constraints.txt). Regenerate with",
        "# 'make constraints' from a venv with '.[dev]' installed after changing a dependency.",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda kv: kv[0].lower())]
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(pins)} packages")


if __name__ == "__main__":
    main()
