"""Virtual services in a two-host lab cluster: shared specs, backends on both hosts, a VIP
that moves when its owner loses power, and a standby host's backends leaving rotation as
soon as it falls silent (client load running throughout)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from netlab import LabEnv, lab_env, wait_for

from gridvm.images.store import ImageInfo

pytestmark = pytest.mark.guest

TTL = 2


@pytest.fixture(scope="module")
def cl(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    with lab_env(tiny_image, tmp_path_factory.mktemp("svccluster"), 2,
                 "--cluster", "--ttl", str(TTL)) as env:
        yield env


def show(cl: LabEnv, host: str, name: str) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(cl.gridvm("service", "show", name, "--json",
                                                host=host).stdout)
    return view


class Load(threading.Thread):
    """Back-to-back requests to the VIP from the client namespace; records every answer."""

    def __init__(self, cl: LabEnv, vip: str) -> None:
        super().__init__(daemon=True)
        self.cl, self.vip = cl, vip
        self.log: list[tuple[float, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                body: str | None = self.cl.http(self.vip, timeout=1.0)
            except OSError:
                body = None
            self.log.append((time.monotonic(), body))

    def longest_gap(self) -> float:
        ok = [t for t, b in self.log if b]
        return max((b - a for a, b in zip(ok, ok[1:], strict=False)), default=0.0)


def pair_behind_vip(cl: LabEnv, service: str, first: int, extra: str, *check: str
                    ) -> tuple[str, str, str]:
    """Domains w<first> on h1 and w<first+1> on h2 behind a new service at a VIP; once the
    spec has reached both hosts and both route to both backends: (vip, owner, other)."""
    names = [f"w{first}", f"w{first + 1}"]
    for n, (name, host) in enumerate(zip(names, ("h1", "h2"), strict=True), first):
        cfg = cl.write_cfg(name, "bridge=xenbr0", f'ip = "{cl.guest_ip(n)}"\n'
                           f'netmask = "255.255.255.0"\n{extra}')
        cl.gridvm("create", str(cfg), "--host", host, host="h1")
    for n in (first, first + 1):
        cl.wait_http(cl.guest_ip(n))
    vip = cl.guest_ip(100 + first)
    cl.gridvm("service", "create", service, "--vip", f"{vip}:80", "--backends",
              ",".join(names), "--interval", "0.5", *check, host="h1")
    for h in ("h1", "h2"):
        wait_for(f"{h} to route to both", lambda h=h: all(
            b["in_rotation"] for b in show(cl, h, service)["backends"]), 30)
    owner = wait_for("a VIP owner", lambda: show(cl, "h1", service)["vip_owner"])
    return vip, owner, "h2" if owner == "h1" else "h1"


def test_vip_moves_when_its_owner_dies_and_backends_follow_ha(cl: LabEnv) -> None:
    vip, owner, other = pair_behind_vip(cl, "web", 1, 'ha = "restart"\nha_group = "web"\n',
                                        "--check", "http:/health", "--fall", "2")
    assert show(cl, owner, "web")["vip_interface"] == "xenbr0"
    assert show(cl, other, "web")["vip_interface"] is None
    assert {cl.http(vip) for _ in range(4)} == {"w1", "w2"}

    load = Load(cl, vip)
    load.start()
    time.sleep(2)
    t_off = time.monotonic()
    cl.gridvm("lab", "poweroff", owner, "--name", cl.name)
    wait_for("the VIP on the survivor",
             lambda: show(cl, other, "web")["vip_interface"] == "xenbr0", 30)
    took = time.monotonic() - t_off
    lost = "w1" if owner == "h1" else "w2"
    wait_for(f"{lost} back through the VIP", lambda: any(
        b == lost for t, b in load.log if t > t_off + 1), 90)
    load.stop.set()
    load.join(timeout=5)
    after = [b for t, b in load.log if t > t_off]
    print(f"VIP moved {owner}→{other} in {took:.1f}s; longest client gap "
          f"{load.longest_gap():.2f}s; {after.count(None)} of {len(after)} requests failed "
          f"after the power-off")
    assert load.longest_gap() < TTL + 4
    assert show(cl, other, "web")["vip_owner"] == other
    # the survivor noticed the silence through adverts (before any lease could expire)
    assert f"adverts: {owner} silent" in cl.gridvm("log", "-n", "1000", host=other).stdout

    # the old owner comes back: it rejoins as a standby and does not take the VIP back
    cl.gridvm("lab", "poweron", owner, "--name", cl.name)
    wait_for("the spec on the returning host", lambda: show(cl, owner, "web"), 60)
    time.sleep(TTL + 1)
    assert f"{vip}/32" not in cl.run_in(owner, "ip", "-4", "addr", "show")
    assert show(cl, other, "web")["vip_interface"] == "xenbr0"

    # deleting on one host deletes it everywhere, with its VIP
    cl.gridvm("service", "delete", "web", host=other)
    wait_for("the service gone from the returning host", lambda: "web" not in cl.gridvm(
        "service", "list", host=owner).stdout, 20)
    for h in ("h1", "h2"):
        assert "gridvm_lb_" not in cl.run_in(h, "nft", "list", "tables")
        assert f"{vip}/32" not in cl.run_in(h, "ip", "-4", "addr", "show")


def test_a_silent_standby_host_loses_its_backends_at_once(cl: LabEnv) -> None:
    """The VIP's owner stays; the other host dies with one backend on it. Its backend
    leaves rotation when its adverts stop (0.5 s), not after `fall` failed checks."""
    hosts = {"w3": "h1", "w4": "h2"}
    vip, owner, standby = pair_behind_vip(cl, "web2", 3, "", "--check", "tcp", "--fall", "3")
    lost = next(d for d, h in hosts.items() if h == standby)
    kept = next(d for d, h in hosts.items() if h == owner)

    load = Load(cl, vip)
    load.start()
    time.sleep(2)
    t_off = time.monotonic()
    cl.gridvm("lab", "poweroff", standby, "--name", cl.name)
    time.sleep(4)
    load.stop.set()
    load.join(timeout=5)
    after = [b for t, b in load.log if t > t_off]
    print(f"{standby} (standby) powered off: longest client gap {load.longest_gap():.2f}s; "
          f"{after.count(None)} of {len(after)} requests failed after the power-off")
    log = cl.gridvm("log", "-n", "1000", host=owner).stdout
    assert f"backends {lost} out until they pass checks again ({standby} went silent)" in log
    late = [b for t, b in load.log if t > t_off + 2.5]     # (t: when an answer ended)
    assert late and late == [kept] * len(late)
    assert load.longest_gap() < TTL + 4
    assert show(cl, owner, "web2")["vip_owner"] == owner      # the VIP did not move
    cl.gridvm("lab", "poweron", standby, "--name", cl.name)
    cl.gridvm("service", "delete", "web2", host=owner)


def test_a_request_in_flight_through_a_dying_owner_completes_through_the_new_one(
        cl: LabEnv) -> None:
    """Connection sync (conntrackd): a slow request is open through the VIP's owner to the
    backend on the other host when the owner loses power; the standby takes the VIP with
    the connection in its table, and the answer reaches the client."""
    hosts = {"w5": "h1", "w6": "h2"}
    vip, owner, standby = pair_behind_vip(cl, "web3", 5, "", "--check", "tcp", "--fall", "2")
    lost = next(d for d, h in hosts.items() if h == owner)
    kept = next(d for d, h in hosts.items() if h == standby)
    cl.gridvm("service", "set-weight", "web3", lost, "0", host=owner)  # new ones: to kept
    assert {cl.http(vip) for _ in range(3)} == {kept}
    got: dict[str, Any] = {}

    def slow() -> None:
        t0 = time.monotonic()
        try:
            got["body"] = cl.http(vip, "/sleep?seconds=3", timeout=15)
        except OSError as exc:
            got["error"] = exc
        got["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.8)                       # the request is open and mirrored to the standby
    cl.gridvm("lab", "poweroff", owner, "--name", cl.name)
    t.join(timeout=20)
    print(f"request open through {owner} when it lost power: {got}")
    assert got.get("body") == kept, got
    assert show(cl, standby, "web3")["vip_owner"] == standby
    cl.gridvm("lab", "poweron", owner, "--name", cl.name)
