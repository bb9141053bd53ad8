"""`gridvm cluster …` (init, join, status) and `gridvm host …` (list, maintenance, evacuate)."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from gridvm.api.client import q

cluster_app = typer.Typer(no_args_is_help=True, help="Join hosts into an etcd-backed cluster.")
host_app = typer.Typer(no_args_is_help=True, help="The cluster's hosts.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
TtlOpt = Annotated[int, typer.Option("--ttl", help="host lease TTL in seconds")]
MarginOpt = Annotated[float, typer.Option(
    "--margin", help="seconds HA waits after a host's lease expired")]


def _print(text: str) -> None:
    from gridvm.cli.main import out  # main imports this module: resolve at call time

    out.print(text, highlight=False, markup=False, soft_wrap=True)


def join_request(etcd: str, name: str | None, ttl: int, margin: float,
                 capacity_mb: int | None, fence_command: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"etcd": etcd, "host": name or os.uname().nodename,
                            "ttl": ttl, "margin": margin}
    if capacity_mb:
        body["capacity_mb"] = capacity_mb
    if fence_command:
        body["fence_command"] = fence_command
    return body


@cluster_app.command("init")
def init(
    etcd: Annotated[str | None, typer.Option(
        "--etcd", help="use this etcd (default: start one on --listen)")] = None,
    listen: Annotated[str, typer.Option("--listen", help="address for a new etcd")] =
    "127.0.0.1",
    cluster_name: Annotated[str, typer.Option("--cluster-name")] = "gridvm",
    name: Annotated[str | None, typer.Option("--name", help="this host's name")] = None,
    ttl: TtlOpt = 5, margin: MarginOpt = 1.0,
) -> None:
    """Create a cluster (starting etcd unless --etcd is given) and join this host to it."""
    from gridvm.cli.main import State, client
    from gridvm.cluster import etcdproc
    from gridvm.cluster.core import Cluster
    from gridvm.cluster.etcd import Etcd

    if etcd is None:
        etcdproc.start(State.home.root / "etcd", listen)
        etcd = etcdproc.client_url(listen)
    Cluster(Etcd(etcd, timeout=3)).init(cluster_name)
    res = client().post("/cluster/join", join_request(etcd, name, ttl, margin, None, None))
    _print(f"cluster {res['cluster']['name']} at {etcd}; {res['host']} joined")


@cluster_app.command("join")
def join(
    etcd: Annotated[str, typer.Option("--etcd", help="etcd URL, e.g. http://10.0.0.3:2379")],
    name: Annotated[str | None, typer.Option("--name", help="this host's name")] = None,
    ttl: TtlOpt = 5, margin: MarginOpt = 1.0,
    capacity_mb: Annotated[int | None, typer.Option(
        "--capacity-mb", help="memory offered to guests")] = None,
    fence_command: Annotated[str | None, typer.Option(
        "--fence-command", help="run as CMD HOST to fence a dead host")] = None,
) -> None:
    """Join this host's gridvmd to the cluster whose state lives in etcd."""
    from gridvm.cli.main import client

    res = client().post("/cluster/join", join_request(etcd, name, ttl, margin, capacity_mb,
                                                      fence_command))
    _print(f"{res['host']} joined cluster {res['cluster']['name']} at {res['etcd']}")


@cluster_app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """This host's membership: etcd, lease, leader, fenced."""
    from gridvm.cli.main import client, emit_json

    st = client().get("/cluster")
    if as_json:
        emit_json(st)
    elif not st["joined"]:
        _print("not in a cluster")
    else:
        for key in ("host", "etcd", "ttl", "margin", "lease", "fenced", "leader"):
            _print(f"{key:<8}: {st[key]}")


@host_app.command("list")
def host_list(as_json: JsonOpt = False) -> None:
    """Hosts with state (up, down, fenced, maintenance), capacity, load and domains."""
    from gridvm.cli.main import client, emit_json

    rows = client().get("/cluster/hosts")
    if as_json:
        emit_json(rows)
        return
    _print(f"{'Host':<8}{'State':<13}{'CPUs':>5}{'Mem used/cap':>16}{'Load':>7}  Domains")
    for r in rows:
        name = r["name"] + ("*" if r["leader"] else "")
        mem = f"{r['used_mb']}/{r['memory_mb'] if r['memory_mb'] is not None else '-'}"
        _print(f"{name:<8}{r['state']:<13}{r['cpus'] or '-':>5}{mem:>16}"
               f"{r['load'] if r['load'] is not None else '-':>7}  {' '.join(r['domains'])}")
    _print("(* = HA manager)")


