"""Attach a terminal (or pipes) to a domain's console stream (gridvmd's websocket, which
reaches the domain on whichever host runs it); Ctrl-] detaches."""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import threading
import tty
from collections.abc import Iterator

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection

from gridvm.api.client import Client
from gridvm.errors import GridvmError

DETACH = b"\x1d"  # Ctrl-]
DRAIN_S = 1.0     # scripted use: after stdin ends, keep printing the guest's answer this long


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


def _pump_stdin(ws: ClientConnection, interactive: bool, done: threading.Event) -> None:
    """stdin → console, until Ctrl-] (interactive) or the end of stdin."""
    stdin = sys.stdin.fileno()
    try:
        while True:
            data = os.read(stdin, 4096)
            if not data:
                break
            if interactive and DETACH in data:
                head = data.split(DETACH, 1)[0]
                if head:
                    ws.send(head)
                done.set()
                break
            ws.send(data)
    except (OSError, ConnectionClosed):
        done.set()
        return
    if not done.is_set():
        threading.Timer(DRAIN_S, done.set).start()   # let the guest's answer arrive


def attach(client: Client, stream: str) -> None:
    try:
        ws = client.websocket(stream)
    except InvalidStatus as exc:
        raise GridvmError(f"gridvmd refused the console (HTTP {exc.response.status_code})") \
            from None
    except (OSError, WebSocketException) as exc:
        raise GridvmError(f"cannot open the console: {exc}") from None
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    if interactive:
        sys.stderr.write("Connected to console; Ctrl-] detaches.\r\n")
    done = threading.Event()
    threading.Thread(target=_pump_stdin, args=(ws, interactive, done), daemon=True).start()
    with _raw(stdin), contextlib.closing(ws):
        while not done.is_set():
            try:
                data = ws.recv(timeout=0.2)
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code >= 4000:
                    raise GridvmError(exc.rcvd.reason or "console refused") from None
                return
            os.write(stdout, data if isinstance(data, bytes) else data.encode())
