"""`gridvm migrate`: move a domain to another host's gridvmd (xm migrate), with progress."""

from __future__ import annotations

import ipaddress
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from gridvm.api.client import Client, q
from gridvm.errors import ConfigError, GridvmError
from gridvm.host.migration import RELOCATION_PORT

err = Console(stderr=True)
POLL_S = 0.1


def resolve_target(host: str) -> str:
    """A lab host (`h2`, `LAB/h2`) → its gridvmd's relocation address; `ADDR[:PORT]` as is."""
    text = host.strip()
    if text.startswith("["):                    # [V6] or [V6]:PORT
        return text if "]:" in text else f"{text}:{RELOCATION_PORT}"
    if text.count(":") == 1:                    # NAME:PORT or V4:PORT
        name, port = text.split(":")
        if not name or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise ConfigError(f"invalid destination {host!r}: use HOST, LAB/HOST or ADDR[:PORT]")
        return text
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        from gridvm.lab.lab import find_host

        _, found = find_host(text)
        return f"{found.address.split('/')[0]}:{RELOCATION_PORT}"
    return f"[{address}]:{RELOCATION_PORT}" if address.version == 6 \
        else f"{address}:{RELOCATION_PORT}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _detail(job: dict[str, Any]) -> str:
    ram = job["ram"]
    parts = [f"sent {_size(ram['transferred'])}", f"left {_size(ram['remaining'])}",
             f"dirty {_size(ram['dirty_rate'])}/s"]
    if job.get("expected_downtime_ms") is not None:
        parts.append(f"expected downtime {job['expected_downtime_ms']} ms")
    if ram["iterations"]:
        parts.append(f"pass {ram['iterations']}")
    return " · ".join(parts)


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
                   total=ram["total"], completed=max(done, 0), detail=_detail(job))
    else:
        bar.update(task, description=phase)


def _follow(c: Client, job: dict[str, Any], show: bool) -> dict[str, Any]:
    """Poll the source's migration until it ends; Ctrl-C cancels it (twice: just leave)."""
    mid = job["id"]
    cancelled = False
    with Progress(TextColumn("{task.description:>9}"), BarColumn(),
                  DownloadColumn(binary_units=True), TextColumn("{task.fields[detail]}"),
                  console=err, transient=True, disable=not show) as bar:
        task = bar.add_task(job["phase"], total=None, detail="")
        while job["finished"] is None:
            try:
                time.sleep(POLL_S)
                job = c.get(f"/migrations/{q(mid)}")
            except KeyboardInterrupt:
                if cancelled:
                    raise
                cancelled = True
                err.print("cancelling the migration (Ctrl-C again to stop waiting)")
                c.post(f"/domains/{q(job['uuid'])}/migrate/cancel")
                continue
            _show(bar, task, job)
    return job


def summary(job: dict[str, Any], host: str) -> str:
    """One line with QEMU's figures for a completed migration."""
    total = job["total_time_ms"]
    parts = [f"total {total / 1000:.2f} s" if total is not None else "total ?",
             f"downtime {job['downtime_ms']} ms", f"setup {job['setup_time_ms']} ms",
             f"sent {_size(job['ram']['transferred'])}"]
    if job["copy_storage"]:
        parts.append(f"disks {_size(job['storage']['total'])}")
    where = f"{host} (id={job['dest_domid']})" if job["dest_domid"] is not None else host
    return f"Migrated {job['domain']} to {where}: " + ", ".join(parts)


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
