"""Network links a domain needs on its host: taps enslaved to bridges (pyroute2)."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gridvm.errors import GridvmError


class LinkError(GridvmError):
    """A bridge or tap could not be made or removed."""


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return _index(ipr, name) is not None


def ensure_bridge(name: str) -> None:
    """Create bridge `name` (up, no address) unless it exists; a non-bridge is an error."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            try:
                ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: made concurrently
                    raise LinkError(f"cannot create bridge {name}: {exc}") from exc
            idx = _index(ipr, name)
            assert idx is not None
        else:
            kind = ipr.get_links(idx)[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            if kind != "bridge":
                raise LinkError(f"{name} exists and is not a bridge (it is {kind or 'a device'})")
        ipr.link("set", index=idx, state="up")


def create_tap(name: str, bridge: str | None, mtu: int | None = None,
               tag: str | None = None, owner: int | None = None) -> None:
    """A persistent tap `name`, up, enslaved to `bridge` (created if missing), carrying
    `tag` as its alias so that its owner can find it again after a crash; with `owner`,
    owned by that uid and gid (an unprivileged QEMU opens it)."""
    if len(name) > 15:
        raise LinkError(f"interface name {name!r} is longer than 15 characters")
    if bridge:
        ensure_bridge(bridge)
    with IPRoute() as ipr:
        try:
            ids = {} if owner is None else {"uid": owner, "gid": owner}
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", **ids)
        except NetlinkError as exc:
            raise LinkError(f"cannot create tap {name}: {exc}") from exc
        idx = _index(ipr, name)
        assert idx is not None
        try:
            if tag:
                ipr.link("set", index=idx, ifalias=tag)
            if bridge:
                br = _index(ipr, bridge)
                ipr.link("set", index=idx, master=br)
            if mtu:
                ipr.link("set", index=idx, mtu=mtu)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            ipr.link("del", index=idx)
            raise LinkError(f"cannot attach tap {name} to {bridge}: {exc}") from exc


def delete_link(name: str, tag: str | None = None) -> None:
    """Remove a link if it exists (idempotent); with `tag`, only if it carries that alias
    (a name we meant to create may belong to someone else)."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return
        if tag is not None and ipr.get_links(idx)[0].get_attr("IFLA_IFALIAS") != tag:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code != 19:  # ENODEV: already gone
                raise LinkError(f"cannot delete {name}: {exc}") from exc


def tagged_links(tag: str) -> list[str]:
    """Names of the links that carry alias `tag`."""
    with IPRoute() as ipr:
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()
                if link.get_attr("IFLA_IFALIAS") == tag]


def link_counters(name: str) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) as the host sees the link; (0, 0) if it is gone."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return (0, 0)
        stats = ipr.get_links(idx)[0].get_attr("IFLA_STATS64") or {}
        return (int(stats.get("rx_bytes", 0)), int(stats.get("tx_bytes", 0)))
