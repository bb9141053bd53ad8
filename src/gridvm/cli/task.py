"""`gridvm task list|show`: the task log of gridvmd (actions from the web console and the CLI)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

task_app = typer.Typer(no_args_is_help=True, help="Tasks: actions with a log and a status.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
POLL_S = 0.2


def _print(text: str) -> None:
    from gridvm.cli.main import out

    out.print(text, highlight=False, markup=False, soft_wrap=True)


def _when(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def _duration(t: dict[str, Any]) -> str:
    end = t["finished"] or time.time()
    return f"{end - t['started']:.1f}s"


@task_app.command("list")
def list_(
    limit: Annotated[int, typer.Option("-n", "--limit", help="how many (newest first)")] = 20,
    target: Annotated[str | None, typer.Option("--target", help="only this target")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recent tasks: id, action, target, state, who started it."""
    from gridvm.cli.main import client, emit_json

    params: dict[str, Any] = {"limit": limit}
    if target:
        params["target"] = target
    rows = client().get("/tasks", params=params)
    if as_json:
        emit_json(rows)
        return
    _print(f"{'ID':<19}{'Started':<10}{'Took':>8}  {'Action':<18}{'Target':<14}{'State':<8}User")
    for t in rows:
        state = t["state"] + (f" {t['progress']['percent']:.0f}%"
                              if t["state"] == "running" and t["progress"] else "")
        _print(f"{t['id']:<19}{_when(t['started']):<10}{_duration(t):>8}  {t['action']:<18}"
               f"{t['target']:<14}{state:<8}{t['user']}")


def follow(task: dict[str, Any], *, show: bool = True) -> dict[str, Any]:
    """Print a task's log as it grows until it ends; its final view."""
    from gridvm.cli.main import client

    c = client()
    seen = 0
    while True:
        view = c.get(f"/tasks/{task['id']}", params={"after": seen})
        for line in view["log"]:
            seen = line["seq"]
            if show:
                _print(line["line"])
        if view["state"] != "running":
            return dict(view)
        time.sleep(POLL_S)


@task_app.command("show")
def show(
    task_id: Annotated[str, typer.Argument(metavar="ID")],
    follow_: Annotated[bool, typer.Option("-f", "--follow", help="until it ends")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A task: its status and log (with -f, follow it to the end)."""
    from gridvm.cli.main import client, emit_json

    view = client().get(f"/tasks/{task_id}")
    if as_json and not follow_:
        emit_json(view)
        return
    if follow_:
        view = {**follow(view, show=not as_json)}
        if as_json:
            emit_json(client().get(f"/tasks/{task_id}"))
            return
    else:
        _print(f"task {view['id']}: {view['action']} {view['target']} by {view['user']}")
        for line in view["log"]:
            _print(f"{_when(line['time'])} {line['line']}")
    ended = f"{view['state']}" + (f": {view['error']}" if view["error"] else "")
    _print(f"status: {ended} ({_duration(view)})")
