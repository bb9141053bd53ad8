"""Virtual services: the pure parts (slots, grammars, hysteresis, nft scripts, conntrack), then
real guests behind a VIP in a one-host lab, driven with the gridvm CLI from the client."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from netlab import LabEnv, lab_env

from gridvm.errors import ConfigError
from gridvm.host import netns
from gridvm.images.store import ImageInfo
from gridvm.lb import conntrack, director
from gridvm.lb.health import Hysteresis
from gridvm.lb.model import Target, parse_backends, parse_check, parse_vip, slots

# ----- pure logic ---------------------------------------------------------------------------------


def test_slots_rr_wrr_sh_random() -> None:
    a, b, c = Target("10.0.0.1", 80, 3), Target("10.0.0.2", 80, 1), Target("10.0.0.3", 80, 0)

    def expand(runs: list[tuple[int, int, Target]]) -> list[str]:
        return [t.ip[-1] for lo, hi, t in runs for _ in range(lo, hi + 1)]

    assert expand(slots([a, b, c], "rr")) == ["1", "2"]            # weight 0: no new conns
    assert expand(slots([a, b], "wrr")) == ["1", "1", "2", "1"]     # smooth, interleaved
    assert expand(slots([a, b], "sh")) == ["1", "1", "1", "2"]
    assert slots([c], "random") == []
    assert slots([a, b], "wrr")[0][:2] == (0, 1)                     # runs merge


def test_grammars_give_one_line_errors() -> None:
    assert parse_vip("10.1.2.3:80") == ("10.1.2.3", 80)
    assert parse_backends("a,b:8080") == [("a", None), ("b", 8080)]
    assert str(parse_check("http:/health")) == "http:/health"
    for bad, call in (("10.1.2.3", parse_vip), ("127.0.0.1:80", parse_vip),
                      ("10.1.2.3:0", parse_vip), ("a,a", parse_backends),
                      ("a:x", parse_backends), ("http", parse_check),
                      ("http:health", parse_check), ("udp", parse_check)):
        with pytest.raises(ConfigError) as exc:
            call(bad)  # type: ignore[operator]
        assert "\n" not in str(exc.value)


def test_hysteresis_rise_and_fall() -> None:
    h = Hysteresis(rise=2, fall=3)
    assert h.feed(True) and h.up                     # the first result decides
    assert not h.feed(False) and not h.feed(False) and h.up
    assert h.feed(False) and h.up is False           # third failure in a row
    assert not h.feed(True) and h.feed(True) and h.up
    assert h.force_down() and h.up is False and not h.force_down()


def test_director_scripts_add_and_remove_the_same_elements() -> None:
    p = director.Programmed("web-1", "10.0.0.100", 80, "sh",
                            (Target("10.0.0.1", 80, 2), Target("10.0.0.2", 8080, 1)))
    add = director.update_script("gridvm_lb_t", p, new=True)
    assert "dnat ip to jhash ip saddr mod 3" in add
    assert "0-1 : 10.0.0.1 . 80, 2 : 10.0.0.2 . 8080" in add
    assert "vips { 10.0.0.100 . 80 : jump svc_web_1 }" in add
    rm = director.delete_script("gridvm_lb_t", p, last_on_address=True)
    assert "delete element inet gridvm_lb_t vips { 10.0.0.100 . 80 }" in rm
    assert "delete map inet gridvm_lb_t svc_web_1" in rm
    assert "delete element inet gridvm_lb_t vipaddrs { 10.0.0.100 }" in rm


def test_conntrack_counts() -> None:
    text = (
        "ipv4     2 tcp      6 431999 ESTABLISHED src=10.77.0.2 dst=10.77.0.200 sport=5000 "
        "dport=80 src=10.77.0.101 dst=10.77.0.11 sport=80 dport=5000 [ASSURED] mark=0 use=1\n"
        "ipv4     2 tcp      6 119 TIME_WAIT src=10.77.0.2 dst=10.77.0.200 sport=5001 "
        "dport=80 src=10.77.0.101 dst=10.77.0.11 sport=80 dport=5001 [ASSURED] mark=0 use=1\n"
        "ipv4     2 tcp      6 119 TIME_WAIT src=10.77.0.2 dst=10.77.0.201 sport=5001 "
        "dport=80 src=10.77.0.102 dst=10.77.0.11 sport=80 dport=5001 [ASSURED] mark=0 use=1\n"
        "ipv4     2 udp      17 29 src=10.77.0.2 dst=10.77.0.200 sport=53 dport=80 "
        "src=10.77.0.103 dst=10.77.0.2 sport=80 dport=53 mark=0 use=1\n")
    assert conntrack.counts("10.77.0.200", 80, text) == {("10.77.0.101", 80): (1, 1)}


# ----- real guests in a lab -------------------------------------------------------------------

GUESTS = ("g1", "g2", "g3")


@pytest.fixture(scope="module")
def lab(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    with lab_env(tiny_image, tmp_path_factory.mktemp("svclab"), hosts=1) as env:
        for i, name in enumerate(GUESTS, 1):
            boot(env, name, i)
        for i, name in enumerate(GUESTS, 1):
            assert env.wait_http(env.guest_ip(i)) == name
        yield env


def boot(lab: LabEnv, name: str, n: int) -> None:
    lab.create("h1", name, "bridge=xenbr0",
               f'ip = "{lab.guest_ip(n)}"\nnetmask = "255.255.255.0"')


def vip(lab: LabEnv, n: int = 0) -> str:
    return lab.guest_ip(100 + n)


def svc(lab: LabEnv, *args: str) -> str:
    return lab.gridvm("service", *args, host="h1").stdout


def show(lab: LabEnv, name: str) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(svc(lab, "show", name, "--json"))
    return view


def rotation(lab: LabEnv, name: str) -> set[str]:
    return {b["domain"] for b in show(lab, name)["backends"] if b["in_rotation"]}


def hits(lab: LabEnv, address: str, n: int, port: int = 80) -> Counter[str]:
    return Counter(lab.http(address, port=port) for _ in range(n))


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def table(lab: LabEnv) -> str:
    return lab.run_in("h1", "nft", "list", "ruleset")


@pytest.mark.guest
def test_round_robin_weights_source_hash_and_random_distribute_as_configured(
        lab: LabEnv) -> None:
    v = vip(lab)
    svc(lab, "create", "web", "--vip", f"{v}:80", "--backends", "g1,g2,g3",
        "--check", "http:/health", "--interval", "0.5")
    assert hits(lab, v, 30) == {"g1": 10, "g2": 10, "g3": 10}

    svc(lab, "create", "wweb", "--vip", f"{v}:8080", "--backends", "g1:80,g2:80",
        "--scheduler", "wrr", "--weight", "g1=3")
    assert hits(lab, v, 40, port=8080) == {"g1": 30, "g2": 10}
    svc(lab, "set-weight", "wweb", "g2", "0")                 # quiesce: no new connections
    assert hits(lab, v, 8, port=8080) == {"g1": 8}
    svc(lab, "set-weight", "wweb", "g2", "1")
    assert hits(lab, v, 8, port=8080) == {"g1": 6, "g2": 2}

    svc(lab, "create", "sticky", "--vip", f"{v}:81", "--backends", "g1:80,g2:80,g3:80",
        "--scheduler", "sh")
    assert len(hits(lab, v, 10, port=81)) == 1                # one client, one backend

    svc(lab, "create", "rand", "--vip", f"{v}:82", "--backends", "g1:80,g2:80,g3:80",
        "--scheduler", "random", "--weight", "g3=2")
    got = hits(lab, v, 60, port=82)
    assert set(got) == set(GUESTS) and got["g3"] > min(got["g1"], got["g2"])

    listing = svc(lab, "list")
    assert all(n in listing for n in ("web", "wweb", "sticky", "rand"))
    for name in ("web", "wweb", "sticky", "rand"):
        svc(lab, "delete", name)


@pytest.mark.guest
def test_failing_backend_leaves_within_interval_times_fall_and_returns_after_rise(
        lab: LabEnv) -> None:
    v = vip(lab, 1)
    interval, fall, rise = 0.5, 2, 2
    svc(lab, "create", "ha", "--vip", f"{v}:80", "--backends", ",".join(GUESTS),
        "--check", "http:/health", "--interval", str(interval), "--rise", str(rise),
        "--fall", str(fall))
    assert rotation(lab, "ha") == set(GUESTS)

    lab.gridvm("pause", "g2", host="h1")                       # a hung guest: checks time out
    took = wait_for("g2 to leave", lambda: "g2" not in rotation(lab, "ha"),
                    interval * fall + 3)
    print(f"paused backend left rotation after {took:.2f}s (interval×fall = "
          f"{interval * fall:.1f}s)")
    assert took <= interval * (fall + 1) + 1.0                 # + one probe timeout + polling
    assert set(hits(lab, v, 12)) == {"g1", "g3"}
    b = next(b for b in show(lab, "ha")["backends"] if b["domain"] == "g2")
    assert b["state"] == "down" and "no answer" in b["last_check"]

    lab.gridvm("unpause", "g2", host="h1")
    took = wait_for("g2 to return", lambda: "g2" in rotation(lab, "ha"), interval * rise + 3)
    print(f"unpaused backend returned after {took:.2f}s (interval×rise = {interval * rise:.1f}s)")
    assert hits(lab, v, 12) == {"g1": 4, "g2": 4, "g3": 4}

    lab.gridvm("destroy", "g3", host="h1")                     # gone: leaves at once
    wait_for("g3 to leave", lambda: "g3" not in rotation(lab, "ha"), interval * fall + 3)
    assert set(hits(lab, v, 6)) == {"g1", "g2"}
    boot(lab, "g3", 3)                                         # the same domain again
    wait_for("g3 to return", lambda: "g3" in rotation(lab, "ha"), 60)
    assert set(hits(lab, v, 6)) == set(GUESTS)
    svc(lab, "delete", "ha")


def _open(lab: LabEnv, address: str) -> socket.socket:
    """A TCP connection from the client namespace, with an unfinished HTTP request."""
    def connect() -> socket.socket:
        s = socket.create_connection((address, 80), timeout=10)
        s.sendall(b"GET / HTTP/1.0\r\n")
        return s
    return netns.call_in(lab.ns("client"), connect)


@pytest.mark.guest
def test_drain_lets_open_connections_finish_and_sends_new_ones_elsewhere(lab: LabEnv) -> None:
    v = vip(lab, 2)
    svc(lab, "create", "dr", "--vip", f"{v}:80", "--backends", ",".join(GUESTS),
        "--check", "tcp", "--interval", "0.5")
    conn = _open(lab, v)
    try:
        busy = [b for b in show(lab, "dr")["backends"] if b["active"] == 1]
        assert len(busy) == 1, show(lab, "dr")
        held = busy[0]["domain"]
        conn.sendall(b"X-Wait: 1\r\n")             # the guest reads a header line per 5 s
        svc(lab, "drain", "dr", held)
        conn.sendall(b"X-Wait: 2\r\n")
        assert held not in hits(lab, v, 6)
        b = next(b for b in show(lab, "dr")["backends"] if b["domain"] == held)
        assert (b["state"], b["active"], b["in_rotation"]) == ("draining", 1, False)
        conn.sendall(b"\r\n")                       # the open request completes on `held`
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    finally:
        conn.close()
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(held.encode()), reply
    wait_for("drained", lambda: next(b["state"] for b in show(lab, "dr")["backends"]
                                     if b["domain"] == held) == "drained", 10)
    svc(lab, "drain", "dr", held, "--undo")
    assert held in hits(lab, v, 6)
    svc(lab, "delete", "dr")


@pytest.mark.guest
def test_delete_removes_every_element_and_the_vip(lab: LabEnv) -> None:
    a, b = vip(lab, 3), vip(lab, 4)
    before = table(lab)
    assert "gridvm_lb_" not in before
    svc(lab, "create", "one", "--vip", f"{a}:80", "--backends", "g1,g2")
    svc(lab, "create", "two", "--vip", f"{b}:80", "--backends", "g3")
    svc(lab, "create", "three", "--vip", f"{a}:8080", "--backends", "g3:80")
    addrs = lab.run_in("h1", "ip", "-4", "addr", "show")
    assert f"{a}/32" in addrs and f"{b}/32" in addrs
    assert lab.http(b) == "g3" and lab.http(a, port=8080) == "g3"

    # gridvmd restarts: the services, their rules and VIPs are all still there and work
    lab.gridvm("lab", "restart", "h1", "--name", lab.name)
    assert set(hits(lab, a, 4)) == {"g1", "g2"}

    svc(lab, "delete", "two")
    rules = table(lab)
    assert "svc_two" not in rules and b not in rules and "svc_one" in rules
    assert f"{b}/32" not in lab.run_in("h1", "ip", "-4", "addr", "show")
    svc(lab, "delete", "one")
    rules = table(lab)
    assert "svc_one" not in rules and "svc_three" in rules
    assert f"{a}/32" in lab.run_in("h1", "ip", "-4", "addr", "show")   # "three" still uses it
    svc(lab, "delete", "three")
    assert table(lab) == before
    assert f"{a}/32" not in lab.run_in("h1", "ip", "-4", "addr", "show")
    with pytest.raises(OSError):
        lab.http(a, timeout=1)


@pytest.mark.guest
def test_bad_input_gets_one_line_errors_and_changes_nothing(lab: LabEnv) -> None:
    v = vip(lab, 5)
    svc(lab, "create", "taken", "--vip", f"{v}:80", "--backends", "g1")
    before = table(lab)
    cases = {
        ("--vip", f"{v}:80", "--backends", "g2"): f"VIP {v}:80 is already used by service "
                                                  "taken",
        ("--vip", f"{v}:81", "--backends", "nosuch"): "backend domain 'nosuch' does not exist",
        ("--vip", f"{v}:81", "--backends", "g1", "--check", "http"): "bad --check 'http'",
        ("--vip", f"{v}:81", "--backends", "g1", "--check", "icmp"): "bad --check 'icmp'",
        ("--vip", lab.guest_ip(1) + ":80", "--backends", "g2"): "is the address of domain g1",
        ("--vip", f"{v}", "--backends", "g1"): "use IP:PORT",
        ("--vip", f"{v}:81", "--backends", "g1", "--scheduler", "lc"): "unknown scheduler",
        ("--vip", f"{v}:81", "--backends", "g1", "--weight", "g1=3"): "use --scheduler wrr",
        ("--vip", f"{v}:81", "--backends", "g1", "--scheduler", "wrr", "--weight", "g2=3"):
            "not in --backends",
        ("--vip", f"{v}:81", "--backends", "g1,g1"): "listed twice",
        ("--vip", f"{v}:81", "--backends", "g1", "--interval", "0"): "interval",
    }
    for args, wanted in cases.items():
        msg = lab.fails("service", "create", "new", *args, host="h1")
        assert wanted in msg, (args, msg)
    assert "already exists" in lab.fails("service", "create", "taken", "--vip", f"{v}:82",
                                         "--backends", "g1", host="h1")
    assert "does not exist" in lab.fails("service", "show", "nosuch", host="h1")
    assert "has no backend 'g3'" in lab.fails("service", "drain", "taken", "g3", host="h1")
    assert "weights are 0" in lab.fails("service", "set-weight", "taken", "g1", "2", host="h1")
    assert table(lab) == before
    assert [s["name"] for s in json.loads(svc(lab, "list", "--json"))] == ["taken"]
    svc(lab, "delete", "taken")
