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


def _settings(name: str | None, ttl: int, margin: float, capacity_mb: int | None,
              fence_command: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"host": name, "ttl": ttl, "margin": margin}
    if capacity_mb:
        body["capacity_mb"] = capacity_mb
    if fence_command:
        body["fence_command"] = fence_command
    return body


NameOpt = Annotated[str | None, typer.Option("--name", help="this host's name (default: "
                                             "its node name)")]
CapOpt = Annotated[int | None, typer.Option("--capacity-mb", help="memory offered to guests")]
FenceOpt = Annotated[str | None, typer.Option(
    "--fence-command", help="run as CMD HOST to fence a dead host")]


def _join_command(res: dict[str, Any]) -> str:
    return (f"gridvm cluster join {res['server']} --token {res['token']} "
            f"--ca-hash {res['ca_hash']}")


@cluster_app.command("init")
def init(
    cluster_name: Annotated[str, typer.Option("--cluster-name")] = "gridvm",
    etcd: Annotated[str | None, typer.Option(
        "--etcd", help="use this etcd (URLs; default: run one on this host, with TLS)")] =
    None,
    name: NameOpt = None, ttl: TtlOpt = 5, margin: MarginOpt = 1.0,
    capacity_mb: CapOpt = None, fence_command: FenceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a cluster on this host: its CA, its etcd (TLS, client certificates) unless
    --etcd is given, this host as its first member; prints the command that joins the next
    host (this host's gridvmd must run with --listen ADDR)."""
    from gridvm.cli.main import client, emit_json

    body = {"cluster": cluster_name, "etcd": etcd,
            **_settings(name, ttl, margin, capacity_mb, fence_command)}
    res = client(120).post("/cluster/init", body)
    if as_json:
        emit_json(res)
        return
    _print(f"cluster {res['cluster']['name']} created; {res['host']} is its first host "
           f"(etcd {res['etcd']})")
    _print("join another host (one-time token, valid 24 h) with:")
    _print(f"  {_join_command(res)}")


@cluster_app.command("join")
def join(
    server: Annotated[str | None, typer.Argument(
        help="a member's gridvmd address, ADDR[:PORT] (as printed by cluster init/token)")]
    = None,
    token: Annotated[str | None, typer.Option("--token", help="a one-time join token")] = None,
    ca_hash: Annotated[str | None, typer.Option(
        "--ca-hash", help="sha256:… of the cluster CA's public key")] = None,
    etcd: Annotated[str | None, typer.Option(
        "--etcd", help="etcd URLs, for a host that holds a certificate of the cluster "
        "already")] = None,
    etcd_member: Annotated[bool, typer.Option(
        "--etcd-member", help="also run an etcd member on this host")] = False,
    name: NameOpt = None, ttl: TtlOpt = 5, margin: MarginOpt = 1.0,
    capacity_mb: CapOpt = None, fence_command: FenceOpt = None,
) -> None:
    """Join this host's gridvmd to a cluster: with a token from a member (`cluster init` or
    `cluster token` printed the command), like `kubeadm join`."""
    from gridvm.cli.main import client

    body = {"server": server, "token": token, "ca_hash": ca_hash, "etcd": etcd,
            "etcd_member": etcd_member,
            **_settings(name, ttl, margin, capacity_mb, fence_command)}
    res = client(120).post("/cluster/join", body)
    _print(f"{res['host']} joined cluster {res['cluster']['name']} (etcd {res['etcd']})")


@cluster_app.command("token")
def token(
    ttl: Annotated[float, typer.Option("--ttl", help="seconds the token is valid")] = 86400,
    witness: Annotated[bool, typer.Option("--witness", help="a token for a witness")] =
    False,
    as_json: JsonOpt = False,
) -> None:
    """A new one-time join token, and the command that uses it."""
    from gridvm.cli.main import client, emit_json

    res = client().post("/cluster/token", {"ttl": ttl,
                                           "role": "witness" if witness else "host"})
    if as_json:
        emit_json(res)
    elif witness:
        _print(f"gridvm cluster witness {res['server']} --token {res['token']} "
               f"--ca-hash {res['ca_hash']} --listen ADDR")
    else:
        _print(_join_command(res))


@cluster_app.command("witness")
def witness(
    server: Annotated[str, typer.Argument(help="a member's gridvmd address, ADDR[:PORT]")],
    token: Annotated[str, typer.Option("--token", help="from gridvm cluster token --witness")],
    ca_hash: Annotated[str, typer.Option("--ca-hash", help="sha256:… of the cluster CA")],
    listen: Annotated[str, typer.Option("--listen", help="this box's address for etcd")],
    directory: Annotated[str, typer.Option("--dir", help="where the witness keeps its files")]
    = "/var/lib/gridvm-witness",
    name: NameOpt = None,
) -> None:
    """Make this box the cluster's witness: an etcd member without guests (two hosts and a
    witness keep quorum through the loss of any one of them). Needs no gridvmd."""
    from pathlib import Path

    from gridvm.cluster.witness import enlist
    from gridvm.netaddr import parse_hostport

    address, _ = parse_hostport(listen, 2379)
    res = enlist(Path(directory).absolute(), server, token, ca_hash, address,
                 name or f"witness-{os.uname().nodename.split('.')[0]}")
    _print(f"witness {res['name']} of cluster {res['cluster']}: etcd member at {res['etcd']} "
           f"(files in {directory})")


@cluster_app.command("revoke")
def revoke(name: str) -> None:
    """Revoke a member's certificate (an administrator's client certificate, a witness);
    hosts are removed with `gridvm host remove`, which revokes theirs."""
    from gridvm.cli.main import client

    res = client().post("/cluster/revoke", {"name": name})
    _print(f"{res['member']}: certificate {res['revoked_serial']} revoked")


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
    follow_id: Annotated[str | None, typer.Option(
        "--follow", help="follow a running evacuation task (its id) instead")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Live-migrate every running domain off HOST (placement picks each destination), then
    leave HOST in maintenance. Nothing moves unless every domain has somewhere to go. The
    evacuation is a job in gridvmd, run as a task: Ctrl-C stops following it, not the job
    (gridvm task show ID -f follows it again; --follow ID too)."""
    from gridvm.cli.main import client, emit_json, out
    from gridvm.cli.task import follow
    from gridvm.errors import GridvmError

    task = {"id": follow_id} if follow_id else client(60).post(
        "/tasks", {"action": "host.evacuate", "target": host, "params": {"timeout": timeout}})
    try:
        done = follow(task, show=not as_json)
    except KeyboardInterrupt:
        out.print(f"stopped following; the evacuation goes on in gridvmd "
                  f"(gridvm task show {task['id']} -f)", highlight=False)
        raise SystemExit(130) from None
    if done["state"] != "ok":
        raise GridvmError(done["error"] or f"task {done['id']} {done['state']}")
    if as_json:
        emit_json(done["result"])
