"""Atomic, durable writes: fsynced files, and a folder swapped into place in one step.

`replace_folder` writes a whole folder into a temporary one beside the target (`.<name>.tmp-*`),
fsyncs every file and the folder, then renames it into place, so a reader sees the old folder or
the new one, never a mix. On Linux an existing target is swapped out in one step with
renameat2(RENAME_EXCHANGE); where that is missing (glibc < 2.28, musl, other systems) the old
folder is first renamed aside (`.<name>.old-*`), and for an instant the target is absent.

A process killed mid-write leaves these names behind: `remove_stale_temp` deletes a temporary
folder, `recover_replace` puts back an old folder whose replacement never arrived. Both must run
under the writer lock of the target (app/retrieval/live.py), or they could take a write that
another process has in flight.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def write_synced(path: Path, blob: bytes) -> None:
    """Write `blob` to `path` and fsync it (the folder entry needs `fsync_dir`)."""
    with path.open("wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(target: Path, write: Callable[[Path], T]) -> T:
    """Call `write(folder)` on an empty temporary folder, then swap it in as `target`; an
    existing `target` is replaced and deleted. On any error `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a server under another uid must read it
    try:
        result = write(tmp)
        fsync_dir(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def remove_stale_temp(path: Path) -> None:
    """Temporary folders a killed write left beside `path` (call with the writer lock held)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        logger.warning("removing %s, left by an interrupted index write", stale)
        shutil.rmtree(stale, ignore_errors=True)


def displaced(path: Path) -> list[Path]:
    """Old folders the two-rename swap moved aside from `path`, oldest name first."""
    return sorted(path.parent.glob(f".{path.name}.old-*"))


def recover_replace(path: Path) -> None:
    """Undo a swap killed between its two renames (only where renameat2 is missing): the old
    folder is put back (call with the writer lock held)."""
    if path.exists():
        return
    olds = displaced(path)
    if olds:
        logger.warning("restoring %s from %s, left by an interrupted index swap", path, olds[-1])
        os.rename(olds[-1], path)


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder `new` to `target`; an existing `target` is replaced and deleted."""
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old folder
    else:
        # no atomic exchange here: for an instant `target` is absent (readers get IndexNotFound)
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old)
    fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
