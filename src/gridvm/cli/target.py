"""Which gridvmd the CLI talks to: a home's (--home, $GRIDVM_HOME) over its Unix socket, or
a lab host's (--host, $GRIDVM_HOST) over HTTPS with the lab's certificate."""

from __future__ import annotations

import os

from gridvm.api.client import Client
from gridvm.errors import GridvmError
from gridvm.paths import Home


def lab_host(home: str | None, host: str | None) -> str | None:
    """The `--host HOST|LAB/HOST` (or $GRIDVM_HOST) asked for, if any."""
    host = host or os.environ.get("GRIDVM_HOST") or None
    if host and home:
        raise GridvmError("give either --home or --host, not both")
    return host


def connect(home: Home, host: str | None, timeout: float = 120) -> Client:
    """A client for the home's gridvmd, or for lab host `host`."""
    if not host:
        return Client(home, timeout=timeout)
    from gridvm.lab.lab import client, find_host

    state, found = find_host(host)
    return client(state, found, timeout)
