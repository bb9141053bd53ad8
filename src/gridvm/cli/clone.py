"""`gridvm clone` and `gridvm image template`: linked clones of read-only templates."""

from __future__ import annotations

import contextlib
import time
from typing import Annotated, Any

import typer

from gridvm.errors import ConfigError, Conflict, GridvmError


def register(app: typer.Typer, image_app: typer.Typer) -> None:
    app.command("clone")(clone)
    image_app.command("template")(template)


def template(
    image: str,
    undo: Annotated[bool, typer.Option("--undo", help="make it writable again (no clones)")]
    = False,
) -> None:
    """Mark an image as a read-only template (the base of linked clones)."""
    from gridvm.cli.main import State, out
    from gridvm.images.store import get_image
    from gridvm.provision import clone as clones

    home = State.home
    if undo:
        info = get_image(home.images, image)
        clones.unmark_template(home.images, image, clones.clones_of(home, info))
        out.print(f"{image}: writable (no longer a template)", highlight=False)
        return
    info = clones.mark_template(home.images, image)
    out.print(f"{image}: template (read-only), disk {info.disk}", highlight=False)


def _parse_sets(items: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE")
        found[key] = value
    return found


def clone(
    template_name: Annotated[str, typer.Argument(metavar="TEMPLATE")],
    name: str,
    count: Annotated[int, typer.Option("--count", "-n", help="make NAME1..NAMEn")] = 1,
    ip: Annotated[str | None, typer.Option(
        help="static address ADDR[/PREFIX] (consecutive for --count); default DHCP")] = None,
    gateway: Annotated[str | None, typer.Option(help="default gateway with --ip")] = None,
    hostname: Annotated[str | None, typer.Option(help="hostname (default: the name)")] = None,
    bridge: Annotated[str, typer.Option(help="network or bridge of the vif")] = "xenbr0",
    memory: Annotated[int, typer.Option(help="MiB")] = 512,
    vcpus: Annotated[int, typer.Option()] = 1,
    kind: Annotated[str, typer.Option(
        "--type", help="pv (pygrub, virtio) or hvm (SeaBIOS + GRUB, emulated devices)")] = "pv",
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE guest variable (repeatable), e.g. server_id=2")] = None,
    start: Annotated[bool, typer.Option("--start", help="start the clones too")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Linked clones of a template: qcow2 overlays and domain configs, each its own identity."""
    from gridvm.api.client import q
    from gridvm.cli.main import State, client, emit_json, out
    from gridvm.config.xmfile import load_config
    from gridvm.images.store import get_image
    from gridvm.provision import clone as clones

    if kind not in ("pv", "hvm"):
        raise ConfigError(f"--type {kind!r}: expected pv or hvm")
    home = State.home
    started = time.monotonic()
    info = get_image(home.images, template_name)
    if not info.template:
        raise ConfigError(f"image {template_name} is not a template: run 'gridvm image template "
                          f"{template_name}' first (clones share its disk, so it must never "
                          "change)")
    c = client(300)
    existing: list[dict[str, Any]] = c.get("/domains")
    used = {v["mac"] for d in existing for v in d.get("vifs", []) if v.get("mac")}
    specs = clones.plan(name, count=count, hostname=hostname, ip=ip, gateway=gateway,
                        guest_vars=_parse_sets(sets or []), used_macs=used)
    names = {d["name"] for d in existing}
    for spec in specs:
        if spec.name in names:
            raise Conflict(f"domain name {spec.name!r} is already in use")
    clones.check_free(home, specs)
    machine = clones.Machine(type=kind, memory=memory, vcpus=vcpus, bridge=bridge)
    made = clones.Made()
    defined: list[str] = []
    results = []
    try:
        for spec in specs:
            cfg_path = clones.make_files(home, info, spec, machine, made)
            cfg = load_config(cfg_path).config
            view = c.post("/domains", {"config": cfg.model_dump(mode="json"), "managed": True,
                                       "start": False})
            defined.append(view["name"])
            results.append({"name": spec.name, "mac": spec.mac, "hostname": spec.hostname,
                            "ip": str(spec.address.ip) if spec.address else None,
                            "disk": str(home.disks / f"{spec.name}.qcow2"),
                            "config": str(cfg_path)})
        if start:
            for spec in specs:
                view = c.post(f"/domains/{q(spec.name)}/start", {})
                out.print(f"Started domain {view['name']} (id={view['domid']})",
                          highlight=False)
    except BaseException:
        for dom in defined:
            with contextlib.suppress(GridvmError):
                c.post(f"/domains/{q(dom)}/destroy")
            with contextlib.suppress(GridvmError):
                c.delete(f"/domains/{q(dom)}")
        made.remove()
        raise
    took = time.monotonic() - started
    if as_json:
        emit_json({"clones": results, "seconds": round(took, 3)})
        return
    for r in results:
        where = r["ip"] or "dhcp"
        out.print(f"{r['name']}: {r['mac']} {where} hostname {r['hostname']} ({r['config']})",
                  highlight=False)
    out.print(f"{len(results)} clone(s) of {template_name} in {took:.2f} s", highlight=False)
