"""Crash-safe file writing: the one helper every output of the package goes through.

`atomic_write(path, write)` lets `write` fill a temporary file in the target folder, fsyncs
it, renames it over `path` (`os.replace`, atomic on POSIX and Windows) and fsyncs the folder
so the rename itself survives a power cut. A crash, `kill -9` or a full disk at any moment
leaves either the old file or the new one, never a torn one; the temporary file is named
`.NAME.<random>.tmp` (hidden, never matching an output name) and removed on any error.

The file gets the usual permissions (0666 minus the umask, 0644 by default): `mkstemp`
creates 0600, which a ComfyUI / A1111 running under another account cannot read.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from eridiffusion.faults import DiskFull

TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # what atomic_write leaves behind after kill -9
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT} if hasattr(errno, "EDQUOT") else {errno.ENOSPC}


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restore at once
    os.umask(mask)
    return mask


_UMASK = _umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (POSIX; Windows cannot open folders, nothing to do)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], exclusive: bool = False) -> Path:
    """Create or replace `path` with what `write(tmp_path)` writes to `tmp_path`; returns `path`.

    Raises `faults.DiskFull` (one line, naming the file and the free space) when the disk or
    quota is full; the previous `path`, if any, is untouched. `exclusive=True` never replaces:
    the finished file is hard-linked to `path`, which raises FileExistsError if it exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after `write`: safetensors replaces the file it is given
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
            tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise DiskFull(path) from None
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Give the finished `tmp` the name `path` only if nothing has it (atomic with hard links)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:  # no hard links on this file system (FAT, some network mounts)
        if e.errno not in {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}:
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.rename(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`atomic_write` of a bytes object."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete what `atomic_write` left in `folder` (not below it) when its process was killed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and TEMP_NAME.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
