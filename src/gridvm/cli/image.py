"""`gridvm image …`: build (tiny, debian from recipes), list, template, import."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gridvm.errors import GridvmError
from gridvm.paths import Home

image_app = typer.Typer(no_args_is_help=True, help="Guest images: build, list, template, import.")
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _home() -> Home:
    from gridvm.cli.main import State  # main imports this module: resolve at call time

    return State.home


def _print(text: str) -> None:
    from gridvm.cli.main import out

    out.print(text, highlight=False, markup=False, soft_wrap=True)


def _emit(data: Any) -> None:
    from gridvm.cli.main import emit_json

    emit_json(data)


class RichProgress:
    """A build's phases as a Rich progress bar; detail lines update its description."""

    def __init__(self, progress: Progress, title: str) -> None:
        self.progress = progress
        self.title = title
        self.task = progress.add_task(title, total=1, detail="")
        self.current = ""

    def phase(self, index: int, total: int, text: str) -> None:
        self.current = text
        self.progress.update(self.task, total=total, completed=index - 1,
                             description=f"{self.title}: {text}", detail="")

    def detail(self, text: str) -> None:
        self.progress.update(self.task, detail=text[-70:])

    def finish(self) -> None:
        task = self.progress.tasks[self.task]
        self.progress.update(self.task, completed=task.total or 1, detail="")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=20),
                    TimeElapsedColumn(), TextColumn("[dim]{task.fields[detail]}"),
                    console=err, transient=False)


@image_app.command("build")
def image_build(
    kind: Annotated[str, typer.Argument(help="tiny (the test guest) or debian")] = "tiny",
    release: Annotated[str | None, typer.Option(help="Debian release (default bookworm)")]
    = None,
    arch: Annotated[str | None, typer.Option(help="amd64 or i386")] = None,
    recipe: Annotated[Path | None, typer.Option(help="a recipe file (TOML)")] = None,
    name: Annotated[str | None, typer.Option(
        help="image name (default: the recipe's name, with -i386 for --arch i386)")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if cached")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a guest image into the image store (cached: the same recipe builds once)."""
    images = _home().images
    if kind == "tiny":
        if recipe or release or arch:
            raise GridvmError("the tiny image takes no recipe, --release or --arch")
        from gridvm.images.tiny import build_tiny

        images.mkdir(parents=True, exist_ok=True)
        with err.status("building the tiny guest image") as status:
            img = build_tiny(images, force=force, log=lambda msg: status.update(f"tiny: {msg}"))
        _print(f"tiny: kernel {img.kernel}, ramdisk {img.ramdisk}, disk {img.disk}")
        return
    if kind != "debian":
        raise GridvmError(f"unknown image kind {kind!r} (tiny or debian)")
    from gridvm.provision.debian import build_debian
    from gridvm.provision.recipe import Recipe, load_recipe

    base = load_recipe(recipe) if recipe else Recipe()
    overrides: dict[str, object] = {"release": release, "arch": arch}
    wanted = base.with_overrides(**overrides)
    if name is None:
        name = wanted.name
        if arch == "i386" and not name.endswith("i386"):
            name += "-i386"
    with progress_bar() as bar:
        rp = RichProgress(bar, name)
        img = build_debian(images, wanted, name=name, force=force, progress=rp,
                           base_dir=recipe.parent if recipe else None)
        rp.finish()
    if as_json:
        _emit(img.to_json())
    else:
        _print(f"{img.name}: {img.os or 'Debian'} {img.arch}, disk {img.disk}, "
               f"kernel {img.kernel} ({img.kernel_version})")


@image_app.command("list")
def image_list(as_json: JsonOpt = False) -> None:
    """List images in the store."""
    from gridvm.images.store import list_images

    images = list_images(_home().images)
    if as_json:
        _emit([i.to_json() for i in images])
        return
    for i in images:
        if i.kind == "tiny":
            _print(f"{i.name}: kernel={i.kernel} ramdisk={i.ramdisk} disk={i.disk}")
        else:
            flags = " template" if i.template else ""
            _print(f"{i.name}: {i.kind} {i.arch} {i.os!r}{flags} disk={i.disk}")


@image_app.command("import")
def image_import(
    source: Annotated[Path, typer.Argument(help="a directory (an rsync of a system), a tarball "
                                           "or a disk image (raw or qcow2)")],
    name: str,
    hostname: Annotated[str | None, typer.Option(help="the imported system's hostname")]
    = None,
    ip: Annotated[str | None, typer.Option(help="static ADDR/PREFIX (default DHCP)")] = None,
    gateway: Annotated[str | None, typer.Option()] = None,
    dns: Annotated[list[str] | None, typer.Option(help="name server (repeatable)")] = None,
    mac: Annotated[str | None, typer.Option(
        help="MAC for HWADDR in ifcfg-eth0 (default: a new one; gridvm-identity updates it "
        "to the NIC's at every boot)")] = None,
    size: Annotated[str | None, typer.Option(help="disk size, e.g. 8G (default: room for "
                                             "the system and half as much again)")] = None,
    fs: Annotated[str, typer.Option(help="auto (ext3 for Red Hat 5 era), ext3 or ext4")]
    = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Import an installed system as an image: identity reset (as virt-sysprep), network
    rewritten for its new identity, bootable disk (GRUB) and PV kernel."""
    import ipaddress

    from gridvm.config.macs import generate_mac
    from gridvm.errors import ConfigError
    from gridvm.provision.importer import import_system
    from gridvm.provision.netconfig import NetIdentity

    try:
        address = ipaddress.IPv4Interface(ip) if ip else None
        for a in [*([gateway] if gateway else []), *(dns or [])]:
            ipaddress.IPv4Address(a)
    except ValueError as exc:
        raise ConfigError(f"invalid address: {exc}") from None
    if hostname is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", hostname):
        raise ConfigError(f"invalid --hostname {hostname!r}")
    if mac is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
        raise ConfigError(f"invalid --mac {mac!r}")
    ident = NetIdentity(hostname=hostname, mac=(mac or generate_mac()).lower(),
                        address=address, gateway=gateway, dns=tuple(dns or []))
    with progress_bar() as bar:
        rp = RichProgress(bar, name)
        img = import_system(_home().images, source.absolute(), name, ident, size=size,
                            fs_type=fs, progress=rp)
        rp.finish()
    if as_json:
        _emit({**img.to_json(), "mac": ident.mac})
    else:
        _print(f"{img.name}: {img.os} {img.arch}, disk {img.disk}, kernel {img.kernel_version}"
               f"{'' if img.agent else ' (no qemu-guest-agent in it)'}; HWADDR {ident.mac}")
