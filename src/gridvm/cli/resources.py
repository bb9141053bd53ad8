"""xm resource verbs: sched-credit, vcpu-pin, vcpu-list, mem-set, mem-max, block-throttle,
network-rate."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gridvm.api.client import Client, q
from gridvm.config.xmvalues import parse_bytes
from gridvm.errors import ConfigError

out = Console()
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _client() -> Client:
    from gridvm.cli.main import client

    return client()


def _emit(data: Any) -> None:
    from gridvm.cli.main import emit_json

    emit_json(data)


def sched_credit(
    dom: Annotated[str | None, typer.Option("-d", "--domain")] = None,
    weight: Annotated[int | None, typer.Option("-w", "--weight")] = None,
    cap: Annotated[int | None, typer.Option("-c", "--cap")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or set credit-scheduler weight (relative share) and cap (% of one CPU)."""
    c = _client()
    if weight is not None or cap is not None:
        if dom is None:
            raise ConfigError("sched-credit: -d DOMAIN is needed to change weight or cap")
        rows = [c.post(f"/domains/{q(dom)}/sched-credit", {"weight": weight, "cap": cap})]
    else:
        rows = c.get("/sched-credit")
        if dom is not None:
            view = c.get(f"/domains/{q(dom)}")
            rows = [r for r in rows if r["name"] == view["name"]]
    if as_json:
        _emit(rows)
        return
    table = Table(box=None)
    for col in ("Name", "ID", "Weight", "Cap"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["domid"] if r["domid"] is not None else "-"),
                      str(r["weight"]), str(r["cap"]))
    out.print(table, highlight=False)


def vcpu_pin(dom: str, vcpu: str, cpus: str) -> None:
    """Pin a vCPU (or 'all') to host CPUs, in Xen's cpu list syntax (e.g. 0-3,^1)."""
    _client().post(f"/domains/{q(dom)}/vcpu-pin", {"vcpu": vcpu, "cpus": cpus})


def vcpu_list(
    dom: Annotated[str | None, typer.Argument()] = None, as_json: JsonOpt = False
) -> None:
    """vCPUs of running domains: host thread, current CPU, time and affinity."""
    rows = _client().get("/vcpu-list", params={"dom": dom} if dom else None)
    if as_json:
        _emit(rows)
        return
    table = Table(box=None)
    for col in ("Name", "ID", "VCPU", "CPU", "State", "Time(s)", "CPU Affinity"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["domid"]), str(r["vcpu"]), str(r["cpu"]), r["state"],
                      f"{r['time']:.1f}", r["affinity"])
    out.print(table, highlight=False)


def mem_set(dom: str, mb: int) -> None:
    """Set a running domain's memory (MiB) through the balloon."""
    _client().post(f"/domains/{q(dom)}/mem-set", {"mb": mb})


def mem_limit(dom: str, mb: int) -> None:
    """Cap a running domain's QEMU at MB MiB of host memory (its cgroup; 0 removes the cap)."""
    _client().post(f"/domains/{q(dom)}/mem-limit", {"mb": mb})


def mem_max(dom: str, mb: int) -> None:
    """Set a domain's maximum memory (MiB) for its next start."""
    _client().post(f"/domains/{q(dom)}/mem-max", {"mb": mb})


def _size(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    if value.strip() == "0":
        return 0
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def block_throttle(
    dom: str,
    dev: str,
    bps: Annotated[str | None, typer.Option("--bps", help="bytes/s, e.g. 10M; 0 = none")] = None,
    bps_rd: Annotated[str | None, typer.Option("--bps-rd")] = None,
    bps_wr: Annotated[str | None, typer.Option("--bps-wr")] = None,
    iops: Annotated[int | None, typer.Option("--iops")] = None,
    iops_rd: Annotated[int | None, typer.Option("--iops-rd")] = None,
    iops_wr: Annotated[int | None, typer.Option("--iops-wr")] = None,
) -> None:
    """Limit a disk's throughput live (QEMU block throttling)."""
    body = {"bps": _size(bps, "--bps"), "bps_rd": _size(bps_rd, "--bps-rd"),
            "bps_wr": _size(bps_wr, "--bps-wr"), "iops": iops, "iops_rd": iops_rd,
            "iops_wr": iops_wr}
    _client().post(f"/domains/{q(dom)}/block-throttle/{q(dev)}", body)


def network_rate(dom: str, vif: str, rate: str) -> None:
    """Shape a vif (index or MAC) to RATE in xm syntax (10Mb/s, 1MB/s@20ms; 'none' removes)."""
    _client().post(f"/domains/{q(dom)}/network-rate/{q(vif)}",
                   {"rate": None if rate in ("none", "0") else rate})


def network_pps(dom: str, vif: str, pps: int) -> None:
    """Police the packets a vif's guest sends to PPS per second (0 removes the limit)."""
    _client().post(f"/domains/{q(dom)}/network-pps/{q(vif)}", {"pps": pps})


def register(app: typer.Typer) -> None:
    for fn in (sched_credit, vcpu_pin, vcpu_list, mem_set, mem_limit, mem_max,
               block_throttle,
               network_rate, network_pps):
        app.command(fn.__name__.replace("_", "-"))(fn)
