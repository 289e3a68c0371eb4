"""Writing a file so that a reader never sees half of it.

Like ``shopfleet.errors`` this module imports nothing of the project, so the agent and the
controller may both use it (the import-linter contracts in pyproject.toml allow exactly that).
"""

from __future__ import annotations

import os
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
