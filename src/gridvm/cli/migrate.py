"""`gridvm migrate`: move a domain to another host's gridvmd (xm migrate), with progress."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from gridvm.api.actions import migration_summary as summary
from gridvm.api.actions import progress_detail
from gridvm.api.client import Client, q
from gridvm.errors import ConfigError, GridvmError
from gridvm.netaddr import host_port, parse_hostport

API_PORT = 8002

err = Console(stderr=True)
POLL_S = 0.1


def resolve_target(host: str) -> str:
    """`ADDR[:PORT]` as is; a lab host (`LAB/h2`, or `h2` if one lab has it) → its gridvmd's
    address; any other name goes to gridvmd, which knows its cluster's hosts."""
    text = host.strip()
    try:
        address, port = parse_hostport(text, API_PORT)
    except ConfigError:
        pass
    else:
        return host_port(address, port)
    from gridvm.lab.lab import find_host

    try:
        _, found = find_host(text)
    except GridvmError:
        if "/" in text:
            raise
        return text                             # a host of gridvmd's cluster, by name
    return host_port(found.address.split("/")[0], API_PORT)


def _show(bar: Progress, task: Any, job: dict[str, Any]) -> None:
    phase = job["phase"]
    if phase == "storage":
        st = job["storage"]
        bar.update(task, description="disks", total=st["total"] or None,
                   completed=st["copied"], detail="mirroring to the destination")
    elif phase in ("memory", "switchover") and job["ram"]["total"]:
        ram = job["ram"]
        done = ram["total"] - ram["remaining"] if ram["transferred"] else 0
        bar.update(task, description="memory" if phase == "memory" else "switching",
                   total=ram["total"], completed=max(done, 0), detail=progress_detail(job))
    else:
        bar.update(task, description=phase)


def _follow(c: Client, job: dict[str, Any], show: bool) -> dict[str, Any]:
    """Poll the source's migration until it ends; Ctrl-C cancels it (twice: just leave)."""
    mid = job["id"]
    where = {"host": job["host"]} if job.get("host") else None   # the source, in a cluster
    cancelled = False
    with Progress(TextColumn("{task.description:>9}"), BarColumn(),
                  DownloadColumn(binary_units=True), TextColumn("{task.fields[detail]}"),
                  console=err, transient=True, disable=not show) as bar:
        task = bar.add_task(job["phase"], total=None, detail="")
        while job["finished"] is None:
            try:
                time.sleep(POLL_S)
                job = c.get(f"/migrations/{q(mid)}", params=where)
            except KeyboardInterrupt:
                if cancelled:
                    raise
                cancelled = True
                err.print("cancelling the migration (Ctrl-C again to stop waiting)")
                c.post(f"/domains/{q(job['uuid'])}/migrate/cancel")
                continue
            _show(bar, task, job)
    return job


def migrate(
    dom: Annotated[str, typer.Argument(help="the domain (name, domid or UUID)")],
    host: Annotated[str | None, typer.Argument(
        help="destination: a lab host (h2, LAB/h2) or its gridvmd's ADDR[:PORT]")] = None,
    live: Annotated[bool, typer.Option(
        "--live", "-l", help="keep the guest running during the copy")] = False,
    downtime_ms: Annotated[int | None, typer.Option(
        "--downtime-ms", help="longest pause allowed at the switch (default 300); gridvm "
        "starts at 10 ms and raises the limit up to this only while the copy cannot converge")]
    = None,
    bandwidth: Annotated[int | None, typer.Option(
        "--bandwidth", help="MiB/s for the copy (default unlimited)")] = None,
    auto_converge: Annotated[bool, typer.Option(
        "--auto-converge", help="slow the guest's vCPUs down until the copy converges")] = False,
    copy_storage: Annotated[bool, typer.Option(
        "--copy-storage", help="mirror the disks to the destination (storage not shared)")]
    = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", help="give up (and keep the domain here) after this many seconds")] = 600,
    cancel: Annotated[bool, typer.Option(
        "--cancel", help="stop the migration of DOM in progress")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Move a domain to another host; without --live it is paused during the copy."""
    from gridvm.cli.main import client, emit_json, out

    c = client(60)
    if cancel:
        if host is not None:
            raise ConfigError("migrate --cancel takes only the domain")
        job = _follow(c, c.post(f"/domains/{q(dom)}/migrate/cancel"), show=False)
        if as_json:
            emit_json(job)
        elif job["phase"] == "completed":
            out.print(f"The migration of {job['domain']} completed before it could be "
                      "cancelled", highlight=False)
        else:
            out.print(job["error"] or f"migration of {job['domain']} {job['phase']}",
                      highlight=False)
        return
    if host is None:
        raise ConfigError("migrate: say where to: a lab host (h2) or ADDR[:PORT]")
    target = resolve_target(host)
    job = c.post(f"/domains/{q(dom)}/migrate", {
        "target": target, "live": live, "downtime_ms": downtime_ms, "bandwidth": bandwidth,
        "auto_converge": auto_converge, "copy_storage": copy_storage, "timeout": timeout})
    job = _follow(c, job, show=not as_json)
    if job["phase"] != "completed":
        raise GridvmError(job["error"] or f"migration of {job['domain']} {job['phase']}")
    if as_json:
        emit_json(job)
    else:
        out.print(summary(job, host), highlight=False, soft_wrap=True)
