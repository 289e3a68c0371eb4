"""A script of the repository (scripts/, bench/: files, not packages) imported as a module, for the tests of what it holds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(relpath: str, name: str) -> ModuleType:
    """Import ``ROOT/relpath`` as the module ``name`` (registered in ``sys.modules``: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    assert spec and spec.loader, relpath
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
