"""Directors' adverts on a real veth LAN between two namespaces: peers hear each other, a
killed peer is reported silent once after the dead interval, other clusters are ignored."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from gridvm.host import netns
from gridvm.lb.adverts import Adverts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

# Runs inside a namespace: advertise as HOST of CLUSTER on IFNAME, print what is heard.
_PEER = r"""
import sys, time
from gridvm.lb.adverts import Adverts
host, cluster, ifname = sys.argv[1:4]
a = Adverts(host, cluster, on_silent=lambda h: print("silent", h, flush=True))
a.interfaces({ifname})
a.start()
seen = set()
while True:
    for h in ("a", "b", "x"):
        if h not in seen and a.heard(h) is not None:
            seen.add(h)
            print("heard", h, flush=True)
    time.sleep(0.02)
"""


class Peer:
    def __init__(self, ns: str, host: str, cluster: str, ifname: str) -> None:
        self.proc = subprocess.Popen(
            [*netns.exec_prefix(ns), sys.executable, "-c", _PEER, host, cluster, ifname],
            stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.strip()))

    def expect(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            t, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line == text:
                return t

    def rest(self) -> list[str]:
        out = []
        while not self.lines.empty():
            out.append(self.lines.get()[1])
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def lan() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    a, b = f"adv-{tag}-a", f"adv-{tag}-b"
    for ns in (a, b):
        netns.create(ns)
    try:
        for ns in (a, b):
            subprocess.run([*netns.exec_prefix(ns), "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*netns.exec_prefix(a), "ip", "link", "add", "lan0", "type", "veth",
                        "peer", "name", "lan0", "netns", b], check=True)
        for ns, ip in ((a, "10.98.0.1/24"), (b, "10.98.0.2/24")):
            subprocess.run([*netns.exec_prefix(ns), "ip", "addr", "add", ip, "dev", "lan0"],
                           check=True)
            subprocess.run([*netns.exec_prefix(ns), "ip", "link", "set", "lan0", "up"],
                           check=True)
        yield a, b
    finally:
        for ns in (a, b):
            netns.remove(ns)


def test_a_killed_peer_is_reported_silent_once_and_other_clusters_are_ignored(
        lan: tuple[str, str]) -> None:
    ns_a, ns_b = lan
    a = Peer(ns_a, "a", "c1", "lan0")
    b = Peer(ns_b, "b", "c1", "lan0")
    x = Peer(ns_b, "x", "c2", "lan0")         # same LAN, another cluster
    try:
        a.expect("heard b", 5)
        b.expect("heard a", 5)
        time.sleep(1.0)                       # a keeps hearing b: nothing is reported
        t_kill = time.monotonic()
        b.kill()
        t_silent = a.expect("silent b", 5)
        print(f"b reported silent {t_silent - t_kill:.2f}s after it was killed")
        assert 0.4 <= t_silent - t_kill < 2.0
        time.sleep(1.0)
        assert a.rest() == []                 # once, and never a word about x
    finally:
        for p in (a, b, x):
            p.kill()


def test_silence_counts_only_for_a_host_heard_after_the_given_moment() -> None:
    adv = Adverts("a", "c1", on_silent=lambda h: None, port=0)   # no thread, no interfaces
    try:
        now = time.monotonic()
        adv._heard.update({"b": now - 1.0, "c": now - 0.1, "d": now - 10.0})
        assert adv.silent("b") and not adv.silent("c") and adv.silent("d")
        assert not adv.silent("b", heard_after=now - 0.5)    # not heard since: no verdict
        assert not adv.silent("never")
        assert adv.silent_hosts(heard_within=2.5) == {"b"}  # d has been silent too long
    finally:
        adv.stop()
