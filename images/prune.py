"""Slim a freshly installed venv before it becomes an image layer (run by every Containerfile).

Removes what no shop process reads - the packages' own test suites and ONNX's backend test data
- strips debug symbols from the wheels' shared libraries (binutils' strip of the target arch,
inside the build stage), and precompiles every module with unchecked hash-based .pyc files: the
runtime root is read-only, so Python could never write a .pyc there, and mtime-based ones would
be re-checked against files whose mtimes the image layers do not keep.

Usage: python prune.py VENV
"""

import compileall
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

venv = Path(sys.argv[1])
site = next((venv / "lib").glob("python3*/site-packages"))
before = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())

removed = []
for d in sorted(site.rglob("tests")):
    if d.is_dir() and d.parent.name != "site-packages":
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
onnx_data = site / "onnx" / "backend" / "test" / "data"
if onnx_data.is_dir():
    shutil.rmtree(onnx_data)

libs = [str(f) for f in site.rglob("*.so*") if f.is_file() and not f.is_symlink()]
if libs and shutil.which("strip"):
    # --strip-unneeded keeps the dynamic symbol table, so dlopen and linking still work.
    for i in range(0, len(libs), 200):
        subprocess.run(["strip", "--strip-unneeded", *libs[i:i + 200]], check=False, stderr=subprocess.DEVNULL)

compileall.compile_dir(site, quiet=1, workers=0, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
after = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
print(f"prune: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({len(removed)} test dirs, {len(libs)} shared libraries stripped)")
