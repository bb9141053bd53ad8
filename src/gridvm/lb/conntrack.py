"""This network namespace's conntrack table: connections per backend, and forgetting a
failed backend's entries."""

from __future__ import annotations

import contextlib
import socket
from collections import Counter
from pathlib import Path

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

# The calling thread's namespace (gridvmd's threads all live in its host's namespace).
CONNTRACK = Path("/proc/thread-self/net/nf_conntrack")


def _fields(line: str) -> tuple[str, dict[str, list[str]]]:
    words = line.split()
    state = words[5] if len(words) > 5 and "=" not in words[5] else ""
    kv: dict[str, list[str]] = {}
    for w in words:
        k, sep, v = w.partition("=")
        if sep:
            kv.setdefault(k, []).append(v)
    return state, kv


def counts(vip: str, port: int, text: str | None = None) -> dict[tuple[str, int], tuple[int, int]]:
    """{(backend ip, port): (active, inactive)} for TCP connections made to vip:port.

    Like ipvsadm: active = ESTABLISHED, inactive = every other state (SYN_SENT, TIME_WAIT…).
    """
    if text is None:
        try:
            text = CONNTRACK.read_text()
        except OSError:
            return {}
    active: Counter[tuple[str, int]] = Counter()
    inactive: Counter[tuple[str, int]] = Counter()
    for line in text.splitlines():
        if " tcp " not in line:
            continue
        state, kv = _fields(line)
        src, dst = kv.get("src", []), kv.get("dst", [])
        sport, dport = kv.get("sport", []), kv.get("dport", [])
        if len(src) < 2 or len(sport) < 2 or dst[0] != vip or dport[0] != str(port):
            continue
        key = (src[1], int(sport[1]))      # the reply comes from the real server
        (active if state == "ESTABLISHED" else inactive)[key] += 1
    return {k: (active[k], inactive[k]) for k in set(active) | set(inactive)}


def forget(vip: str, port: int, backends: set[tuple[str, int]]) -> int:
    """Delete the TCP conntrack entries of vip:port that were sent to one of `backends`.

    For backends that just failed: a client's retransmitted SYN (or next segment) then goes
    through the DNAT map again instead of following its entry to a dead server. Never for
    a drained backend, whose open connections must finish. The number deleted."""
    if not backends:
        return 0
    gone = 0
    try:
        with Conntrack() as ct:
            want = NFCTAttrTuple(proto=socket.IPPROTO_TCP, daddr=vip, dport=port)
            for entry in list(ct.dump_entries(tuple_orig=want)):
                reply = entry.tuple_reply
                if (reply.saddr, reply.sport) in backends:
                    with contextlib.suppress(NetlinkError):   # it may have just gone
                        ct.delete(entry)
                        gone += 1
    except NetlinkError as exc:
        raise OSError(exc.code, f"conntrack: {exc}") from exc
    return gone
