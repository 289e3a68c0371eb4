"""Writing a file so that a reader never sees half of it; extracting a package archive safely.

Like ``shopfleet.errors`` this module imports nothing of the project, so the agent and the
controller may both use it (the import-linter contracts in pyproject.toml allow exactly that).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``path`` with ``mode`` (and ``owner``, uid and gid, if given): a temporary
    file beside it, fsync'd, then renamed.

    A crash leaves either the old file or the new one, never a torn one; the temporary file is
    removed if anything fails. The mode is set before the first byte is written, so a key is never
    readable by others, not even for a moment.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class UnsafeArchive(ValueError):
    """An archive member's name is absolute or leaves the extraction directory."""


def extract_files(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract ``tar`` into ``dest`` with the guarantees of tarfile's ``"data"`` filter, on any Python 3.11.

    The caller has checked that every member is a regular file or a directory. Python before
    3.11.4 (Debian bookworm's 3.11.2, the images' base and a fresh Debian machine's) has no
    extraction filters: there an absolute or escaping name raises :class:`UnsafeArchive` before
    anything is written (links and devices the caller refused already), as the filter would.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    for m in tar.getmembers():
        if m.name.startswith("/") or ".." in Path(m.name).parts:
            raise UnsafeArchive(f"archive member {m.name!r} names a path outside the directory it is extracted to")
    tar.extractall(dest)
