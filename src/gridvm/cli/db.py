"""`gridvm db …`: replicated MariaDB databases (gridvm.db) — thin over /v1/databases."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from gridvm.api.client import q
from gridvm.cli.network import _call, _emit, _print
from gridvm.db.model import CreateRequest, UserRequest
from gridvm.errors import ConfigError, GridvmError
from gridvm.lb.model import validation_message

db_app = typer.Typer(no_args_is_help=True, help="Replicated databases: MariaDB members on "
                     "several hosts behind a writer VIP (and a reader VIP).")
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


@db_app.command("create")
def create(
    name: str,
    vip: Annotated[str, typer.Option("--vip", help="the writer VIP, IP[:PORT] (3306)")],
    ip: Annotated[str, typer.Option("--ip", help="the first member's ADDR/PREFIX; the "
                                    "others take the next addresses")],
    members: Annotated[int, typer.Option("--members", help="2 to 5, one per host")] = 2,
    read_vip: Annotated[str | None, typer.Option("--read-vip", help="the reader VIP, "
                                                 "IP[:PORT], over the replicas")] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="the image built from the MariaDB "
                                        "recipe (on every member's host)")] = "mariadb",
    hosts: Annotated[str | None, typer.Option("--hosts", help="H1,H2,… one per member "
                                              "(default: placement)")] = None,
    gateway: Annotated[str | None, typer.Option(help="the members' default gateway")] = None,
    bridge: Annotated[str, typer.Option(help="network or bridge of the members")] = "xenbr0",
    memory: Annotated[int, typer.Option(help="MiB per member")] = 512,
    ack_timeout: Annotated[float | None, typer.Option(
        "--ack-timeout", help="let a commit go on without a replica's acknowledgement after "
        "this many seconds (asynchronous, may lose it); default: wait for ever")] = None,
    max_lag: Annotated[float, typer.Option("--max-lag", help="the reader VIP leaves out "
                                           "replicas lagging more (s)")] = 5.0,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="follow the creation")]
    = True,
    as_json: JsonOpt = False,
) -> None:
    """Create a replicated database: one MariaDB member per host, GTID + semi-sync."""
    try:
        req = CreateRequest.model_validate({
            "name": name, "image": recipe, "members": members, "ip": ip, "vip": vip,
            "read_vip": read_vip, "gateway": gateway, "bridge": bridge, "memory": memory,
            "ack_timeout": ack_timeout, "max_lag": max_lag,
            "hosts": [h.strip() for h in hosts.split(",")] if hosts else []})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None
    rec = _call("POST", "/databases", req.model_dump(mode="json"))
    if not as_json:
        _print(f"Creating database {name}: " + ", ".join(
            f"{m} on {v['host']} ({v['ip']})" for m, v in sorted(rec["members"].items())))
    if not wait:
        if as_json:
            _emit(rec)
        return
    view = _follow(name)
    if as_json:
        _emit(view)
        return
    _print(f"Database {name} is ready: primary {view['primary']}, writer VIP "
           f"{view['writer']['vip']}:{view['writer']['port']}"
           + (f", reader VIP {view['reader']['vip']}:{view['reader']['port']}"
              if view.get("reader") else ""))


def _follow(name: str, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view: dict[str, Any] = _call("GET", f"/databases/{q(name)}")
        if view["phase"] == "ready":
            return view
        if view["phase"] == "failed":
            raise GridvmError(f"database {name} was not created: {view['error']} "
                              "(everything made for it was removed)")
        if time.monotonic() > deadline:
            raise GridvmError(f"database {name} is still {view['phase']} after "
                              f"{timeout:.0f}s (gridvm db status {name})")
        time.sleep(2)


@db_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """The databases: phase, primary, VIPs, members."""
    views = _call("GET", "/databases")
    if as_json:
        _emit(views)
        return
    _print(f"{'Name':<14}{'Phase':<10}{'Primary':<12}{'Writer VIP':<22}Members")
    for v in views:
        w = f"{v['writer']['vip']}:{v['writer']['port']}"
        ms = ", ".join(f"{m}@{x['host']} {x['role']}" for m, x in sorted(v["members"].items()))
        _print(f"{v['name']:<14}{v['phase']:<10}{v.get('primary') or '-':<12}{w:<22}{ms}")


@db_app.command("status")
def status(name: str, as_json: JsonOpt = False) -> None:
    """Each member's role (and why), host, GTID position, lag and semi-sync state."""
    v = _call("GET", f"/databases/{q(name)}")
    if as_json:
        _emit(v)
        return
    if v["phase"] == "failed":
        _print(f"{name}: creation failed: {v['error']}")
        return
    w = v["writer"]
    _print(f"{name}: {v['phase']}, primary {v.get('primary') or 'none'}; writer VIP "
           f"{w['vip']}:{w['port']}" + (f", reader VIP {v['reader']['vip']}:"
                                        f"{v['reader']['port']}" if v.get("reader") else "")
           + f"; controlled by {v.get('controller') or 'nobody'}")
    _print(f"  writes: {v['writes']}")
    if v.get("waiting"):
        _print(f"  waiting: {v['waiting']}")
    _print(f"  {'Member':<10}{'Host':<10}{'Role':<11}{'Answers':<9}{'GTID':<16}"
           f"{'Lag':>5}  Replication / semi-sync")
    for m in v["members"]:
        if m.get("semisync"):
            s = m["semisync"]
            repl = (f"semi-sync {'on' if s['on'] else 'OFF'}, {s['replicas']} replica(s) "
                    f"connected, {s['waiting']} commit(s) waiting")
        elif m.get("replicates_from"):
            repl = f"from {m['replicates_from']} (IO {m['io']}, SQL " \
                   f"{'Yes' if m['sql'] else 'No'})"
        else:
            repl = m.get("error") or "-"
        lag = "-" if m.get("lag_s") is None else f"{m['lag_s']:g}"
        _print(f"  {m['name']:<10}{m['host'] + ('' if m['host_state'] == 'up' else '!'):<10}"
               f"{m['role']:<11}{'yes' if m['answers'] else 'no':<9}{m['gtid'] or '-':<16}"
               f"{lag:>5}  {repl}")
        _print(f"      {m['role']} since {time.strftime('%H:%M:%S', time.localtime(m['since']))}"
               f": {m['why']}")
        if m.get("rejoined"):
            _print(f"      last rejoin: {m['rejoined']['how']}: {m['rejoined']['why']}")
    for e in v.get("events", [])[-8:]:
        change = f"{e['from']} → {e['to']}: " if e.get("to") else ""
        _print(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['member']}: "
               f"{change}{e['why']}")


