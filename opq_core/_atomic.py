"""Atomic writes: a temporary file in the target's folder, fsync, then rename; new files
honour the umask; temporaries of killed writers are removed on the next write."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


_TMP_TAG = ".opqtmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temporaries(path) -> list:
    """Remove the temporary files that an interrupted :func:`atomic_write` of ``path``
    left next to it (their writer, named in the file name, is no longer running).
    Returns the removed paths."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    prefix = f".{path.name}{_TMP_TAG}"
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        full = folder / name
        try:
            if full.is_file() and not full.is_symlink():
                full.unlink()
                removed.append(str(full))
        except OSError:  # pragma: no cover - a race with another cleaner
            pass
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn, *, mode="wb"):
    """Call ``write_fn(file)`` on a temporary file next to ``path``, fsync, rename.

    The previous file at ``path`` (if any) stays intact when anything fails; the temporary
    file is removed on any exception, KeyboardInterrupt and SystemExit included (the
    command line turns SIGTERM into one), and one left by a killed writer is removed by
    the next write of ``path``. The new file gets the permissions the umask gives
    (``0o666 & ~umask``), like any file the user creates.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_TAG}{os.getpid()}.", suffix=".tmp",
                               dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