@host_app.command("maintenance")
def maintenance(host: str, mode: Annotated[str, typer.Argument(metavar="on|off")]) -> None:
    """Mark a host in maintenance (placement avoids it) or back in service."""
    from gridvm.cli.main import client
    from gridvm.errors import ConfigError

    if mode not in ("on", "off"):
        raise ConfigError(f"maintenance mode must be on or off, not {mode!r}")
    client().post(f"/cluster/hosts/{q(host)}/maintenance", {"on": mode == "on"})
    _print(f"{host}: maintenance {mode}")


@host_app.command("remove")
def remove(host: str, as_json: JsonOpt = False) -> None:
    """Forget a host that is gone for good (down or fenced): its entry and its domains'
    registry records, so their names are free again. Its HA domains must run elsewhere
    first. A removed host that comes back joins again, empty."""
    from gridvm.cli.main import client, emit_json

    res = client().delete(f"/cluster/hosts/{q(host)}")
    if as_json:
        emit_json(res)
        return
    gone = ", ".join(res["forgotten"]) or "none"
    _print(f"{host}: removed from the cluster (domains forgotten: {gone})")


@host_app.command("evacuate")
def evacuate(
    host: str,
    timeout: Annotated[float, typer.Option(
        "--timeout", help="give up on a domain's migration after this many seconds")] = 600,
    as_json: JsonOpt = False,
) -> None:
    """Live-migrate every running domain off HOST (placement picks each destination), then
    leave HOST in maintenance. Nothing moves unless every domain has somewhere to go."""
    import time
    from pathlib import Path

    from gridvm.api.client import Client, q
    from gridvm.cli.main import client, emit_json
    from gridvm.cli.migrate import _follow, summary
    from gridvm.errors import GridvmError
    from gridvm.paths import Home

    c = client(60)
    plan = c.get(f"/cluster/hosts/{q(host)}/evacuation")     # refuses before anything moves
    c.post(f"/cluster/hosts/{q(host)}/maintenance", {"on": True})  # no new domains meanwhile
    moves = plan["moves"]
    source = Client(Home(Path(str(plan["api"])).parent), timeout=60)
    moved: list[dict[str, Any]] = []
    try:
        for i, step in enumerate(moves, 1):
            if not as_json:
                _print(f"[{i}/{len(moves)}] {step['domain']}: {host} -> {step['to']} …")
            job = c.post(f"/domains/{q(step['uuid'])}/migrate", {
                "target": step["target"], "live": True, "timeout": timeout})
            job = _follow(source, job, show=not as_json)
            if job["phase"] != "completed":
                done = ", ".join(m["domain"] for m in moved) or "none"
                rest = ", ".join(m["domain"] for m in moves[i - 1:])
                raise GridvmError(
                    f"evacuation of {host} stopped: "
                    f"{job['error'] or job['domain'] + ' ' + job['phase']}; moved: {done}; "
                    f"still on {host}: {rest}; {host} stays in maintenance")
            moved.append({"domain": step["domain"], "uuid": step["uuid"], "from": host,
                          "to": step["to"], "total_ms": job["total_time_ms"],
                          "downtime_ms": job["downtime_ms"],
                          "dest_domid": job["dest_domid"]})
            if not as_json:
                _print(f"[{i}/{len(moves)}] {summary(job, step['to'])}")
    finally:
        source.close()
    gone = {m["uuid"] for m in moved}
    deadline = time.monotonic() + 15      # destinations claim the registry as they arrive
    while True:
        left = c.get(f"/cluster/hosts/{q(host)}/evacuation")
        if not gone & {m["uuid"] for m in left["moves"]} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    result = {"host": host, "maintenance": True, "moved": moved,
              "left": [*left["moves"], *left["left"]]}
    if as_json:
        emit_json(result)
        return
    for d in left["left"]:
        _print(f"{d['domain']} is {d['state']}: its definition stays on {host}")
    _print(f"{host}: {len(moved)} domain(s) moved; host is in maintenance "
           f"(gridvm host maintenance {host} off to bring it back)")
