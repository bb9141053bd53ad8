"""A small blocking NBD client for QEMU's NBD servers (QMP `nbd-server-start`, `qemu-nbd`).

Fixed newstyle negotiation with structured replies, so it can read, write, flush and ask
for block status in a metadata context: `base:allocation` (holes and zeros) or
`qemu:dirty-bitmap:NAME` (what a dirty bitmap marks). Used by backups (reading a point-in-time
view of a disk, only what changed) and restores (writing into a new image). Blocking: run it
in a thread.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gridvm.errors import GridvmError

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3
TFLAG_READ_ONLY = 2

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 1, 2, 3, 7
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_STATUS = 0, 1, 2, 5
CHUNK_ERROR_BIT = 1 << 15

STATE_HOLE = 1      # base:allocation: unallocated
STATE_ZERO = 2      # base:allocation: reads as zeros
STATE_DIRTY = 1     # qemu:dirty-bitmap:*: changed
ALLOCATION = "base:allocation"
MAX_STATUS = 1 << 30
TIMEOUT_S = 120.0


class NbdError(GridvmError):
    """The NBD server refused or broke the protocol."""


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    flags: int


def dirty_bitmap(name: str) -> str:
    """The metadata context of QEMU's dirty bitmap `name`."""
    return f"qemu:dirty-bitmap:{name}"


class NbdClient:
    """One connection to one export (`with NbdClient.unix(path, name) as nbd: …`)."""

    def __init__(self, sock: socket.socket, export: str, contexts: tuple[str, ...] = ()) -> None:
        self.sock = sock
        self.export = export
        self.size = 0
        self.read_only = False
        self.max_payload = 32 << 20
        self.contexts: dict[str, int] = {}
        self._cookie = 0
        try:
            self._negotiate(contexts)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def unix(cls, path: Path, export: str, contexts: tuple[str, ...] = ()) -> NbdClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT_S)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise NbdError(f"cannot reach the NBD server at {path}: {exc.strerror or exc}") \
                from None
        return cls(sock, export, contexts)

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._request(CMD_DISC, 0, 0)
        self.sock.close()

    # ----- wire ---------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise NbdError("the NBD server closed the connection")
            got += k
        return bytes(buf)

    def _option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, got, kind, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC or got != opt:
            raise NbdError("unexpected NBD option reply")
        data = self._recv(length)
        if kind & (1 << 31):
            text = data[4:].decode(errors="replace") if length > 4 else ""
            raise NbdError(f"NBD server refused option {opt} (error {kind & 0xFFFF}"
                           + (f": {text}" if text else "") + ")")
        return kind, data

    def _negotiate(self, contexts: tuple[str, ...]) -> None:
        head = self._recv(18)
        if head[:8] != NBDMAGIC or struct.unpack(">Q", head[8:16])[0] != IHAVEOPT:
            raise NbdError("not a newstyle NBD server")
        (flags,) = struct.unpack(">H", head[16:18])
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("the NBD server lacks fixed newstyle negotiation")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY)
        self._option_reply(OPT_STRUCTURED_REPLY)
        name = self.export.encode()
        if contexts:
            body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
            for ctx in contexts:
                body += struct.pack(">I", len(ctx.encode())) + ctx.encode()
            self._option(OPT_SET_META_CONTEXT, body)
            while True:
                kind, data = self._option_reply(OPT_SET_META_CONTEXT)
                if kind == REP_ACK:
                    break
                if kind == REP_META_CONTEXT:
                    self.contexts[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
            missing = [c for c in contexts if c not in self.contexts]
            if missing:
                raise NbdError(f"export {self.export!r} has no {missing[0]}")
        self._option(OPT_GO, struct.pack(">I", len(name)) + name
                     + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
        while True:
            kind, data = self._option_reply(OPT_GO)
            if kind == REP_ACK:
                break
            if kind == REP_INFO:
                (info,) = struct.unpack(">H", data[:2])
                if info == INFO_EXPORT:
                    self.size, tflags = struct.unpack(">QH", data[2:12])
                    self.read_only = bool(tflags & TFLAG_READ_ONLY)
                elif info == INFO_BLOCK_SIZE:
                    self.max_payload = struct.unpack(">III", data[2:14])[2]

    def _request(self, cmd: int, offset: int, length: int, data: bytes = b"") -> int:
        self._cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self._cookie, offset,
                                      length) + data)
        return self._cookie

    def _replies(self, cookie: int) -> Iterator[tuple[int, bytes]]:
        """(chunk type, payload) of one request's reply until it is done."""
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, got = struct.unpack(">IQ", self._recv(12))
                self._check(got, cookie)
                if error:
                    raise NbdError(f"NBD request failed (errno {error})")
                return
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdError("NBD reply with a bad magic number")
            flags, kind, got, length = struct.unpack(">HHQI", self._recv(16))
            self._check(got, cookie)
            payload = self._recv(length)
            if kind & CHUNK_ERROR_BIT:
                error, msglen = struct.unpack(">IH", payload[:6])
                text = payload[6:6 + msglen].decode(errors="replace")
                raise NbdError(f"NBD request failed (errno {error}): {text}")
            yield kind, payload
            if flags & REPLY_FLAG_DONE:
                return

    @staticmethod
    def _check(got: int, cookie: int) -> None:
        if got != cookie:
            raise NbdError("NBD reply for another request")

    # ----- commands -----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (holes read as zeros)."""
        out = bytearray(length)
        for at in range(0, length, self.max_payload):
            n = min(self.max_payload, length - at)
            cookie = self._request(CMD_READ, offset + at, n)
            for kind, payload in self._replies(cookie):
                if kind == CHUNK_DATA:
                    (where,) = struct.unpack(">Q", payload[:8])
                    start = where - offset
                    out[start:start + len(payload) - 8] = payload[8:]
                elif kind == CHUNK_HOLE:
                    continue       # already zeros
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        for at in range(0, len(data), self.max_payload):
            part = data[at:at + self.max_payload]
            cookie = self._request(CMD_WRITE, offset + at, len(part), part)
            for _ in self._replies(cookie):
                pass

    def flush(self) -> None:
        for _ in self._replies(self._request(CMD_FLUSH, 0, 0)):
            pass

    def extents(self, context: str, offset: int = 0, length: int | None = None
                ) -> Iterator[Extent]:
        """The extents of [offset, offset+length) in `context`, in order, covering it."""
        end = self.size if length is None else offset + length
        ctx = self.contexts[context]
        at = offset
        while at < end:
            cookie = self._request(CMD_BLOCK_STATUS, at, min(end - at, MAX_STATUS))
            start = at
            for kind, payload in self._replies(cookie):
                if kind != CHUNK_STATUS or struct.unpack(">I", payload[:4])[0] != ctx:
                    continue
                for i in range(4, len(payload), 8):
                    n, flags = struct.unpack(">II", payload[i:i + 8])
                    n = min(n, end - at)
                    if n > 0:
                        yield Extent(at, n, flags)
                        at += n
            if at == start:
                raise NbdError("the NBD server answered block status without progress")
