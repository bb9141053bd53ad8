"""The director: virtual services as nftables DNAT maps in this host's `gridvm_lb_<tag>` table.

    map vips      VIP . port : jump svc_NAME       (prerouting and output look it up)
    set vipaddrs  every VIP address                (postrouting SNATs what was DNAT'd to one
                                                    to that VIP: replies come back to the VIP,
                                                    wherever it lives — see lb.ctsync)
    map svc_NAME  slot : backend-ip . port         (intervals; see `model.slots`)
    chain svc_NAME   dnat ip to <selector> mod TOTAL map @svc_NAME

The selector is `numgen inc` (rr, wrr), `numgen random` (random) or `jhash ip saddr` (sh).
A change to one service (a backend fails, recovers, is drained or re-weighted) is one `nft -f`
transaction that rewrites its chain and map and touches nothing else; connections already
NATed live on in conntrack, so they finish on their backend. All scripts go through
`gridvm.host.nft`, gridvm's one nft writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gridvm.host import netdevs, nft
from gridvm.lb.model import Scheduler, Target, slots

FAMILY = "inet"
SELECTORS: dict[Scheduler, str] = {
    "rr": "numgen inc", "wrr": "numgen inc", "random": "numgen random",
    "sh": "jhash ip saddr",
}


BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def prepare_host() -> None:
    """Let this namespace forward DNAT'd connections (blocking; per network namespace).

    Routing on, and br_netfilter's IPv4 hooks off: with them on, a connection DNAT'd to a
    backend behind the bridge port the client came in on (a guest on another host of the
    LAN) is *bridged* back out of that same port, which a bridge refuses, and is lost.
    Routed traffic still passes every nft hook; only frames bridged within one bridge skip
    them.
    """
    netdevs.enable_forwarding()
    if BRIDGE_NF.exists() and BRIDGE_NF.read_text().strip() != "0":
        BRIDGE_NF.write_text("0\n")


def table_name(tag: str) -> str:
    return f"gridvm_lb_{tag}"


def chain_name(service: str) -> str:
    """nft identifiers take no '-': service names take no '_', so this cannot collide."""
    return "svc_" + service.replace("-", "_")


@dataclass(frozen=True)
class Programmed:
    """What the kernel should do for one service: its VIP and where new connections go."""

    name: str
    vip: str
    port: int
    scheduler: Scheduler
    targets: tuple[Target, ...]


def _elements(items: list[str]) -> str:
    return f" elements = {{ {', '.join(items)} }};" if items else ""


def _base(vips: list[str], addrs: list[str]) -> str:
    return f"""\
  map vips {{ typeof ip daddr . tcp dport : verdict;{_elements(vips)} }}
  set vipaddrs {{ typeof ip daddr;{_elements(addrs)} }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr . tcp dport vmap @vips
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr . tcp dport vmap @vips
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat ct original ip daddr @vipaddrs snat ip to ct original ip daddr
  }}
"""


def _rule(p: Programmed) -> tuple[str, str]:
    """(map elements, the chain's rule) for a service; empty when no backend may take it."""
    runs = slots(list(p.targets), p.scheduler)
    if not runs:
        return "", ""
    total = runs[-1][1] + 1
    elems = ", ".join(f"{a if a == b else f'{a}-{b}'} : {t.ip} . {t.port}" for a, b, t in runs)
    seed = " seed 0x6776" if p.scheduler == "sh" else ""
    return elems, (f"meta l4proto tcp dnat ip to {SELECTORS[p.scheduler]} mod {total}{seed} "
                   f"map @{chain_name(p.name)}")


def full_table(services: list[Programmed]) -> str:
    """The body of the whole table (used to rebuild it when gridvmd starts)."""
    body = ""
    for p in services:
        c = chain_name(p.name)
        elems, rule = _rule(p)
        body += (f"  map {c} {{ typeof numgen inc mod 1 : ip daddr . tcp dport; "
                 f"flags interval;{_elements([elems] if elems else [])} }}\n")
        body += f"  chain {c} {{\n" + (f"    {rule}\n" if rule else "") + "  }\n"
    vips = [f"{p.vip} . {p.port} : jump {chain_name(p.name)}" for p in services]
    return body + _base(vips, sorted({p.vip for p in services}))


def update_script(table: str, p: Programmed, *, new: bool) -> str:
    """One transaction that (re)programs service `p`; `new` also hooks its VIP in."""
    c = chain_name(p.name)
    t = f"{FAMILY} {table}"
    elems, rule = _rule(p)
    lines = [f"add map {t} {c} {{ typeof numgen inc mod 1 : ip daddr . tcp dport; "
             "flags interval; }",
             f"add chain {t} {c}",
             f"flush chain {t} {c}",
             f"flush map {t} {c}"]
    if elems:
        lines.append(f"add element {t} {c} {{ {elems} }}")
    if rule:
        lines.append(f"add rule {t} {c} {rule}")
    if new:
        lines += [f"add element {t} vipaddrs {{ {p.vip} }}",
                  f"add element {t} vips {{ {p.vip} . {p.port} : jump {c} }}"]
    return "\n".join(lines) + "\n"


def delete_script(table: str, p: Programmed, *, last_on_address: bool) -> str:
    """One transaction that removes every element, rule, map and chain of service `p`."""
    c = chain_name(p.name)
    t = f"{FAMILY} {table}"
    lines = [f"delete element {t} vips {{ {p.vip} . {p.port} }}",
             f"flush chain {t} {c}", f"delete chain {t} {c}", f"delete map {t} {c}"]
    if last_on_address:
        lines.append(f"delete element {t} vipaddrs {{ {p.vip} }}")
    return "\n".join(lines) + "\n"


class Director:
    """Programs this host's services into its own nft table (blocking: call in a thread)."""

    def __init__(self, tag: str) -> None:
        self.table = table_name(tag)

    def rebuild(self, services: list[Programmed]) -> None:
        """Make the table exactly `services` (or remove it when there are none)."""
        if services:
            nft.replace_table(self.table, full_table(services), FAMILY)
        else:
            nft.delete_table(self.table, FAMILY)

    def program(self, p: Programmed, *, new: bool = False) -> None:
        if new and nft.list_table(self.table, FAMILY) is None:
            nft.replace_table(self.table, _base([], []), FAMILY)
        nft.apply(update_script(self.table, p, new=new))

    def remove(self, p: Programmed, *, remaining: list[Programmed]) -> None:
        """Remove one service; the table goes with the last one."""
        if not remaining:
            nft.delete_table(self.table, FAMILY)
            return
        nft.apply(delete_script(self.table, p,
                                last_on_address=all(r.vip != p.vip for r in remaining)))

    def listing(self) -> str | None:
        return nft.list_table(self.table, FAMILY)
