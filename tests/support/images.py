"""What the image tests share: scripts/build_images.py loaded as a module (tests.support.scripts), and images/Containerfile's ARGs."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

from tests.support.scripts import load_script


def build_images_module() -> ModuleType:
    """Import scripts/build_images.py (a script, not a package) as the module ``build_images``."""
    return load_script("scripts/build_images.py", "build_images")


def containerfile_args(path: Path) -> dict[str, str | None]:
    """Return the ARGs a Containerfile declares (any stage): name -> default, None where it has none."""
    out: dict[str, str | None] = {}
    for m in re.finditer(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$", path.read_text(), re.M):
        name, default = m.group(1), m.group(2)
        if out.get(name) is None:
            out[name] = default
    return out
