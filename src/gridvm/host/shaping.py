"""Bandwidth limits on a domain's host-side interface (the xm vif `rate=`), via pyroute2.

Both directions are shaped with htb, whose bucket is Xen's credit window
(`rate.bytes_per_interval`):

- to the guest: traffic leaving the host-side interface goes through its root
  htb qdisc `1:` and class `1:1`;
- from the guest: traffic entering the host-side interface is redirected by an
  ingress u32 filter to a companion ifb device (`gvr<hash>`, alias
  "gridvm ingress of <ifname>") carrying the same htb. An ifb queues where a
  policer would drop, and works on kernels built without `act_police`.

gridvm owns the root and ingress qdiscs of the interfaces it shapes. The calls
block (netlink round trips): run them in a worker thread from asyncio code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg.common import time2tick
from pyroute2.protocols import ETH_P_ALL

from gridvm.errors import NotFound, ResourceError
from gridvm.host.rates import Rate

__all__ = ["get_rate", "ifb_name", "remove_orphans", "set_rate"]

_ROOT = 0x10000  # qdisc 1:
_CLASS = 0x10001  # class 1:1, the default class
_INGRESS = 0xFFFF0000  # qdisc ffff:
_FILTER = 0x80000800  # u32 filter 800::800
_PRIO = 1
_QUANTUM = 65536
_IFB_PREFIX = "gvr"
_IFB_ALIAS = "gridvm ingress of "
_IFB_QLEN = 1000


def ifb_name(ifname: str) -> str:
    """Name of the ifb device that shapes traffic entering `ifname`."""
    return _IFB_PREFIX + hashlib.sha256(ifname.encode()).hexdigest()[:12]


def set_rate(ifname: str, rate: Rate | None, *, netns: str | None = None) -> None:
    """Limit both directions of `ifname` to `rate`; None removes the limit (idempotent)."""
    where = _where(ifname, netns)
    with _rtnl(netns, f"set the rate of {where}") as ipr:
        index = _lookup(ipr, ifname)
        if rate is None:
            if index is not None:
                _unshape(ipr, index)
            _delete_ifb(ipr, ifname)
            return
        if index is None:
            raise NotFound(f"no network interface {where}")
        try:
            _shape(ipr, index, rate)
            ifb = _ensure_ifb(ipr, ifname)
            _shape(ipr, ifb, rate)
            _redirect_ingress(ipr, index, ifb)
        except NetlinkError:
            with suppress(NetlinkError):
                _unshape(ipr, index)
            with suppress(NetlinkError):
                _delete_ifb(ipr, ifname)
            raise


def get_rate(ifname: str, *, netns: str | None = None) -> Rate | None:
    """The limit set on `ifname` by set_rate (read back from the kernel), or None."""
    where = _where(ifname, netns)
    with _rtnl(netns, f"read the rate of {where}") as ipr:
        index = _lookup(ipr, ifname)
        if index is None:
            raise NotFound(f"no network interface {where}")
        if not _has_root_htb(ipr, index):
            return None
        for cls in ipr.get_classes(index):
            if cls.get("kind") == "htb" and cls["handle"] == _CLASS:
                parms = cls.get_nested("TCA_OPTIONS", "TCA_HTB_PARMS")
                rate64 = cls.get_nested("TCA_OPTIONS", "TCA_HTB_RATE64")
                interval_us = max(1, round(parms["buffer"] / time2tick(1)))
                return Rate(int(rate64 or parms["rate"]), interval_us)
        return None


def remove_orphans(*, netns: str | None = None) -> list[str]:
    """Delete ifb devices whose shaped interface no longer exists; return their names."""
    removed: list[str] = []
    with _rtnl(netns, "remove orphaned ifb devices") as ipr:
        for link in ipr.get_links():
            name = link.get("ifname") or ""
            alias = link.get("ifalias") or ""
            if not name.startswith(_IFB_PREFIX) or not alias.startswith(_IFB_ALIAS):
                continue
            owner = alias[len(_IFB_ALIAS) :]
            if _lookup(ipr, owner) is None:
                ipr.link("del", index=link["index"])
                removed.append(name)
    return removed


@contextmanager
def _rtnl(netns: str | None, what: str) -> Iterator[Any]:
    """An rtnetlink socket in `netns`; netlink failures become one-line ResourceErrors."""
    try:
        ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    except OSError as exc:
        raise NotFound(f"no network namespace {netns!r}") from exc
    try:
        yield ipr
    except NetlinkError as exc:
        raise ResourceError(f"cannot {what}: {exc.args[-1]}") from exc
    finally:
        ipr.close()


def _where(ifname: str, netns: str | None) -> str:
    return f"{ifname!r} in netns {netns!r}" if netns else repr(ifname)


def _lookup(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _has_root_htb(ipr: Any, index: int) -> bool:
    return any(q.get("kind") == "htb" and q["handle"] == _ROOT for q in ipr.get_qdiscs(index))


def _shape(ipr: Any, index: int, rate: Rate) -> None:
    """Root htb on `index` sending at most `rate`, bucket = one credit interval."""
    bps = rate.bytes_per_sec
    burst = bps * rate.interval_us / 1_000_000
    if not _has_root_htb(ipr, index):
        ipr.tc("replace", "htb", index, _ROOT, default=_CLASS & 0xFFFF)
    ipr.tc(
        "replace-class",
        "htb",
        index,
        _CLASS,
        parent=_ROOT,
        rate=bps,
        ceil=bps,
        burst=burst,
        cburst=burst,
        quantum=_QUANTUM,
    )


def _redirect_ingress(ipr: Any, index: int, ifb: int) -> None:
    """Send everything entering `index` through the egress of `ifb`."""
    if not any(q.get("kind") == "ingress" for q in ipr.get_qdiscs(index)):
        ipr.tc("add", "ingress", index)
    ipr.tc(
        "replace-filter",
        "u32",
        index,
        parent=_INGRESS,
        prio=_PRIO,
        handle=_FILTER,
        protocol=ETH_P_ALL,
        target=1,
        keys=["0x0/0x0+0"],
        action=[dict(kind="mirred", direction="egress", action="redirect", ifindex=ifb)],
    )


def _unshape(ipr: Any, index: int) -> None:
    """Remove gridvm's root htb and the ingress qdisc (with its filter) from `index`."""
    for qdisc in ipr.get_qdiscs(index):
        if qdisc.get("kind") == "ingress":
            ipr.tc("del", "ingress", index, _INGRESS)
        elif qdisc.get("kind") == "htb" and qdisc["handle"] == _ROOT:
            ipr.tc("del", index=index, root=True)


def _ensure_ifb(ipr: Any, ifname: str) -> int:
    name = ifb_name(ifname)
    index = _lookup(ipr, name)
    if index is None:
        ipr.link("add", ifname=name, kind="ifb", txqlen=_IFB_QLEN)
        index = _lookup(ipr, name)
        if index is None:
            raise ResourceError(f"ifb device {name} vanished after creation")
    ipr.link("set", index=index, state="up", ifalias=_IFB_ALIAS + ifname)
    return index


def _delete_ifb(ipr: Any, ifname: str) -> None:
    index = _lookup(ipr, ifb_name(ifname))
    if index is not None:
        ipr.link("del", index=index)
