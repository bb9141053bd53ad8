"""`gridvm snapshot create|list|revert|delete DOM NAME`."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console

from gridvm.api.client import Client, q

out = Console()
snapshot_app = typer.Typer(no_args_is_help=True, help="Snapshots of a domain's disks "
                           "(and with --memory, its running state).")
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _client() -> Client:
    from gridvm.cli.main import client

    return client(900)


def _emit(data: Any) -> None:
    from gridvm.cli.main import emit_json

    emit_json(data)


@snapshot_app.command("create")
def create(
    dom: str, name: str,
    memory: Annotated[bool, typer.Option("--memory", help="also the running state: revert "
                                         "resumes the guest where it was")] = False,
    convert: Annotated[bool, typer.Option("--convert", help="convert raw disks to qcow2 "
                                          "first (the raw files are kept)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Take a snapshot (disks frozen through the guest agent if the guest has one)."""
    snap = _client().post(f"/domains/{q(dom)}/snapshots",
                          {"name": name, "memory": memory, "convert": convert})
    if as_json:
        _emit(snap)
        return
    stall = f", guest stalled {snap['stall_ms']:.0f} ms" if snap["stall_ms"] is not None else ""
    out.print(f"snapshot {snap['name']} of {dom}: {'memory and ' if snap['memory'] else ''}"
              f"disks {', '.join(snap['disks'])} ({snap['consistency']}{stall})",
              highlight=False)


@snapshot_app.command("list")
def list_(dom: str, as_json: JsonOpt = False) -> None:
    """The domain's snapshots as a tree (* the current one)."""
    data = _client().get(f"/domains/{q(dom)}/snapshots")
    if as_json:
        _emit(data)
        return
    snaps = {s["name"]: s for s in data["snapshots"]}
    roots = [s for s in data["snapshots"] if s["parent"] not in snaps]

    def show(s: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"]))
        kind = "memory" if s["memory"] else f"disks, {s['consistency']}"
        mark = " *" if s["current"] else ""
        out.print(f"{prefix}{branch}{s['name']}{mark}  {when}  {kind}  {s['state']}",
                  highlight=False)
        kids = [snaps[c] for c in s["children"]]
        for i, kid in enumerate(kids):
            show(kid, prefix + ("" if top else ("   " if last else "│  ")),
                 i == len(kids) - 1, False)

    if not roots:
        out.print(f"{data['domain']} has no snapshots", highlight=False)
    for i, root in enumerate(roots):
        show(root, "", i == len(roots) - 1, True)


@snapshot_app.command("revert")
def revert(dom: str, name: str) -> None:
    """Go back to a snapshot (memory: the guest resumes there; disks: it restarts)."""
    res = _client().post(f"/domains/{q(dom)}/snapshots/{q(name)}/revert")
    out.print(f"{res['domain']} reverted to {res['snapshot']}: {res['how']}", highlight=False)


@snapshot_app.command("delete")
def delete(dom: str, name: str) -> None:
    """Delete a snapshot (its children move up to its parent)."""
    _client().delete(f"/domains/{q(dom)}/snapshots/{q(name)}")
