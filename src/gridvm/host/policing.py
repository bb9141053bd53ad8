"""Packet-rate policing of what a guest sends (the vif `pps=` key): a bridge-family nftables
table per host-side interface that drops what a guest sends beyond N packets per second.

A byte rate (`rate=`, shaping.py) does not bound a flood of small packets, and every packet
costs the receiving guest an interrupt (under TCG, emulated work). tc policing would do, but
`act_police` and `cls_matchall` are not built on every kernel (this one has neither); the
nftables `limit` statement in the bridge family is, and drops before the bridge forwards
the frame to another port (hook forward) or hands it to the host (hook input).

Each table is `gridvm_pps_<hash of the interface name>` with the interface name in its
comment, replaced whole in one transaction (nft.py). Blocking: run in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

from gridvm.errors import ConfigError
from gridvm.host import nft, procs

__all__ = ["MAX_PPS", "get_pps", "remove_orphans", "set_pps", "table_name"]

FAMILY = "bridge"
MAX_PPS = 10_000_000
_PREFIX = "gridvm_pps_"
_COMMENT = "gridvm pps of "


def table_name(ifname: str) -> str:
    return _PREFIX + hashlib.sha256(ifname.encode()).hexdigest()[:12]


def set_pps(ifname: str, pps: int | None) -> None:
    """Drop packets from `ifname` beyond `pps` per second (burst: 1/10 s); None removes."""
    table = table_name(ifname)
    if pps is None:
        nft.delete_table(table, FAMILY)
        return
    if isinstance(pps, bool) or not 1 <= pps <= MAX_PPS:
        raise ConfigError(f"invalid pps {pps!r}: packets per second, 1..{MAX_PPS}")
    if not ifname.replace("_", "").replace(".", "").replace("-", "").isalnum():
        raise ConfigError(f"invalid interface name {ifname!r}")
    burst = max(5, pps // 10)
    # One limiter shared by both hooks: a named limit object, so forwarded and local
    # packets draw from the same budget.
    body = (f'  comment "{_COMMENT}{ifname}"\n'
            f"  limit guest {{ rate {pps}/second burst {burst} packets }}\n")
    for chain, hook in (("through", "forward"), ("tohost", "input")):
        body += (f"  chain {chain} {{ type filter hook {hook} priority -10; policy accept;\n"
                 f'    iifname "{ifname}" limit name "guest" accept\n'
                 f'    iifname "{ifname}" drop\n  }}\n')
    nft.replace_table(table, body, FAMILY)


def get_pps(ifname: str) -> int | None:
    """The packet rate set on `ifname` (read back from the kernel), or None."""
    table = table_name(ifname)
    if table not in nft.tables(FAMILY):
        return None
    out = procs.run(["nft", "-j", "list", "table", FAMILY, table], timeout=30).stdout
    for item in json.loads(out).get("nftables", []):
        limit = item.get("limit")
        if limit and limit.get("name") == "guest":
            return int(limit["rate"])
    return None


def remove_orphans() -> list[str]:
    """Delete pps tables whose interface no longer exists; return the interface names."""
    removed: list[str] = []
    for table in nft.tables(FAMILY):
        if not table.startswith(_PREFIX):
            continue
        out = procs.run(["nft", "-j", "list", "table", FAMILY, table], timeout=30).stdout
        owner = _owner(json.loads(out).get("nftables", []))
        if not owner or not _exists(owner):
            nft.delete_table(table, FAMILY)
            removed.append(owner or table)
    return removed


def _exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _owner(items: list[dict[str, Any]]) -> str:
    """The interface a pps table polices: its rules' iifname (JSON omits the comment)."""
    for item in items:
        for expr in item.get("rule", {}).get("expr", []):
            match = expr.get("match", {})
            if match.get("left", {}).get("meta", {}).get("key") == "iifname":
                return str(match.get("right", ""))
    return ""
