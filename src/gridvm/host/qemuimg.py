"""`qemu-img` for disks that no QEMU has open (a stopped domain's): information, internal
snapshots, persistent dirty bitmaps, creation and conversion. One wrapper, blocking calls in
worker threads; a failure is one line naming the image.
"""

from __future__ import annotations

import json
from typing import Any

from gridvm.errors import Conflict, GridvmError
from gridvm.host import procs

TIMEOUT_S = 600.0


async def _run(*argv: str, timeout: float = 60) -> str:
    try:
        proc = await procs.arun(["qemu-img", *argv], timeout=timeout)
    except procs.CommandError as exc:
        text = str(exc)
        if "lock" in text.lower():
            raise Conflict(f"{argv[-1]} is in use by a running QEMU ({text})") from None
        raise GridvmError(f"qemu-img {argv[0]} {argv[-1]}: {text}") from None
    return proc.stdout.decode(errors="replace")


async def info(path: str, fmt: str | None = None, *, shared: bool = False) -> dict[str, Any]:
    """`qemu-img info` of an image (its snapshots, bitmaps, sizes); `shared`: also of an
    image a running QEMU has open (a look, not a promise it stays so)."""
    out = await _run("info", "--output=json", *(["-U"] if shared else []),
                     *(["-f", fmt] if fmt else []), path)
    data: dict[str, Any] = json.loads(out)
    return data


def snapshot_tags(data: dict[str, Any]) -> list[str]:
    return [str(s["name"]) for s in data.get("snapshots", [])]


def bitmaps(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Persistent bitmaps: name and whether usable (not flagged in-use by a QEMU that died)."""
    found = data.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return [{"name": str(b["name"]), "inconsistent": "in-use" in b.get("flags", []),
             "recording": "auto" in b.get("flags", [])} for b in found]


async def snapshot(path: str, op: str, name: str) -> None:
    """Internal snapshot `name`: op c (create), a (apply) or d (delete)."""
    await _run("snapshot", f"-{op}", name, path, timeout=TIMEOUT_S)


async def bitmap(path: str, *args: str) -> None:
    """`qemu-img bitmap` (--add NAME, --remove NAME, --merge SRC NAME, --disable NAME …)."""
    await _run("bitmap", *args[:-1], path, args[-1])


async def create(path: str, fmt: str, size: int) -> None:
    await _run("create", "-q", "-f", fmt, path, str(size))


async def convert(src: str, src_fmt: str, dst: str, dst_fmt: str) -> None:
    await _run("convert", "-q", "-f", src_fmt, "-O", dst_fmt, src, dst, timeout=3600)

