"""The one nftables writer: gridvm's own tables, replaced atomically with `nft -f -`.

gridvm never reads, edits or flushes a table it did not name: every table it writes is
called `gridvm_*`, and a table is always replaced whole in one transaction (declare, delete,
re-create), so a ruleset is never seen half-written and stale rules cannot survive.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

from gridvm.errors import GridvmError
from gridvm.host import procs

PREFIX = "gridvm_"


class NftError(GridvmError):
    """nft rejected a ruleset or could not run."""


def _check(table: str) -> None:
    if not table.startswith(PREFIX) or not table.replace("_", "").isalnum():
        raise NftError(f"refusing to touch nft table {table!r}: not one of gridvm's")


def apply(script: str) -> None:
    """Run `script` as one atomic nft transaction."""
    try:
        procs.run(["nft", "-f", "-"], input=script.encode(), timeout=30)
    except procs.CommandError as exc:
        raise NftError(str(exc)) from exc


def replace_table(table: str, body: str, family: str = "inet") -> None:
    """Make table `family table` contain exactly `body` (chains, sets, maps)."""
    _check(table)
    apply(f"table {family} {table} {{}}\ndelete table {family} {table}\n"
          f"table {family} {table} {{\n{body}}}\n")


def delete_table(table: str, family: str = "inet") -> None:
    """Remove the table if it exists (idempotent)."""
    _check(table)
    apply(f"table {family} {table} {{}}\ndelete table {family} {table}\n")


def tables(family: str = "inet") -> list[str]:
    """Names of gridvm's tables of `family` in this network namespace."""
    out = procs.run(["nft", "-j", "list", "tables", family], timeout=30).stdout
    items = json.loads(out or b"{}").get("nftables", [])
    return [t["table"]["name"] for t in items
            if "table" in t and str(t["table"]["name"]).startswith(PREFIX)]


def list_table(table: str, family: str = "inet") -> str | None:
    """The table as nft prints it, or None if it does not exist."""
    _check(table)
    proc = procs.run(["nft", "list", "table", family, table], check=False, timeout=30)
    return proc.stdout.decode() if proc.returncode == 0 else None


# ----- the rules of gridvm networks ------------------------------------------------------------


@dataclass(frozen=True)
class NatNet:
    """A NAT network: its bridge and private subnet (the gateway is on the bridge)."""

    bridge: str
    subnet: ipaddress.IPv4Network


@dataclass(frozen=True)
class PortForward:
    """Host port → domain address:port on a NAT network's bridge."""

    proto: str
    host_port: int
    bridge: str
    dest: ipaddress.IPv4Address
    port: int


def _q(name: str) -> str:
    return json.dumps(name)  # a quoted nft string


def network_rules(nats: Sequence[NatNet], forwards: Sequence[PortForward]) -> str:
    """The body of a host's network table.

    - A NAT network accepts routed traffic only for connections it started and for port
      forwards (DNAT); everything else routed towards it is dropped, including traffic from
      other gridvm networks. Traffic inside its own bridge is accepted (br_netfilter).
    - Its guests may only use their own subnet as source, and are masqueraded on the way out.
    - Forwards answer on every local address except loopback, from outside and from the host.
    """
    fwd = ["chain forward {", "type filter hook forward priority filter; policy accept;"]
    post = ["chain postrouting {", "type nat hook postrouting priority srcnat; policy accept;"]
    for n in nats:
        b, s = _q(n.bridge), n.subnet.with_prefixlen
        fwd += [f"iifname {b} oifname {b} accept",
                f"iifname {b} ip saddr != {s} drop",
                f"oifname {b} ct state established,related accept",
                f"oifname {b} ct status dnat accept",
                f"oifname {b} drop"]
        post.append(f"ip saddr {s} ip daddr != {{ {s}, 224.0.0.0/4, 255.255.255.255 }} "
                    f"oifname != {b} masquerade")
    pre = ["chain prerouting {", "type nat hook prerouting priority dstnat; policy accept;"]
    out = ["chain output {", "type nat hook output priority -100; policy accept;"]
    for f in forwards:
        rule = (f"ip daddr != 127.0.0.0/8 fib daddr type local {f.proto} dport {f.host_port} "
                f"dnat ip to {f.dest}:{f.port}")
        pre.append(f"iifname != {_q(f.bridge)} {rule}")
        out.append(rule)
    body = ""
    for chain in (fwd, post, pre, out):
        body += "\n".join([chain[0], *("  " + r for r in chain[1:]), "}"]) + "\n"
    return body
