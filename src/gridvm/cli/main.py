"""The `gridvm` command: xm/xl verbs against the local gridvmd."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gridvm.api.client import Client, q
from gridvm.cli.audit import audit
from gridvm.cli.backup import backup
from gridvm.cli.clone import register as register_clone_verbs
from gridvm.cli.cluster import cluster_app, host_app
from gridvm.cli.db import db_app
from gridvm.cli.devices import register as register_device_verbs
from gridvm.cli.guest import register as register_guest_verbs
from gridvm.cli.image import image_app
from gridvm.cli.lab import lab_app
from gridvm.cli.migrate import migrate
from gridvm.cli.network import network_app
from gridvm.cli.resources import register as register_resource_verbs
from gridvm.cli.service import service_app
from gridvm.cli.snapshot import snapshot_app
from gridvm.cli.target import connect, lab_host
from gridvm.cli.task import task_app
from gridvm.cli.top import top
from gridvm.cli.web import web_app
from gridvm.config.xmfile import load_config
from gridvm.errors import ConfigError, GridvmError
from gridvm.paths import Home

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Xen-style toolstack on QEMU (xm/xl verbs).")
app.add_typer(image_app, name="image")
register_resource_verbs(app)
app.command()(audit)
register_guest_verbs(app)
register_device_verbs(app)
register_clone_verbs(app, image_app)
app.command("top")(top)
app.command("migrate")(migrate)
app.command("backup")(backup)
app.add_typer(network_app, name="network")
app.add_typer(lab_app, name="lab")
app.add_typer(cluster_app, name="cluster")
app.add_typer(host_app, name="host")
app.add_typer(service_app, name="service")
app.add_typer(db_app, name="db")
app.add_typer(task_app, name="task")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(web_app, name="web")

out = Console()
err = Console(stderr=True)

HomeOpt = Annotated[str | None, typer.Option("--home", help="gridvm home (or $GRIDVM_HOME)")]
HostOpt = Annotated[str | None, typer.Option(
    "--host", help="a lab host's daemon: HOST or LAB/HOST (or $GRIDVM_HOST)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


class State:
    home: Home = Home.resolve()
    host: str | None = None       # a lab host, reached over HTTPS


@app.callback()
def _root(home: HomeOpt = None, host: HostOpt = None) -> None:
    State.host = lab_host(home, host)
    State.home = Home.resolve(home)


def client(timeout: float = 120) -> Client:
    return connect(State.home, State.host, timeout)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def parse_vars(items: list[str]) -> dict[str, str]:
    variables: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"bad variable {item!r}: use NAME=VALUE")
        variables[key] = value
    return variables


def read_config(file: Path, items: list[str]) -> dict[str, Any]:
    result = load_config(file, parse_vars(items))
    for warning in result.warnings:
        err.print(f"gridvm: warning: {warning}", highlight=False)
    config: dict[str, Any] = result.config.model_dump(mode="json")
    return config


# ----- domain lifecycle ----------------------------------------------------------------------


@app.command()
def create(
    file: Path,
    variables: Annotated[list[str] | None, typer.Argument(help="NAME=VALUE for xm_vars")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="print the domain")] = False,
    console_: Annotated[bool, typer.Option("-c", help="attach the console")] = False,
    paused: Annotated[bool, typer.Option("-p", "--paused", help="leave it paused")] = False,
    as_json: JsonOpt = False,
    on_host: Annotated[str | None, typer.Option(
        "--host", help="in a cluster: run it on this host (skips placement)")] = None,
) -> None:
    """Create and start a domain from an xm/xl config file."""
    cfg = read_config(file, variables or [])
    if dry_run:
        from gridvm.config.macs import assign_macs
        from gridvm.config.model import DomainConfig

        domain = assign_macs(DomainConfig.model_validate(cfg), ())
        normalized = domain.model_dump(mode="json")
        if domain.type != "hvm":  # the command line the guest kernel will really get
            normalized["cmdline"] = domain.kernel_cmdline()
        emit_json(normalized)
        return
    view = client().post("/domains", {"config": cfg, "paused": paused},
                         params={"host": on_host} if on_host else None)
    if as_json:
        emit_json(view)
    else:
        on = f" on {view['host']}" if "host" in view else ""
        out.print(f"Started domain {view['name']} (id={view['domid']}){on}", highlight=False)
    if console_:
        attach_console(view["name"])


@app.command()
def new(file: Path, variables: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    """Define a managed domain without starting it."""
    cfg = read_config(file, variables or [])
    view = client().post("/domains", {"config": cfg, "managed": True, "start": False})
    out.print(f"Defined domain {view['name']}", highlight=False)


@app.command()
def start(
    dom: str,
    paused: Annotated[bool, typer.Option("-p", "--paused")] = False,
    console_: Annotated[bool, typer.Option("-c")] = False,
) -> None:
    """Start a defined (managed) domain."""
    view = client().post(f"/domains/{q(dom)}/start", {"paused": paused})
    out.print(f"Started domain {view['name']} (id={view['domid']})", highlight=False)
    if console_:
        attach_console(dom)


@app.command()
def delete(dom: str, purge: Annotated[bool, typer.Option(
        "--purge", help="also remove the disks and config gridvm made for it (clones)")]
        = False) -> None:
    """Remove a defined domain that is not running."""
    c = client()
    view = c.get(f"/domains/{q(dom)}") if purge else None
    c.delete(f"/domains/{q(dom)}")
    if view is not None:
        home = State.home
        owned = [Path(d["target"]) for d in view["config"]["disks"]]
        if view["config"].get("source_file"):
            owned.append(Path(view["config"]["source_file"]))
        for path in owned:
            if path.parent in (home.disks, home.domain_configs):
                path.unlink(missing_ok=True)


Wait = Annotated[bool, typer.Option("-w", "--wait", help="wait until it is done")]
Timeout = Annotated[float, typer.Option("--timeout", help="seconds to wait with -w")]


@app.command()
def shutdown(dom: str, wait: Wait = False, timeout: Timeout = 120,
             agent: Annotated[str, typer.Option(
                 "--agent", help="fallback: ask the guest agent if ACPI is ignored (30 s); "
                 "only: ask the agent at once; never")] = "fallback") -> None:
    """Ask a domain to power off (ACPI power button; the guest agent if ACPI is ignored)."""
    if agent not in ("fallback", "only", "never"):
        raise ConfigError(f"--agent {agent!r}: expected fallback, only or never")
    client(timeout + 10).post(f"/domains/{q(dom)}/shutdown",
                              {"wait": wait, "timeout": timeout, "agent": agent})


@app.command()
def reboot(dom: str, wait: Wait = False, timeout: Timeout = 120) -> None:
    """Ask a domain to reboot."""
    client(timeout + 10).post(f"/domains/{q(dom)}/reboot", {"wait": wait, "timeout": timeout})


@app.command()
def destroy(dom: str) -> None:
    """Stop a domain at once (pull the plug)."""
    client().post(f"/domains/{q(dom)}/destroy")


@app.command()
def pause(dom: str) -> None:
    """Pause a domain."""
    client().post(f"/domains/{q(dom)}/pause")


@app.command()
def unpause(dom: str) -> None:
    """Resume a paused domain."""
    client().post(f"/domains/{q(dom)}/unpause")


@app.command()
def rename(dom: str, new_name: str) -> None:
    """Rename a domain."""
    client().post(f"/domains/{q(dom)}/rename", {"name": new_name})


@app.command()
def save(dom: str, file: Path) -> None:
    """Save a domain's memory and config to FILE and stop it."""
    client(900).post(f"/domains/{q(dom)}/save", {"file": str(file.absolute())})


