"""The save-file format: a header carrying the domain config, then QEMU's migration stream."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from gridvm.config.model import DomainConfig
from gridvm.errors import GridvmError

MAGIC = b"GRIDVM-SAVE\x001"
_LEN = struct.Struct(">I")


class SaveFileError(GridvmError):
    """A file is not a readable gridvm save file."""


def write_header(path: Path, config: DomainConfig) -> int:
    """Create `path` with the header; return the offset where the memory stream starts."""
    body = json.dumps({"config": config.model_dump(mode="json")}).encode()
    with open(path, "xb") as f:
        f.write(MAGIC + _LEN.pack(len(body)) + body)
    return len(MAGIC) + _LEN.size + len(body)


def read_header(path: Path) -> tuple[DomainConfig, int]:
    """The saved config and the offset of the memory stream."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _LEN.size)
            if len(head) < len(MAGIC) + _LEN.size or not head.startswith(MAGIC):
                raise SaveFileError(f"{path}: not a gridvm save file")
            (n,) = _LEN.unpack(head[len(MAGIC):])
            body = f.read(n)
    except FileNotFoundError as exc:
        raise SaveFileError(f"{path}: no such file") from exc
    try:
        config = DomainConfig.model_validate(json.loads(body)["config"])
    except (ValueError, KeyError) as exc:
        raise SaveFileError(f"{path}: damaged header ({exc})") from exc
    return config, len(head) + n
