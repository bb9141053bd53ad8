"""`gridvm backup`: back a domain up (`backup DOM --to STORE [--full]`), and a store's
`backup list|verify|prune|restore`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gridvm.api.actions import size_text
from gridvm.api.client import Client, q
from gridvm.errors import ConfigError

out = Console()
VERBS = ("list", "verify", "prune", "restore")
USAGE = ("gridvm backup DOM --to STORE [--full] | backup list STORE [DOM] | backup verify "
         "STORE [ID|DOM] | backup prune STORE --keep-last N [DOM] | backup restore STORE ID "
         "NAME [--dir DIR] [--start]")


def _client() -> Client:
    from gridvm.cli.main import client

    return client(3600)


def _emit(data: Any) -> None:
    from gridvm.cli.main import emit_json

    emit_json(data)


def _store(text: str) -> str:
    return str(Path(text).absolute())


def backup(
    words: Annotated[list[str], typer.Argument(help="DOM, or list|verify|prune|restore and "
                                               "their arguments", show_default=False)],
    to: Annotated[str | None, typer.Option("--to", help="the backup store (a directory; "
                                           "made if missing)")] = None,
    full: Annotated[bool, typer.Option("--full", help="read every disk whole, even if an "
                                       "incremental is possible")] = False,
    keep_last: Annotated[int | None, typer.Option("--keep-last", help="prune: keep the newest "
                                                  "N backups of each domain")] = None,
    dir_: Annotated[str | None, typer.Option("--dir", help="restore: where the disks go "
                                             "(default the home's disks/)")] = None,
    start: Annotated[bool, typer.Option("--start", help="restore: start the domain")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Back up a domain into a deduplicating store (incremental when its dirty bitmaps
    allow), or list, verify, prune and restore a store's backups."""
    verb, args = (words[0], words[1:]) if words and words[0] in VERBS else ("", words)
    c = _client()
    if not verb:
        if len(args) != 1 or not to:
            raise ConfigError(f"usage: {USAGE}")
        res = c.post(f"/domains/{q(args[0])}/backup", {"store": _store(to), "full": full})
        _emit(res) if as_json else _print_backup(res)
    elif verb == "list":
        if not 1 <= len(args) <= 2:
            raise ConfigError("usage: gridvm backup list STORE [DOM]")
        params = {"store": _store(args[0]), **({"domain": args[1]} if len(args) == 2 else {})}
        res = c.get("/backups", params=params)
        _emit(res) if as_json else _print_list(res)
    elif verb == "verify":
        if not 1 <= len(args) <= 2:
            raise ConfigError("usage: gridvm backup verify STORE [ID|DOM]")
        rows = c.post("/backups/verify", {"store": _store(args[0]),
                                          "which": args[1] if len(args) == 2 else None})
        if as_json:
            _emit(rows)
        for r in rows if not as_json else []:
            what = "ok" if r["ok"] else "FAILED " + ", ".join(
                f"{n} {k}" for k, n in r["problems"].items())
            out.print(f"{r['domain']} {r['id']}: {r['chunks']} chunks {what}", highlight=False)
        if any(not r["ok"] for r in rows):
            raise typer.Exit(1)
    elif verb == "prune":
        if not 1 <= len(args) <= 2 or keep_last is None:
            raise ConfigError("usage: gridvm backup prune STORE --keep-last N [DOM]")
        res = c.post("/backups/prune", {"store": _store(args[0]), "keep_last": keep_last,
                                        "domain": args[1] if len(args) == 2 else None})
        _emit(res) if as_json else out.print(
            f"removed {len(res['removed'])} backups, {res['chunks_removed']} chunks "
            f"({size_text(res['bytes_freed'])} freed)", highlight=False)
    else:
        if len(args) != 3:
            raise ConfigError("usage: gridvm backup restore STORE ID NAME [--dir DIR] [--start]")
        res = c.post("/backups/restore", {"store": _store(args[0]), "id": args[1],
                                          "name": args[2], "start": start,
                                          "dir": str(Path(dir_).absolute()) if dir_ else None})
        _emit(res) if as_json else out.print(
            f"restored {res['name']} from {res['from']} backup {res['backup']}: "
            f"{size_text(res['written'])} written in {res['seconds']:.1f} s"
            + (f", started (id={res['domid']})" if res["started"] else ""), highlight=False)


def _print_backup(res: dict[str, Any]) -> None:
    out.print(f"backup {res['id']} of {res['domain']} to {res['store']}: {res['mode']} "
              f"({res['consistency']}), read {size_text(res['read'])}, stored "
              f"{size_text(res['stored'])} new in {res['duration_s']:.1f} s", highlight=False)
    for d in res["disks"]:
        out.print(f"  {d['vdev']}: {d['mode']}: {d['reason']}; read {size_text(d['read'])}, "
                  f"{d['new_chunks']} new chunks", highlight=False)


def _print_list(res: dict[str, Any]) -> None:
    table = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("Domain", "ID", "Created", "Mode", "Size", "Read", "New", "Verified"):
        table.add_column(col)
    for b in res["backups"]:
        verified = b.get("verified")
        table.add_row(b["domain"], b["id"],
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["created"])),
                      b["mode"], size_text(b["size"]), size_text(b["read"]),
                      size_text(b["stored"]),
                      "-" if not verified else ("ok" if verified["ok"] else "FAILED"))
    out.print(table, highlight=False)
    if res["dedup_ratio"]:
        out.print(f"chunks take {size_text(res['chunk_bytes'])} for "
                  f"{size_text(res['logical_bytes'])} of disks (deduplication "
                  f"{res['dedup_ratio']}x)", highlight=False)
