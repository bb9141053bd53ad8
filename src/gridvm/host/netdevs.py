"""Bridges, ports, veths, addresses and routes for networks and labs (pyroute2).

Every function works in the calling thread's network namespace and blocks: call it from
a worker thread (`asyncio.to_thread`) in the daemon, or through `netns.call_in` in a lab.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gridvm.host.links import LinkError, delete_link


@dataclass(frozen=True)
class Link:
    """What gridvm needs to know about a network interface."""

    name: str
    index: int
    kind: str          # "bridge", "veth", "tun", "" for a physical device, ...
    master: int | None
    carrier: bool
    mac: str
    loopback: bool


@dataclass(frozen=True)
class Route:
    """An IPv4 route through a gateway (what moves with an uplink's addresses)."""

    dst: str           # "default" or a CIDR
    gateway: str


def _link(msg: Any) -> Link:
    """A Link from a pyroute2 ifinfmsg (untyped)."""
    get = msg.get_attr
    return Link(name=str(get("IFLA_IFNAME")), index=int(msg["index"]),
                kind=str(msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""),
                master=get("IFLA_MASTER"), carrier=bool(get("IFLA_CARRIER")),
                mac=str(get("IFLA_ADDRESS") or ""), loopback=bool(msg["flags"] & 0x8))


def get_link(name: str) -> Link | None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        return _link(ipr.get_links(found[0])[0]) if found else None


def links() -> list[Link]:
    with IPRoute() as ipr:
        return [_link(m) for m in ipr.get_links()]


def ports(bridge: str) -> list[Link]:
    """The interfaces enslaved to `bridge`."""
    br = get_link(bridge)
    return [] if br is None else [lk for lk in links() if lk.master == br.index]


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LinkError(f"no network interface {name}")
    return int(found[0])


def create_bridge(name: str, *, mac: str | None = None) -> None:
    """A new bridge, up; `mac` pins its address (else it follows its lowest port)."""
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="bridge")
            idx = _index(ipr, name)
            if mac:
                ipr.link("set", index=idx, address=mac)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise LinkError(f"cannot create bridge {name}: {exc}") from exc


def set_master(name: str, master: str | None) -> None:
    """Enslave `name` to bridge `master` (None: release it) and bring it up."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        try:
            ipr.link("set", index=idx, master=_index(ipr, master) if master else 0)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise LinkError(f"cannot attach {name} to {master}: {exc}") from exc


def set_up(name: str) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=_index(ipr, name), state="up")


def set_down(name: str) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=_index(ipr, name), state="down")


def delete(name: str) -> None:
    """Remove a link if it exists (idempotent)."""
    delete_link(name)


def host_bridge(name: str, address: str) -> None:
    """A bridge with dom0's address on it (`10.0.0.1/24`), and loopback up (labs, demos)."""
    create_bridge(name)
    add_address(name, ipaddress.IPv4Interface(address))
    set_up("lo")


def veth(name: str, peer: str, peer_netns: str | None = None) -> None:
    """A veth pair `name`—`peer`, the peer moved into namespace `peer_netns` if given."""
    spec: dict[str, object] = {"ifname": peer}
    if peer_netns:
        spec["net_ns_fd"] = peer_netns
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="veth", peer=spec)
        except NetlinkError as exc:
            raise LinkError(f"cannot create veth {name}: {exc}") from exc


def addresses(name: str) -> list[ipaddress.IPv4Interface]:
    """IPv4 addresses on `name`, in order."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        return [ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in ipr.get_addr(family=socket.AF_INET, index=idx)]


def all_addresses() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """(interface, address) for every IPv4 address in the namespace."""
    with IPRoute() as ipr:
        names = {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()}
        return [(names.get(int(a["index"]), "?"),
                 ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
                for a in ipr.get_addr(family=socket.AF_INET)]


def add_address(name: str, addr: ipaddress.IPv4Interface) -> None:
    """Add `addr` to `name` unless it is there already."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        try:
            ipr.addr("add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST
                raise LinkError(f"cannot add {addr} to {name}: {exc}") from exc


def del_address(name: str, addr: ipaddress.IPv4Interface) -> None:
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        try:
            ipr.addr("del", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != 99:  # EADDRNOTAVAIL: not there
                raise LinkError(f"cannot remove {addr} from {name}: {exc}") from exc


def gateway_routes(name: str) -> list[Route]:
    """IPv4 routes of the main table that leave through `name` via a gateway."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        out = []
        for r in ipr.get_routes(family=socket.AF_INET, table=254, oif=idx):
            gw = r.get_attr("RTA_GATEWAY")
            if gw:
                dst = r.get_attr("RTA_DST")
                out.append(Route(f"{dst}/{r['dst_len']}" if dst else "default", str(gw)))
        return out


def add_route(name: str, route: Route) -> None:
    with IPRoute() as ipr:
        try:
            ipr.route("replace", dst=route.dst if route.dst != "default" else "0.0.0.0/0",
                      gateway=route.gateway, oif=_index(ipr, name))
        except NetlinkError as exc:
            raise LinkError(f"cannot add route {route.dst} via {route.gateway}: {exc}") from exc


def routed_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, destination) of every non-default IPv4 route in the main table."""
    with IPRoute() as ipr:
        names = {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()}
        out = []
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            dst = r.get_attr("RTA_DST")
            if dst and r["dst_len"]:
                out.append((names.get(int(r.get_attr("RTA_OIF") or 0), "?"),
                            ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False)))
        return out


def enable_forwarding() -> None:
    """Route IPv4 between interfaces (needed by NAT networks); per network namespace."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
