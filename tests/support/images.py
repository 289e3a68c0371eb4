"""What the image tests share: scripts/build_images.py loaded as a module, and images/Containerfile's ARGs."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def build_images_module() -> ModuleType:
    """Import scripts/build_images.py (a script, not a package) as the module ``build_images``."""
    spec = importlib.util.spec_from_file_location("build_images", ROOT / "scripts/build_images.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_images"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def containerfile_args(path: Path) -> dict[str, str | None]:
    """Return the ARGs a Containerfile declares (any stage): name -> default, None where it has none."""
    out: dict[str, str | None] = {}
    for m in re.finditer(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$", path.read_text(), re.M):
        name, default = m.group(1), m.group(2)
        if out.get(name) is None:
            out[name] = default
    return out
