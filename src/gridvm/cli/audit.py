"""`gridvm audit [--tail N] [--json]`: the daemon's audit log of mutating calls."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer


def _who(who: dict[str, Any]) -> str:
    if "token" in who:
        return f"token {who['token']}" + (f" ({who['role']})" if "role" in who else " (invalid)")
    if who.get("via") == "unix":
        return f"{who.get('user', '?')} (uid {who.get('uid', '?')})"
    if who.get("via") == "tls":
        return f"{who.get('cn', '?')}@{who.get('address', '?')}"
    return str(who.get("address") or who.get("via") or "?")


def line(entry: dict[str, Any]) -> str:
    """One entry as a line: time, who, status, method path [error], duration."""
    error = f"  {entry['error']}" if entry.get("error") else ""
    return (f"{str(entry.get('time', ''))[:23]}  {_who(entry.get('who') or {}):<24} "
            f"{entry.get('status', 0):>3} {entry.get('method', '')} {entry.get('path', '')}"
            f"  {entry.get('duration_ms', 0)} ms{error}")


def audit(
    tail: Annotated[int, typer.Option("--tail", "-n", min=1, max=10_000,
                                      help="how many of the last entries")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="the entries as JSON lines")] = False,
) -> None:
    """Mutating calls to gridvmd: who, what, and how it ended (newest last)."""
    from gridvm.cli.main import client, out

    entries = client().get("/audit", params={"limit": tail})
    for entry in entries:
        if as_json:
            out.print(json.dumps(entry), highlight=False, markup=False, soft_wrap=True)
        else:
            out.print(line(entry), highlight=False, markup=False, soft_wrap=True)
