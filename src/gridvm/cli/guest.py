"""Verbs that reach into a guest through its agent: guest-exec, guest-fsfreeze."""

from __future__ import annotations

import base64
import sys
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("guest-exec", context_settings={"allow_interspersed_args": False})(guest_exec)
    app.command("guest-fsfreeze")(guest_fsfreeze)


def guest_exec(
    dom: str,
    command: Annotated[list[str], typer.Argument(help="the command and its arguments (after --)")],
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for it")] = 60,
    stdin: Annotated[bool, typer.Option("--stdin", help="pass this command's stdin")] = False,
) -> None:
    """Run a command in a domain through its guest agent; prints its output, exits with its code."""
    from gridvm.api.client import q
    from gridvm.cli.main import client

    if command and command[0] == "--":   # `DOM -- CMD`: options end at DOM already
        command = command[1:]
    if not command:
        raise typer.BadParameter("give the command to run after the domain")
    body: dict[str, object] = {"argv": command, "timeout": timeout}
    if stdin:
        body["input"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    res = client(timeout + 15).post(f"/domains/{q(dom)}/guest-exec", body)
    sys.stdout.buffer.write(base64.b64decode(res["stdout"]))
    sys.stdout.flush()
    sys.stderr.buffer.write(base64.b64decode(res["stderr"]))
    sys.stderr.flush()
    raise typer.Exit(int(res["returncode"]))


def guest_fsfreeze(
    dom: str,
    action: Annotated[str, typer.Argument(help="freeze, thaw or status")] = "status",
) -> None:
    """Freeze or thaw a domain's filesystems through its agent (for consistent snapshots)."""
    from gridvm.api.client import q
    from gridvm.cli.main import client, out

    res = client(120).post(f"/domains/{q(dom)}/guest-fsfreeze", {"action": action})
    detail = ""
    if "frozen" in res:
        detail = f" ({res['frozen']} filesystems)"
    elif "thawed" in res:
        detail = f" ({res['thawed']} filesystems)"
    out.print(f"{res['status']}{detail}", highlight=False)
