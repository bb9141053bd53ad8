"""Traffic shaping on a real veth pair between two network namespaces."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pyroute2 import IPRoute, netns

from gridvm.errors import NotFound
from gridvm.host.rates import Rate, parse_rate
from gridvm.host.shaping import get_rate, ifb_name, remove_orphans, set_rate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

HOST_IP, GUEST_IP = "10.99.0.1", "10.99.0.2"
PORT = 5201

# Runs inside a namespace: "recv" prints bytes/s measured over a window after a warm-up;
# "send" writes as fast as it can until the receiver hangs up (or 30 s pass).
_TOOL = r"""
import socket, sys, time
from pyroute2 import netns
mode, ns, addr, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
netns.setns(ns, flags=0)
if mode == "recv":
    warmup, window = float(sys.argv[5]), float(sys.argv[6])
    srv = socket.create_server((addr, port))
    srv.settimeout(20)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(20)
    start = time.monotonic()
    t0, counted = None, 0
    while True:
        data = conn.recv(1 << 16)
        now = time.monotonic()
        if not data:
            break
        if t0 is not None:
            counted += len(data)
            if now - t0 >= window:
                break
        elif now - start >= warmup:
            t0 = now
    print(counted / (now - t0), flush=True)
else:
    sock = socket.create_connection((addr, port), timeout=10)
    payload = b"x" * (1 << 16)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            sock.sendall(payload)
    except OSError:
        pass
"""


@dataclass
class Pair:
    host_ns: str
    guest_ns: str
    host_if: str
    guest_if: str


@pytest.fixture
def pair() -> Iterator[Pair]:
    """Two namespaces joined by a veth: host side `<tag>h` in host_ns, peer in guest_ns."""
    tag = "gvt" + uuid.uuid4().hex[:8]
    p = Pair(f"{tag}-h", f"{tag}-g", f"{tag}h", f"{tag}g")
    netns.create(p.host_ns)
    try:
        netns.create(p.guest_ns)
        with IPRoute(netns=p.host_ns, flags=0) as ipr:
            ipr.link("add", ifname=p.host_if, kind="veth", peer={"ifname": p.guest_if})
            peer = ipr.link_lookup(ifname=p.guest_if)[0]
            ipr.link("set", index=peer, net_ns_fd=p.guest_ns)
            _up(ipr, p.host_if, HOST_IP)
        with IPRoute(netns=p.guest_ns, flags=0) as ipr:
            _up(ipr, p.guest_if, GUEST_IP)
        yield p
    finally:
        for ns in (p.host_ns, p.guest_ns):
            if ns in netns.listnetns():
                netns.remove(ns)


def _up(ipr: IPRoute, ifname: str, address: str) -> None:
    index = ipr.link_lookup(ifname=ifname)[0]
    ipr.addr("add", index=index, address=address, prefixlen=30)
    ipr.link("set", index=index, state="up")
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def throughput(src_ns: str, dst_ns: str, dst_ip: str) -> float:
    """Bytes/s of one TCP stream from src_ns to dst_ns, measured by the receiver."""
    tool = [sys.executable, "-c", _TOOL]
    recv = subprocess.Popen(
        [*tool, "recv", dst_ns, dst_ip, str(PORT), "0.5", "2.0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    send = None
    try:
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        send = subprocess.Popen([*tool, "send", src_ns, dst_ip, str(PORT)])
        out, _ = recv.communicate(timeout=40)
        return float(out.strip())
    finally:
        for proc in (recv, send):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(timeout=10)


def _qdisc_kinds(ns: str, ifname: str) -> set[str]:
    with IPRoute(netns=ns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return {q.get("kind") for q in ipr.get_qdiscs(index)}


def _link_exists(ns: str, ifname: str) -> bool:
    with IPRoute(netns=ns, flags=0) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def test_rate_limits_both_directions(pair: Pair) -> None:
    """8Mb/s on the host-side veth: both directions near 1 MB/s and far below unlimited."""
    free_to = throughput(pair.host_ns, pair.guest_ns, GUEST_IP)
    free_from = throughput(pair.guest_ns, pair.host_ns, HOST_IP)

    rate = parse_rate("8Mb/s")
    set_rate(pair.host_if, rate, netns=pair.host_ns)
    to_guest = throughput(pair.host_ns, pair.guest_ns, GUEST_IP)
    from_guest = throughput(pair.guest_ns, pair.host_ns, HOST_IP)
    print(
        f"\nunlimited: to guest {free_to * 8 / 1e6:.1f} Mb/s, from guest"
        f" {free_from * 8 / 1e6:.1f} Mb/s; limit 8Mb/s: to guest {to_guest * 8 / 1e6:.2f} Mb/s,"
        f" from guest {from_guest * 8 / 1e6:.2f} Mb/s"
    )
    for measured in (to_guest, from_guest):
        assert 0.65 * rate.bytes_per_sec <= measured <= 1.35 * rate.bytes_per_sec
    assert to_guest < free_to / 4
    assert from_guest < free_from / 4

    set_rate(pair.host_if, None, netns=pair.host_ns)
    assert throughput(pair.guest_ns, pair.host_ns, HOST_IP) > 4 * rate.bytes_per_sec


def test_set_get_replace_and_remove(pair: Pair) -> None:
    ns, ifname = pair.host_ns, pair.host_if
    assert get_rate(ifname, netns=ns) is None

    for text in ("8Mb/s", "1MB/s@20ms", "100Kb/s@1s", "5GB/s", "250000b/s@300us"):
        rate = parse_rate(text)
        set_rate(ifname, rate, netns=ns)
        set_rate(ifname, rate, netns=ns)  # idempotent
        assert get_rate(ifname, netns=ns) == rate, text
        assert {"htb", "ingress"} <= _qdisc_kinds(ns, ifname)
        assert _link_exists(ns, ifb_name(ifname))

    set_rate(ifname, None, netns=ns)
    assert get_rate(ifname, netns=ns) is None
    assert not {"htb", "ingress"} & _qdisc_kinds(ns, ifname)
    assert not _link_exists(ns, ifb_name(ifname))
    set_rate(ifname, None, netns=ns)  # idempotent


def test_errors(pair: Pair) -> None:
    with pytest.raises(NotFound, match="no network interface 'gvtnope'"):
        set_rate("gvtnope", Rate(1000), netns=pair.host_ns)
    with pytest.raises(NotFound, match="no network interface"):
        get_rate("gvtnope", netns=pair.host_ns)
    with pytest.raises(NotFound, match="no network namespace"):
        set_rate(pair.host_if, Rate(1000), netns=pair.host_ns + "-missing")
    assert pair.host_ns + "-missing" not in netns.listnetns()
    set_rate("gvtnope", None, netns=pair.host_ns)  # removing nothing is fine


def test_orphaned_ifb_is_removed(pair: Pair) -> None:
    set_rate(pair.host_if, Rate(125_000), netns=pair.host_ns)
    with IPRoute(netns=pair.host_ns, flags=0) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=pair.host_if)[0])
    assert remove_orphans(netns=pair.host_ns) == [ifb_name(pair.host_if)]
    assert not _link_exists(pair.host_ns, ifb_name(pair.host_if))
    assert remove_orphans(netns=pair.host_ns) == []
