"""VIP addresses: put one on the interface that faces its clients, announce it, take it off.

The VIP goes, as a /32, on the interface whose subnet holds it (so the LAN's ARP finds this
host), else on `lo` (a VIP reached through routes, or only from this host). Taking a VIP
over is announced with gratuitous ARP so the LAN's neighbour caches move at once.
Blocking calls: run them in a thread.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from gridvm.host import netdevs

ETH_P_ARP = 0x0806


def interface_for(vip: str, addresses: list[tuple[str, ipaddress.IPv4Interface]] | None = None
                  ) -> str:
    """The interface a VIP belongs on: the one whose (non-/32) subnet contains it, else lo."""
    ip = ipaddress.IPv4Address(vip)
    for ifname, addr in netdevs.all_addresses() if addresses is None else addresses:
        if addr.network.prefixlen < 32 and ip in addr.network and not addr.ip.is_loopback:
            return ifname
    return "lo"


def lan_interfaces(vips: set[str], addresses: list[tuple[str, ipaddress.IPv4Interface]]
                   ) -> set[str]:
    """The LAN interfaces these VIPs belong on (their directors' adverts go there), given
    the namespace's addresses (netdevs.all_addresses())."""
    return {interface_for(v, addresses) for v in vips} - {"lo"}


def present(vip: str) -> str | None:
    """The interface carrying `vip`, if any does."""
    for ifname, addr in netdevs.all_addresses():
        if str(addr.ip) == vip:
            return ifname
    return None


def add(vip: str) -> str | None:
    """Add the VIP (a /32) where it belongs and announce it; the interface, or None if the
    address was already on this host (then it is not ours to remove)."""
    if present(vip):
        return None
    ifname = interface_for(vip)
    netdevs.add_address(ifname, ipaddress.IPv4Interface(f"{vip}/32"))
    announce(vip, ifname)
    return ifname


def remove(vip: str, ifname: str) -> None:
    netdevs.del_address(ifname, ipaddress.IPv4Interface(f"{vip}/32"))


def announce(vip: str, ifname: str, count: int = 2) -> None:
    """Gratuitous ARP (a request and a reply for VIP from our MAC) on `ifname`."""
    link = netdevs.get_link(ifname)
    if link is None or link.loopback:
        return
    mac = bytes.fromhex(link.mac.replace(":", ""))
    ip = socket.inet_aton(vip)
    bcast = b"\xff" * 6
    frames = []
    for op, target_mac in ((1, b"\x00" * 6), (2, bcast)):
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, ip, target_mac, ip)
        frames.append(bcast + mac + struct.pack("!H", ETH_P_ARP) + arp)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((ifname, ETH_P_ARP))
        for _ in range(count):
            for frame in frames:
                s.send(frame)
