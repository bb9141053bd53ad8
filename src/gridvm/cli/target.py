"""Which gridvmd the CLI talks to: a home (--home, $GRIDVM_HOME) or a lab host (--host)."""

from __future__ import annotations

import os
from pathlib import Path

from gridvm.errors import GridvmError
from gridvm.paths import Home


def resolve_home(home: str | None, host: str | None) -> Home:
    """The home of `--host HOST|LAB/HOST` (or $GRIDVM_HOST), else of `--home`."""
    host = host or os.environ.get("GRIDVM_HOST") or None
    if not host:
        return Home.resolve(home)
    if home:
        raise GridvmError("give either --home or --host, not both")
    from gridvm.lab.lab import find_host

    _, found = find_host(host)
    return Home(Path(found.home))
