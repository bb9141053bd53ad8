"""Network namespaces: create/remove them and run code or commands inside one.

A namespace is per thread in Linux, so `call_in` runs a function in a fresh thread that
has entered the namespace; the caller's thread never moves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import netns as _netns

from gridvm.errors import GridvmError

T = TypeVar("T")
NETNS_DIR = Path("/run/netns")


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create(name: str) -> None:
    if exists(name):
        raise GridvmError(f"network namespace {name} already exists")
    _netns.create(name)


def remove(name: str) -> None:
    """Remove a namespace if it exists (idempotent)."""
    if exists(name):
        _netns.remove(name)


def exec_prefix(name: str | None) -> list[str]:
    """argv prefix that runs a command inside namespace `name` (nothing for the root one)."""
    return ["ip", "netns", "exec", name] if name else []


def call_in(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that has joined namespace `name`; return its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            _netns.setns(name, flags=0)  # per-thread in Linux; flags=0: never create
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
