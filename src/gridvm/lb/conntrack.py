"""Connection counts per backend, read from this network namespace's conntrack table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

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
