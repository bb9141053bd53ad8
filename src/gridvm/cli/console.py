"""Attach a terminal (or pipes) to a domain's serial socket; Ctrl-] detaches."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

from gridvm.errors import GridvmError

DETACH = b"\x1d"  # Ctrl-]


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def attach(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        raise GridvmError(f"cannot open console at {path}: {exc.strerror}") from exc
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    if interactive:
        sys.stderr.write("Connected to console; Ctrl-] detaches.\r\n")
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(stdin, selectors.EVENT_READ)
    with _raw(stdin), sock:
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return
                    os.write(stdout, data)
                else:
                    data = os.read(stdin, 4096)
                    if not data:
                        # stdin closed (scripted use): keep reading briefly for the answer
                        sel.unregister(stdin)
                        sock.settimeout(1.0)
                        with contextlib.suppress(TimeoutError, OSError):
                            while chunk := sock.recv(65536):
                                os.write(stdout, chunk)
                        return
                    if interactive and DETACH in data:
                        data = data.split(DETACH, 1)[0]
                        if data:
                            sock.sendall(data)
                        return
                    sock.sendall(data)
