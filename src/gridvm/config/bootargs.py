"""Xen pygrub's options (`bootloader_args`), parsed once for the reader and the boot loader."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from gridvm.errors import ConfigError

OPTIONS = ("entry", "kernel", "ramdisk", "args", "config")


@dataclass(frozen=True)
class BootArgs:
    """`--entry=N|TITLE|ID|N>M`, `--kernel=PATH`, `--ramdisk=PATH`, `--args=TEXT` (appended
    to the entry's), `--config=[(hdX,Y)]PATH` (PV-GRUB's menu.lst)."""

    entry: str | None = None
    kernel: str | None = None
    ramdisk: str | None = None
    args: str | None = None
    config: str | None = None


def parse_boot_args(items: list[str]) -> BootArgs:
    """Options from a list, or strings split like sh; `-q`/`--quiet` are accepted and ignored."""
    words: list[str] = []
    for item in items:
        try:
            words += shlex.split(item)
        except ValueError as exc:
            raise ConfigError(f"bootloader_args: {exc}") from None
    found: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word in ("-q", "--quiet", "--not-really"):
            continue
        key, eq, value = word.partition("=")
        name = key[2:] if key.startswith("--") else ""
        if name not in OPTIONS:
            raise ConfigError(f"bootloader_args: unsupported option {word!r} "
                              "(pygrub takes --entry, --kernel, --ramdisk, --args)")
        if not eq:
            if i >= len(words):
                raise ConfigError(f"bootloader_args: {key} needs a value")
            value = words[i]
            i += 1
        found[name] = value
    return BootArgs(**found)
