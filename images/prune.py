"""Slim a freshly installed venv before it becomes an image layer (run by every Containerfile).

Removes what no shop process reads - the packages' own test suites, ONNX's backend test data,
C headers, sources, Cython declarations and type stubs - strips debug symbols from the wheels'
shared libraries (binutils' strip of the target arch, inside the build stage), and precompiles every module with unchecked hash-based .pyc files: the
runtime root is read-only, so Python could never write a .pyc there, and mtime-based ones would
be re-checked against files whose mtimes the image layers do not keep.

Usage: python prune.py VENV
"""

import compileall
import py_compile
import re
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
# Build-time files no process reads: C headers and sources, Cython declarations, type stubs.
dev_files = [f for pattern in ("*.h", "*.hpp", "*.c", "*.cpp", "*.pxd", "*.pyx", "*.pyi")
             for f in site.rglob(pattern) if f.is_file() and not f.is_symlink()]
for f in dev_files:
    f.unlink()



def patched_by_auditwheel(f: Path) -> bool:
    """Whether auditwheel rewrote ``f`` with patchelf: a library it grafted into a ``*.libs``
    directory, or a file whose NEEDED it pointed at one (hashed names, RPATH into ``.libs``).
    binutils' strip breaks such files ("ELF load command address/offset not page-aligned",
    seen with numpy's OpenBLAS), so they are left as they are."""
    if f.parent.name.endswith(".libs"):
        return True
    dyn = subprocess.run(["readelf", "-d", str(f)], capture_output=True, text=True).stdout
    return bool(re.search(r"\(NEEDED\).*-[0-9a-f]{8}\.so", dyn)) or ".libs" in "".join(
        line for line in dyn.splitlines() if "RPATH" in line or "RUNPATH" in line)


libs = [f for f in site.rglob("*.so*") if f.is_file() and not f.is_symlink()]
strippable = [str(f) for f in libs if not patched_by_auditwheel(f)] if shutil.which("strip") else []
# --strip-unneeded keeps the dynamic symbol table, so dlopen and linking still work.
for i in range(0, len(strippable), 200):
    subprocess.run(["strip", "--strip-unneeded", *strippable[i:i + 200]], check=False, stderr=subprocess.DEVNULL)

compileall.compile_dir(site, quiet=1, workers=0, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
after = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
print(f"prune: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({len(removed)} test dirs, {len(dev_files)} headers/sources/stubs, {len(strippable)} of {len(libs)} shared libraries stripped)")
