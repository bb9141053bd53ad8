"""`gridvm lab …`: several hosts on this machine, as network namespaces on one LAN."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import typer

from gridvm.lab import lab

lab_app = typer.Typer(no_args_is_help=True,
                      help="Several gridvm hosts on this machine (network namespaces).")

NameOpt = Annotated[str | None, typer.Option("--name", help="lab name (default: the only one)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _print(text: str) -> None:
    from gridvm.cli.main import out  # main imports this module: resolve at call time

    out.print(text, highlight=False, markup=False, soft_wrap=True)


def _print_status(st: dict[str, Any]) -> None:
    _print(f"lab {st['name']}: LAN {st['subnet']} (namespace {st['lan_namespace']}), "
           f"client {st['client']['address']} in {st['client']['namespace']}")
    _print(f"{'Host':<6}{'Namespace':<16}{'LAN address':<18}{'Network':<10}{'Daemon':<9}Home")
    for h in st["hosts"]:
        _print(f"{h['name']:<6}{h['namespace']:<16}{h['address']:<18}{h['network']:<10}"
               f"{h['daemon']:<9}{h['home']}")


@lab_app.command("up")
def up(
    hosts: Annotated[int, typer.Option("--hosts", help="number of hosts")] = 2,
    name: Annotated[str, typer.Option("--name", help="lab name")] = "lab",
    subnet: Annotated[str, typer.Option("--subnet", help="the LAN's subnet")] =
    lab.DEFAULT_SUBNET,
    accel: Annotated[str, typer.Option("--accel", help="auto, kvm or tcg")] = "auto",
    cluster: Annotated[bool, typer.Option("--cluster", help="run etcd, join every host")] =
    False,
    ttl: Annotated[int, typer.Option("--ttl", help="hosts' lease TTL (with --cluster)")] = 5,
    margin: Annotated[float, typer.Option(
        "--margin", help="seconds HA waits after a lease expired (with --cluster)")] = 1.0,
    web: Annotated[bool, typer.Option(
        "--web", help="every host serves the web console on its LAN address, port 8006")] =
    False,
    as_json: JsonOpt = False,
) -> None:
    """Start a lab: hosts h1…hN, each with a gridvmd and bridge network xenbr0 on the LAN."""
    from gridvm.cli.main import State, emit_json

    t0 = time.monotonic()
    state = lab.plan(name, hosts, root=State.home.root / "labs" / name,
                     images=State.home.images, accel=accel, subnet=subnet,
                     cluster=cluster, ttl=ttl, margin=margin, web=web)
    lab.up(state)
    if as_json:
        emit_json(lab.status(state))
        return
    _print_status(lab.status(state))
    _print(f"up in {time.monotonic() - t0:.1f}s; try: gridvm --host h1 list")
    if web:
        _print(f"web console: https://{state.hosts[0].address.split('/')[0]}:8006/ui/ from "
               f"the client namespace (gridvm --host h1 web token create --role admin)")


@lab_app.command("down")
def down(name: NameOpt = None) -> None:
    """Remove a lab: guests, daemons, namespaces, homes."""
    state = lab.pick(name)
    lab.down(state.name)
    _print(f"lab {state.name} is down")


@lab_app.command("status")
def status(name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """The LAN's subnet and each host's namespace, LAN address, network and home."""
    from gridvm.cli.main import emit_json

    labs = [lab.load(name)] if name else lab.all_labs()
    views = [lab.status(s) for s in labs]
    if as_json:
        emit_json(views[0] if name else views)
        return
    if not views:
        _print("no lab is up (gridvm lab up --hosts 2)")
    for v in views:
        _print_status(v)


@lab_app.command("exec", context_settings={"ignore_unknown_options": True})
def exec_(
    target: Annotated[str, typer.Argument(metavar="HOST|client")],
    cmd: Annotated[list[str] | None, typer.Argument(help="command (after --)")] = None,
    name: NameOpt = None,
) -> None:
    """Run a command in a host's namespace (with its GRIDVM_HOME) or in the client's."""
    argv, env = lab.exec_argv(lab.pick(name), target, cmd or [])
    os.execvpe(argv[0], argv, env)


@lab_app.command("restart")
def restart(
    host: str,
    name: NameOpt = None,
    kill: Annotated[bool, typer.Option("--kill", help="SIGKILL it (a crash)")] = False,
) -> None:
    """Restart a host's gridvmd (guests keep running; networks are reconciled)."""
    h = lab.restart_daemon(lab.pick(name), host, kill=kill)
    _print(f"{host}: gridvmd restarted (pid {h.pid})")


def _fault(verb: str, doc: str) -> None:
    def command(host: str, name: NameOpt = None) -> None:
        from gridvm.lab import cluster

        getattr(cluster, verb)(lab.pick(name), host)
        _print(f"{host}: {verb}")

    command.__doc__ = doc
    lab_app.command(verb)(command)


_fault("poweroff", "Pull a host's plug: cut its link, kill its gridvmd and every QEMU.")
_fault("poweron", "Reconnect a powered-off host and start its gridvmd.")
_fault("partition", "Cut a host off the LAN and etcd; everything on it keeps running.")
_fault("heal", "Reconnect a partitioned host.")
