"""The save-file format: a header carrying the domain config, then QEMU's migration stream."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pydantic import ValidationError

from gridvm.config.model import DomainConfig
from gridvm.errors import GridvmError
from gridvm.files import FileRefused, open_regular

MAGIC = b"GRIDVM-SAVE\x001"
_LEN = struct.Struct(">I")
MAX_HEADER = 1 << 20


class SaveFileError(GridvmError):
    """A file is not a readable gridvm save file."""


def write_header(path: Path, config: DomainConfig) -> int:
    """Create `path` with the header; return the offset where the memory stream starts."""
    body = json.dumps({"config": config.model_dump(mode="json")}).encode()
    with open(path, "xb") as f:
        f.write(MAGIC + _LEN.pack(len(body)) + body)
    return len(MAGIC) + _LEN.size + len(body)


def read_header(path: Path) -> tuple[DomainConfig, int]:
    """The saved config and the offset of the memory stream (blocking: a FIFO, a directory
    or a device is refused before anything is read)."""
    try:
        with open_regular(path) as f:
            head = f.read(len(MAGIC) + _LEN.size)
            if len(head) < len(MAGIC) + _LEN.size or not head.startswith(MAGIC):
                raise SaveFileError(f"{path}: not a gridvm save file")
            (n,) = _LEN.unpack(head[len(MAGIC):])
            if n > MAX_HEADER:
                raise SaveFileError(f"{path}: damaged header (claims {n} bytes)")
            body = f.read(n)
    except FileNotFoundError as exc:
        raise SaveFileError(f"{path}: no such file") from exc
    except FileRefused as exc:
        raise SaveFileError(str(exc)) from exc
    except OSError as exc:
        raise SaveFileError(f"{path}: {exc.strerror or exc}") from exc
    try:
        config = DomainConfig.model_validate(json.loads(body)["config"])
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SaveFileError(f"{path}: invalid config in header: {where}: {err['msg']}") \
            from None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SaveFileError(f"{path}: damaged header ({type(exc).__name__})") from None
    return config, len(head) + n
