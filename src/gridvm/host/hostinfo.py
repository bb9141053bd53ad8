"""Facts about this host: memory, CPUs, QEMU build."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gridvm.errors import ResourceError

QEMU_CANDIDATES = ("qemu-system-x86_64",)


def meminfo_mb() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) // 1024
    return out


def ncpus() -> int:
    return os.cpu_count() or 1


def qemu_binary() -> str:
    """The QEMU system emulator ($GRIDVM_QEMU overrides)."""
    env = os.environ.get("GRIDVM_QEMU")
    if env:
        return env
    for name in QEMU_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise ResourceError("qemu-system-x86_64 not found: run scripts/setup.sh")


def check_memory(needed_mb: int, reserve_mb: int = 64) -> None:
    """Refuse a domain whose memory the host cannot provide right now."""
    avail = meminfo_mb().get("MemAvailable", 0) - reserve_mb
    if needed_mb > avail:
        raise ResourceError(
            f"domain needs {needed_mb} MiB but the host has only {max(avail, 0)} MiB available"
        )
