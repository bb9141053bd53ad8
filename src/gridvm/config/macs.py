"""MAC addresses for vifs: Xen's OUI 00:16:3e, unique against the MACs already in use.

As in xend's `randomMAC`, the fourth octet stays below 0x80, leaving the upper half of
the OUI's space for statically assigned addresses.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from gridvm.config.model import DomainConfig
from gridvm.errors import Conflict

__all__ = ["XEN_OUI", "assign_macs", "generate_mac"]

XEN_OUI = "00:16:3e"
_ATTEMPTS = 10_000


def generate_mac(used: Collection[str] = (), rng: random.Random | None = None) -> str:
    """A random `00:16:3e:xx:xx:xx` MAC (lower case) not in `used` (compared case-insensitively)."""
    rng = rng or random.SystemRandom()
    taken = {m.lower() for m in used}
    for _ in range(_ATTEMPTS):
        octets = (rng.randint(0x00, 0x7F), rng.randint(0x00, 0xFF), rng.randint(0x00, 0xFF))
        mac = XEN_OUI + "".join(f":{o:02x}" for o in octets)
        if mac not in taken:
            return mac
    raise Conflict(f"no free MAC address found under {XEN_OUI} after {_ATTEMPTS} attempts")


def assign_macs(config: DomainConfig, used: Collection[str]) -> DomainConfig:
    """`config` with a MAC for every vif that has none, unique vs `used` and each other.

    Returns a copy when something was assigned (the input is never modified).
    """
    if all(vif.mac for vif in config.vifs):
        return config
    taken = {m.lower() for m in used} | {v.mac for v in config.vifs if v.mac}
    vifs = []
    for vif in config.vifs:
        if vif.mac is None:
            mac = generate_mac(taken)
            taken.add(mac)
            vif = vif.model_copy(update={"mac": mac})
        vifs.append(vif)
    return config.model_copy(update={"vifs": vifs})