@db_app.command("switchover")
def switchover(
    name: str,
    to: Annotated[str | None, typer.Option("--to", help="the member to promote (default: "
                                           "the most caught-up replica)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Move the primary role to a replica without losing a write."""
    res = _call("POST", f"/databases/{q(name)}/switchover", {"to": to})
    if as_json:
        _emit(res)
        return
    _print(f"{name}: primary {res['from']} → {res['to']} at {res['position'] or 'empty'}; "
           f"writes blocked {res['blocked_s']:.3f}s")


@db_app.command("user")
def user(
    name: str,
    account: Annotated[str, typer.Argument(metavar="USER")],
    password: Annotated[str, typer.Option("--password", prompt=True, hide_input=True,
                                          help="at least 8 characters")],
    database: Annotated[str | None, typer.Option(
        "--database", help="grant on this schema only (made if missing); default: all")]
    = None,
) -> None:
    """Make an application account (on the primary; replicated to every member)."""
    try:
        req = UserRequest.model_validate({"user": account, "password": password,
                                          "database": database})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None
    res = _call("POST", f"/databases/{q(name)}/users", req.model_dump())
    _print(f"{name}: user {account}@'%' with all privileges on {res['grants']}")


@db_app.command("delete")
def delete(name: str) -> None:
    """Delete a database: its VIPs, members (with their disks) and record."""
    res = _call("DELETE", f"/databases/{q(name)}")
    _print(f"Deleted database {name}")
    for line in res.get("left", []):
        _print(f"  left behind: {line}")
