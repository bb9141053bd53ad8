"""How a domain gets its kernel when its config names a boot loader (pygrub).

The host layer only defines the protocol; gridvm.provision implements it (reading GRUB's
configuration from the domain's disk) and gridvmd injects it into the HostManager.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gridvm.config.model import DomainConfig
from gridvm.errors import ConfigError

PLACEHOLDER_KERNEL = "/pygrub/vmlinuz"


class BootLoader(Protocol):
    """Finds a PV domain's kernel on its own disk."""

    def boot(self, cfg: DomainConfig, workdir: Path) -> DomainConfig:
        """`cfg` with kernel, ramdisk and cmdline set, files placed under `workdir`."""
        ...


class NoBootLoader:
    def boot(self, cfg: DomainConfig, workdir: Path) -> DomainConfig:
        raise ConfigError(f"domain {cfg.name}: bootloader = 'pygrub' needs gridvmd's boot "
                          "loader (not available here)")


def uses_bootloader(cfg: DomainConfig) -> bool:
    return bool(cfg.bootloader) and cfg.type != "hvm"


def with_placeholder_kernel(cfg: DomainConfig) -> DomainConfig:
    """For checking a boot-loader domain's argv before its kernel is known."""
    if uses_bootloader(cfg) and not cfg.kernel:
        return cfg.model_copy(update={"kernel": PLACEHOLDER_KERNEL})
    return cfg
