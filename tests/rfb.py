"""A minimal RFB (VNC) client for tests: version and security handshake (None or VNC
password authentication), ServerInit, and one full framebuffer update in Raw encoding.
It speaks over any `recv(n)`/`send(data)` pair, so a TCP socket and a websocket both work."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes


class RfbError(Exception):
    pass


@dataclass
class Screen:
    width: int
    height: int
    name: str
    security: list[int]
    pixels: bytes = b""


def vnc_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication: the challenge DES-encrypted with the password (bits of each key
    byte reversed, as VNC does); 3DES with one key repeated is DES."""
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return enc.update(challenge) + enc.finalize()


class Rfb:
    def __init__(self, recv: Callable[[int], bytes], send: Callable[[bytes], None]) -> None:
        self._recv, self.send = recv, send
        self.buf = b""

    def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self._recv(65536)
            if not data:
                raise RfbError("connection closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def handshake(self, password: str | None = None) -> Screen:
        version = self.recv(12)
        if not version.startswith(b"RFB 003."):
            raise RfbError(f"not an RFB server: {version!r}")
        self.send(b"RFB 003.008\n")
        (count,) = struct.unpack("B", self.recv(1))
        if count == 0:
            (n,) = struct.unpack(">I", self.recv(4))
            raise RfbError(self.recv(n).decode())
        types = list(self.recv(count))
        if password is not None and 2 in types:
            self.send(b"\x02")
            self.send(vnc_response(password, self.recv(16)))
        elif 1 in types:
            self.send(b"\x01")
        else:
            raise RfbError(f"no usable security type in {types}")
        (result,) = struct.unpack(">I", self.recv(4))
        if result != 0:
            (n,) = struct.unpack(">I", self.recv(4))
            raise RfbError(f"authentication failed: {self.recv(n).decode()}")
        self.send(b"\x01")                      # ClientInit: shared
        width, height = struct.unpack(">HH", self.recv(4))
        self.pixel_format = self.recv(16)
        (n,) = struct.unpack(">I", self.recv(4))
        return Screen(width, height, self.recv(n).decode(), types)

    def framebuffer(self, screen: Screen) -> bytes:
        """Ask for the whole screen; the pixels of the first update (Raw encoding)."""
        bpp = self.pixel_format[0] // 8
        self.send(struct.pack(">BBHHHH", 3, 0, 0, 0, screen.width, screen.height))
        while True:
            (kind,) = struct.unpack("B", self.recv(1))
            if kind == 0:
                break
            raise RfbError(f"unexpected server message {kind}")
        _, rects = struct.unpack(">BH", self.recv(3))
        pixels = b""
        for _ in range(rects):
            x, y, w, h, enc = struct.unpack(">HHHHi", self.recv(12))
            if enc != 0:
                raise RfbError(f"unexpected encoding {enc}")
            pixels += self.recv(w * h * bpp)
        return pixels


def over_tcp(host: str, port: int, timeout: float = 10) -> tuple[Rfb, socket.socket]:
    sock = socket.create_connection((host, port), timeout=timeout)
    return Rfb(sock.recv, sock.sendall), sock
