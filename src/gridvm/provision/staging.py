"""Atomic image creation: build in a hidden temporary directory, rename into place.

An image either exists complete (with its image.json) or not at all: a failed or
interrupted build leaves nothing behind (leftovers of a killed build are swept by the
next one), and two builds of one name serialize on a lock file.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gridvm.errors import ConfigError, Conflict, ResourceError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
LOCK_TIMEOUT = 3600.0


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid image name {name!r} (letters, digits, '.', '_', '-')")
    return name


@contextmanager
def locked(images_dir: Path, name: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the build lock of image `name`."""
    images_dir.mkdir(parents=True, exist_ok=True)
    with (images_dir / f".{name}.lock").open("a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ResourceError(f"image {name}: another build holds its lock") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sweep(images_dir: Path, name: str) -> None:
    """Remove what a killed build of `name` left behind."""
    for stale in images_dir.glob(f".{name}.build-*"):
        pid = stale.name.rsplit("-", 2)[-2] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


@contextmanager
def staged(images_dir: Path, name: str, *, replace: bool,
           exists: Callable[[], bool] | None = None) -> Iterator[Path]:
    """A work directory; on success its `out/` becomes images_dir/name (atomically).

    `replace=False` refuses an existing image (checked again under the lock). On any
    error the work directory is removed and the image store is unchanged.
    """
    check_name(name)
    final = images_dir / name
    with locked(images_dir, name):
        if not replace and (final.exists() or (exists is not None and exists())):
            raise Conflict(f"image {name!r} already exists")
        sweep(images_dir, name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.build-{os.getpid()}-", dir=images_dir))
        try:
            (work / "out").mkdir()
            yield work
            _replace_dir(work / "out", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _replace_dir(new: Path, final: Path) -> None:
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
