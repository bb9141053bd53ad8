"""The image store: one directory per image under images_dir, described by image.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridvm.errors import GridvmError, NotFound

MANIFEST = "image.json"
DEFAULT_CMDLINE = "console=ttyS0 quiet"


class ImageError(GridvmError):
    """An image is broken or could not be built."""


@dataclass(frozen=True)
class ImageInfo:
    """A guest image: PV kernel + ramdisk, and an optional bootable HVM disk.

    `hvm_kernel`/`hvm_ramdisk` are the kernel and initramfs inside `disk` (the
    generic kernel with emulated-device drivers), usable for direct boot too.
    Built and imported systems (`kind` debian/import) boot from `disk` (GRUB; or through
    pygrub) and export their kernel for PV direct boot with `root` (e.g. `UUID=…`);
    a `template` is read-only: domains use it through copy-on-write clones.
    """

    name: str
    kernel: Path
    ramdisk: Path
    disk: Path | None
    hvm_kernel: Path | None = None
    hvm_ramdisk: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    kernel_version: str = ""
    hvm_kernel_version: str = ""
    recipe: str = ""
    kind: str = "tiny"
    arch: str = "amd64"
    disk_format: str = "raw"
    root: str = ""
    os: str = ""
    template: bool = False
    agent: bool = False
    cloud_init: bool = False
    virtual_size: int = 0

    def to_json(self) -> dict[str, Any]:
        """The stable summary: name and absolute paths (plus what a system image is)."""
        out: dict[str, Any] = {
            "name": self.name,
            "kernel": str(self.kernel),
            "ramdisk": str(self.ramdisk),
            "disk": str(self.disk) if self.disk is not None else None,
        }
        if self.kind != "tiny":
            out.update(kind=self.kind, arch=self.arch, format=self.disk_format, os=self.os,
                       root=self.root, template=self.template, agent=self.agent,
                       cloud_init=self.cloud_init, virtual_size=self.virtual_size,
                       cmdline=self.cmdline)
        return out

    def manifest(self) -> dict[str, Any]:
        """image.json content: file names relative to the image directory."""

        def rel(p: Path | None) -> str | None:
            return p.name if p is not None else None

        return {
            "name": self.name,
            "kernel": rel(self.kernel),
            "ramdisk": rel(self.ramdisk),
            "disk": rel(self.disk),
            "hvm_kernel": rel(self.hvm_kernel),
            "hvm_ramdisk": rel(self.hvm_ramdisk),
            "cmdline": self.cmdline,
            "kernel_version": self.kernel_version,
            "hvm_kernel_version": self.hvm_kernel_version,
            "recipe": self.recipe,
            "kind": self.kind,
            "arch": self.arch,
            "disk_format": self.disk_format,
            "root": self.root,
            "os": self.os,
            "template": self.template,
            "agent": self.agent,
            "cloud_init": self.cloud_init,
            "virtual_size": self.virtual_size,
        }


def write_manifest(image_dir: Path, info: ImageInfo) -> None:
    """Write image.json for `info` (whose files live in image_dir)."""
    path = image_dir / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info.manifest(), indent=2) + "\n")
    tmp.replace(path)


def load_image(image_dir: Path) -> ImageInfo:
    """Read image_dir/image.json; paths in it are resolved against image_dir."""
    path = image_dir / MANIFEST
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no image at {image_dir}") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: unreadable image manifest: {e}") from e
    if not isinstance(data, dict):
        raise ImageError(f"{path}: image manifest is not an object")
    root = image_dir.absolute()

    def file(key: str) -> Path:
        value = data.get(key)
        if not isinstance(value, str) or not value or "/" in value:
            raise ImageError(f"{path}: bad or missing {key!r}")
        return root / value

    def optional(key: str) -> Path | None:
        return None if data.get(key) is None else file(key)

    def text(key: str, default: str) -> str:
        value = data.get(key, default)
        return value if isinstance(value, str) else default

    def flag(key: str) -> bool:
        return data.get(key) is True

    size = data.get("virtual_size", 0)

    return ImageInfo(
        name=text("name", image_dir.name),
        kernel=file("kernel"),
        ramdisk=file("ramdisk"),
        disk=optional("disk"),
        hvm_kernel=optional("hvm_kernel"),
        hvm_ramdisk=optional("hvm_ramdisk"),
        cmdline=text("cmdline", DEFAULT_CMDLINE),
        kernel_version=text("kernel_version", ""),
        hvm_kernel_version=text("hvm_kernel_version", ""),
        recipe=text("recipe", ""),
        kind=text("kind", "tiny"),
        arch=text("arch", "amd64"),
        disk_format=text("disk_format", "raw"),
        root=text("root", ""),
        os=text("os", ""),
        template=flag("template"),
        agent=flag("agent"),
        cloud_init=flag("cloud_init"),
        virtual_size=size if isinstance(size, int) else 0,
    )


def list_images(images_dir: Path) -> list[ImageInfo]:
    """Every complete image in images_dir, by name (broken ones are skipped)."""
    if not images_dir.is_dir():
        return []
    out: list[ImageInfo] = []
    for d in sorted(images_dir.iterdir()):
        if d.name.startswith(".") or not (d / MANIFEST).is_file():
            continue
        try:
            out.append(load_image(d))
        except GridvmError:
            continue
    return out


def get_image(images_dir: Path, name: str) -> ImageInfo:
    """The image called `name`; raises NotFound if it is not built."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise NotFound(f"no image named {name!r} in {images_dir}")
    d = images_dir / name
    if not (d / MANIFEST).is_file():
        raise NotFound(f"no image named {name!r} in {images_dir}")
    return load_image(d)


def template_of(images_dir: Path, path: str | Path) -> str | None:
    """The name of the template image whose disk `path` is, if it is one."""
    try:
        target = Path(path).resolve()
        root = images_dir.resolve()
    except OSError:
        return None
    if target.parent.parent != root:
        return None
    try:
        info = load_image(target.parent)
    except GridvmError:
        return None
    if info.template and info.disk is not None and info.disk.resolve() == target:
        return info.name
    return None
