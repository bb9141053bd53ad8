"""Reading files a user names: regular files only, bounded in size, never blocking on open.

A FIFO, a device or a directory given where a config or save file is expected must be
refused before anything reads from it (a FIFO's open blocks until a writer comes; /dev/zero
never ends). Files are opened with O_NONBLOCK and checked with fstat on the open descriptor,
so the check and the read concern the same file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from gridvm.errors import GridvmError


class FileRefused(GridvmError):
    """A path names something that is not a readable regular file of acceptable size."""


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def open_regular(path: Path, *, limit: int | None = None) -> BinaryIO:
    """`path` opened for reading, after checking it is a regular file (of at most `limit`
    bytes). Raises FileRefused, or OSError (FileNotFoundError, PermissionError…)."""
    if "\0" in str(path):
        raise FileRefused(f"{str(path)!r}: a path cannot contain a NUL character")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise FileRefused(f"{path} is {kind}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise FileRefused(f"{path} is too large ({st.st_size} bytes; at most {limit})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, *, limit: int) -> bytes:
    """The contents of regular file `path`, at most `limit` bytes (a file that grows past it
    while being read is refused too)."""
    with open_regular(path, limit=limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileRefused(f"{path} is too large (more than {limit} bytes)")
    return data
