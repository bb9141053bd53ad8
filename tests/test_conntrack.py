"""conntrack.forget on a real DNAT in a private namespace: a client whose SYN was sent to a
dead backend reaches a live one on its retransmission once the entry is forgotten."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from gridvm.host import netns
from gridvm.lb import conntrack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

VIP, LIVE, DEAD, PORT = "127.0.0.9", "127.0.0.2", "127.0.0.3", 9


def nft(ns: str, script: str) -> None:
    subprocess.run([*netns.exec_prefix(ns), "nft", "-f", "-"], input=script, text=True,
                   check=True)


def balance(ns: str, *backends: str) -> None:
    """DNAT VIP:PORT round-robin over `backends` (the table replaced in one go)."""
    elems = ", ".join(f"{i} : {ip}" for i, ip in enumerate(backends))
    nft(ns, "table ip cttest\ndelete table ip cttest\ntable ip cttest {\n"
            " chain out { type nat hook output priority -100;\n"
            f"  ip daddr {VIP} tcp dport {PORT} dnat to numgen inc mod {len(backends)} "
            f"map {{ {elems} }}\n }}\n"
            # the dead backend: its SYNs vanish, as behind a host that lost power
            f" chain dead {{ type filter hook input priority 0;\n"
            f"  ip daddr {DEAD} tcp dport {PORT} drop\n }}\n}}\n")


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"ct-{uuid.uuid4().hex[:6]}"
    netns.create(name)
    try:
        subprocess.run([*netns.exec_prefix(name), "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        netns.remove(name)


def test_forgetting_a_dead_backend_lets_the_retried_syn_reach_a_live_one(ns: str) -> None:
    server = netns.call_in(ns, lambda: socket.create_server((LIVE, PORT)))
    balance(ns, DEAD)
    result: dict[str, object] = {}

    def client() -> None:
        t0 = time.monotonic()
        try:
            s = netns.call_in(ns, lambda: socket.create_connection((VIP, PORT), timeout=5))
            result["peer"], result["after"] = s.getpeername()[0], time.monotonic() - t0
            s.close()
        except OSError as exc:
            result["error"] = exc

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.3)                           # the first SYN went to the dead backend
    counts = netns.call_in(ns, lambda: conntrack.counts(VIP, PORT))
    assert counts == {(DEAD, PORT): (0, 1)}   # one connection, not established
    balance(ns, LIVE)                         # the dead backend leaves rotation...
    gone = netns.call_in(ns, lambda: conntrack.forget(VIP, PORT, {(DEAD, PORT)}))
    assert gone == 1                          # ...and its entry is forgotten
    t.join(timeout=10)
    server.close()
    assert "error" not in result, result
    assert result["peer"] == VIP              # the client sees the VIP, served by LIVE
    print(f"connected through the live backend {result['after']:.2f}s after the first SYN")


def test_forget_leaves_other_backends_entries(ns: str) -> None:
    servers = [netns.call_in(ns, lambda ip=ip: socket.create_server((ip, PORT)))
               for ip in (LIVE, "127.0.0.4")]
    balance(ns, LIVE, "127.0.0.4")
    conns = [netns.call_in(ns, lambda: socket.create_connection((VIP, PORT), timeout=5))
             for _ in range(2)]
    try:
        before = netns.call_in(ns, lambda: conntrack.counts(VIP, PORT))
        assert before == {(LIVE, PORT): (1, 0), ("127.0.0.4", PORT): (1, 0)}
        assert netns.call_in(ns, lambda: conntrack.forget(VIP, PORT, {("127.0.0.4", PORT)})) == 1
        assert netns.call_in(ns, lambda: conntrack.counts(VIP, PORT)) == {(LIVE, PORT): (1, 0)}
        assert netns.call_in(ns, lambda: conntrack.forget(VIP, PORT, set())) == 0
    finally:
        for s in conns + servers:
            s.close()
