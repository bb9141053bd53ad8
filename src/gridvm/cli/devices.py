"""Xen's hotplug verbs: block-attach/-detach/-list, network-attach/-detach/-list, vcpu-set,
and vnc-display (where a domain's VNC server listens)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gridvm.api.client import Client, q
from gridvm.config.xmfile import parse_disk, parse_vif
from gridvm.errors import ConfigError

out = Console()
err = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _client() -> Client:
    from gridvm.cli.main import client

    return client()


def _emit(data: Any) -> None:
    from gridvm.cli.main import emit_json

    emit_json(data)


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> None:
    table = Table(box=None, pad_edge=False, show_edge=False)
    for title, _ in cols:
        table.add_column(title)
    for row in rows:
        table.add_row(*("-" if row.get(k) is None else str(row[k]) for _, k in cols))
    out.print(table, highlight=False)


def block_attach(
    dom: str,
    target: Annotated[str, typer.Argument(help="image or device, e.g. file:/srv/d.img, "
                                          "tap:qcow2:/srv/d.qcow2, phy:/dev/vg0/d")],
    vdev: Annotated[str, typer.Argument(help="the guest's device, e.g. xvdb")],
    mode: Annotated[str, typer.Argument(help="r or w")] = "w",
) -> None:
    """Attach a disk to a domain (hot-plugged if it runs; kept for its next start)."""
    notes: list[str] = []
    try:
        spec = parse_disk(f"vdev={vdev}, access={mode}, target={target}", notes)
    except ValueError as exc:
        raise ConfigError(f"block-attach: {exc}") from None
    if spec is None:
        raise ConfigError("block-attach: no target given")
    for note in notes:
        err.print(f"gridvm: warning: {note}", highlight=False)
    _client().post(f"/domains/{q(dom)}/block", {"disk": spec.model_dump(mode="json")})


def block_detach(dom: str, vdev: str) -> None:
    """Detach a disk from a domain (the guest releases it first)."""
    _client().delete(f"/domains/{q(dom)}/block/{q(vdev)}")


def block_list(dom: str, as_json: JsonOpt = False) -> None:
    """A domain's disks."""
    rows = _client().get(f"/domains/{q(dom)}/block")
    if as_json:
        _emit(rows)
        return
    for r in rows:
        r["kind"] = r["devtype"] + (" (root)" if r["root"] else "")
    _table(rows, [("Vdev", "vdev"), ("Mode", "mode"), ("Format", "format"), ("Type", "kind"),
                  ("Slot", "slot"), ("Target", "target")])


def network_attach(
    dom: str,
    settings: Annotated[list[str] | None, typer.Argument(
        help="vif settings as in a config: mac=… bridge=… model=… ip=… rate=…")] = None,
) -> None:
    """Attach a NIC to a domain (hot-plugged if it runs; kept for its next start)."""
    notes: list[str] = []
    try:
        vif = parse_vif(",".join(settings or []), notes)
    except ValueError as exc:
        raise ConfigError(f"network-attach: {exc}") from None
    for note in notes:
        err.print(f"gridvm: warning: {note}", highlight=False)
    got = _client().post(f"/domains/{q(dom)}/network", {"vif": vif.model_dump(mode="json")})
    out.print(f"attached {got['mac']}", highlight=False)


def network_detach(dom: str, vif: Annotated[str, typer.Argument(
        help="the vif's index (network-list) or MAC")]) -> None:
    """Detach a NIC from a domain."""
    _client().delete(f"/domains/{q(dom)}/network/{q(vif)}")


def network_list(dom: str, as_json: JsonOpt = False) -> None:
    """A domain's NICs."""
    rows = _client().get(f"/domains/{q(dom)}/network")
    if as_json:
        _emit(rows)
        return
    _table(rows, [("Idx", "index"), ("MAC", "mac"), ("Bridge", "bridge"), ("Model", "model"),
                  ("Tap", "tap"), ("IP", "ip"), ("Rate", "rate")])


def vcpu_set(dom: str, vcpus: int) -> None:
    """Set how many vCPUs a domain has (1..maxvcpus; hot-plugged if it runs)."""
    _client().post(f"/domains/{q(dom)}/vcpu-set", {"vcpus": vcpus})


def vnc_display(dom: str, as_json: JsonOpt = False) -> None:
    """Where to point a VNC viewer for a domain (HOST:PORT and the display)."""
    info = _client().get(f"/domains/{q(dom)}/vnc")
    if as_json:
        _emit(info)
        return
    host = f"[{info['host']}]" if ":" in info["host"] else info["host"]
    auth = " (password)" if info["password"] else ""
    out.print(f"{host}:{info['port']} (display :{info['display']}){auth}", highlight=False)


def register(app: typer.Typer) -> None:
    for fn in (block_attach, block_detach, block_list, network_attach, network_detach,
               network_list, vcpu_set, vnc_display):
        app.command(fn.__name__.replace("_", "-"))(fn)