@app.command()
def restore(file: Path, paused: Annotated[bool, typer.Option("-p", "--paused")] = False,
            host: Annotated[str | None, typer.Option(
                "--host", help="restore on this lab host (HOST or LAB/HOST)")] = None) -> None:
    """Restore a domain from a save file (on this host, or on --host)."""
    c = connect(State.home, host, 900) if host else client(900)
    view = c.post("/restore", {"file": str(file.absolute()), "paused": paused})
    out.print(f"Restored domain {view['name']} (id={view['domid']})", highlight=False)


@app.command()
def console(dom: str) -> None:
    """Attach to a domain's serial console (Ctrl-] detaches)."""
    attach_console(dom)


def attach_console(dom: str) -> None:
    from gridvm.cli.console import attach

    c = client()
    info = c.get(f"/domains/{q(dom)}/console")
    attach(c, info.get("stream") or f"/v1/domains/{q(dom)}/console/stream")


# ----- information ---------------------------------------------------------------------------

FLAGS = {"running": "r-----", "blocked": "-b----", "paused": "--p---", "shutdown": "---s--",
         "crashed": "----c-", "dying": "-----d", "shutoff": "------"}


@app.command("list")
def list_(
    doms: Annotated[list[str] | None, typer.Argument()] = None,
    long: Annotated[bool, typer.Option("-l", "--long")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List domains (xm's columns: Name ID Mem VCPUs State Time(s))."""
    c = client()
    views = [c.get(f"/domains/{q(d)}") for d in doms] if doms else c.get("/domains")
    if as_json or long:
        emit_json(views)
        return
    table = Table(box=None, pad_edge=False, show_edge=False)
    clustered = any("host" in v for v in views)  # a cluster lists every host's domains
    for col, just in (("Name", "left"), ("ID", "right"), ("Mem", "right"),
                      ("VCPUs", "right"), ("State", "left"), ("Time(s)", "right"),
                      *((("Host", "left"),) if clustered else ())):
        table.add_column(col, justify=just)
    if not doms and not clustered:
        info = c.get("/info")
        table.add_row("Domain-0", "0", str(info["total_memory"]), str(info["nr_cpus"]),
                      "r-----", "-")
    for v in views:
        table.add_row(v["name"], "-" if v["domid"] is None else str(v["domid"]),
                      str(v["memory"]), str(v["vcpus"]), FLAGS.get(v["state"], v["state"]),
                      f"{v['cpu_time']:.1f}",
                      *((f"{v.get('host', '-')}"
                         + (f" ({v['host_state']})" if v.get("host_state") else ""),)
                        if clustered else ()))
    out.print(table, highlight=False)


@app.command()
def info(as_json: JsonOpt = False) -> None:
    """Host information, including the accelerator in use and why."""
    data = client().get("/info")
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        out.print(f"{key:<16}: {value}", highlight=False)


@app.command()
def uptime(doms: Annotated[list[str] | None, typer.Argument()] = None,
           as_json: JsonOpt = False) -> None:
    """Uptime of running domains."""
    c = client()
    views = [c.get(f"/domains/{q(d)}") for d in doms] if doms else c.get("/domains")
    rows = [{"name": v["name"], "domid": v["domid"], "uptime": v["uptime"]}
            for v in views if v["uptime"] is not None]
    if as_json:
        emit_json(rows)
        return
    out.print(f"{'Name':<24}{'ID':>4}  Uptime", highlight=False)
    for r in rows:
        out.print(f"{r['name']:<24}{r['domid']:>4}  {_hms(r['uptime'])}", highlight=False)


def _hms(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{days} day{'s' if days != 1 else ''}, " if days else "") + f"{h}:{m:02d}:{s:02d}"


@app.command()
def domid(name: str) -> None:
    """Print a domain's domid."""
    v = client().get(f"/domains/{q(name)}")
    if v["domid"] is None:
        raise GridvmError(f"domain {v['name']} is not running")
    out.print(v["domid"])


@app.command()
def domname(dom_id: str) -> None:
    """Print the name of a domid."""
    out.print(client().get(f"/domains/{q(dom_id)}")["name"], highlight=False)


@app.command()
def dmesg(dom: str, lines: Annotated[int, typer.Option("-n")] = 200) -> None:
    """A domain's console output (kernel messages)."""
    text = client().get(f"/domains/{q(dom)}/dmesg", params={"lines": lines})["text"]
    sys.stdout.write(text + "\n")


@app.command()
def log(lines: Annotated[int, typer.Option("-n")] = 200) -> None:
    """The gridvmd log."""
    sys.stdout.write(client().get("/log", params={"lines": lines})["text"] + "\n")


@app.command()
def demo(
    which: Annotated[str, typer.Argument(
        help="host: one FermiGrid host; fermigrid: FermiGrid-HA through a host power-off")]
    = "host",
    as_json: JsonOpt = False,
    keep: Annotated[bool, typer.Option("--keep", help="leave the demo running")] = False,
    db: Annotated[bool, typer.Option("--db", help="fermigrid: add the replicated MariaDB "
                                     "(two Debian guests: about a minute more)")] = False,
) -> None:
    """Demos: one FermiGrid host (default), or `fermigrid`, the main job (HA, LVS)."""
    if which == "fermigrid":
        from gridvm.fermigrid import render, run

        report = run(say=lambda m: err.print(f"fermigrid: {m}", highlight=False), db=db)
        if as_json:
            emit_json(report)
        else:
            out.print(render(report), highlight=False, markup=False)
        return
    if which != "host":
        raise GridvmError(f"unknown demo {which!r} (host or fermigrid)")
    from gridvm.demo import run_demo

    run_demo(as_json=as_json, keep=keep)


def main() -> None:
    try:
        app()
    except GridvmError as exc:
        sys.stderr.write(f"gridvm: error: {' '.join(str(exc).split())}\n")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
