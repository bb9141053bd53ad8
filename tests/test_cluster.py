"""A three-host lab cluster (etcd, lease TTL 3 s): placement, cluster-wide names and verbs,
HA restart after power loss (also of the HA manager's own host), partitions that never run
two copies (checked from the guests' side), and bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from netlab import LabEnv, lab_env, wait_for

from gridvm.cluster.pki import Identity
from gridvm.host import httpprobe, netns
from gridvm.images.store import ImageInfo
from gridvm.lab.agent import Agent

pytestmark = pytest.mark.guest

TTL = 3


@pytest.fixture(scope="module")
def cl(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    with lab_env(tiny_image, tmp_path_factory.mktemp("cluster"), 3,
                 "--cluster", "--ttl", str(TTL)) as env:
        yield env


def hosts(cl: LabEnv, via: str = "h1") -> dict[str, dict[str, Any]]:
    rows = json.loads(cl.gridvm("host", "list", "--json", host=via).stdout)
    return {r["name"]: r for r in rows}


def alive_host(cl: LabEnv) -> str:
    return str(next(h.name for h in cl.state.hosts if h.pid is not None))


def views(cl: LabEnv) -> dict[str, dict[str, Any]]:
    out = json.loads(cl.gridvm("list", "--json", host=alive_host(cl)).stdout)
    return {v["name"]: v for v in out}


def ha_create(cl: LabEnv, name: str, n: int, *extra: str, group: str = "web") -> str:
    cfg = cl.write_cfg(name, "bridge=xenbr0", f'ip = "{cl.guest_ip(n)}"\n'
                       f'netmask = "255.255.255.0"\nha = "restart"\nha_group = "{group}"\n')
    view = json.loads(cl.gridvm("create", str(cfg), "--json", *extra,
                                host=alive_host(cl)).stdout)
    host: str = view["host"]
    return host


def leader(cl: LabEnv) -> str:
    return str(wait_for("a leader", lambda: next(
        (n for n, r in hosts(cl, alive_host(cl)).items() if r["leader"]), None)))


def qemu_pids(cl: LabEnv, host: str, name: str) -> list[int]:
    return sorted(cl.pids(host, f"process=gridvm:{name}"))


def qemus(cl: LabEnv, host: str, name: str) -> int:
    return len(qemu_pids(cl, host, name))


def peer_answers(cl: LabEnv, host: str, tls: ssl.SSLContext) -> bool:
    """Does `host`'s HTTPS API answer a peer presenting this certificate?"""
    def call() -> bool:
        try:
            with httpx.Client(verify=tls, timeout=5) as c:
                return c.get(f"https://{cl.addr(host)}:8002/v1/info").status_code == 200
        except httpx.HTTPError:
            return False
    result: bool = netns.call_in(cl.ns("client"), call)
    return result


def test_bad_input(cl: LabEnv) -> None:
    assert "unknown host 'h9' (hosts: h1, h2, h3)" in cl.fails(
        "create", str(cl.write_cfg("nowhere", "bridge=xenbr0")), "--host", "h9", host="h1")
    big = cl.write_cfg("huge", "bridge=xenbr0").read_text().replace("memory = 96",
                                                                     "memory = 9000000")
    (cl.tmp / "huge.cfg").write_text(big)
    msg = cl.fails("create", str(cl.tmp / "huge.cfg"), host="h2")
    assert msg.startswith("no host fits domain huge") and all(
        f"{h}: memory: needs 9000000 MiB" in msg for h in ("h1", "h2", "h3")), msg
    assert "unknown host 'h9'" in cl.fails("host", "maintenance", "h9", "on", host="h1")
    assert "already in the cluster" in cl.fails("cluster", "join", "--etcd",
                                                "http://10.77.0.3:2379", host="h1")
    assert views(cl) == {}
    # a gridvmd outside the cluster (in the lab's client namespace): no certificate, no
    # server to enrol with, no --listen
    solo = Agent(cl.tmp / "solo", ns=cl.state.client.ns, accel="tcg",
                 args=["--listen", f"{cl.state.client.address.split('/')[0]}:8012"])
    solo.start(timeout=30)
    try:
        home = ["--home", str(solo.home.root)]
        assert "no certificate of the cluster" in cl.fails(
            *home, "cluster", "join", "--etcd", "https://10.77.0.3:2379")
        pin = ["--token", "abcdef.0123456789abcdef", "--ca-hash", "sha256:" + "0" * 64]
        for server, why in (("10.77.0.99", "cannot get the cluster CA from"),
                            ("127.0.0.1:9", "cannot get the cluster CA from")):
            t0 = time.monotonic()
            assert why in cl.fails(*home, "cluster", "join", server, *pin)
            assert time.monotonic() - t0 < 20
        assert "no certificate" in cl.fails(*home, "cluster", "join", "--etcd",
                                            "https://10.77.0.3:2379")
        assert not (solo.home.root / "cluster" / "config.json").exists()
        st = json.loads(cl.gridvm("--home", str(solo.home.root), "cluster", "status",
                                  "--json").stdout)
        assert st == {"joined": False}
    finally:
        solo.stop()


def test_placement_names_and_verbs_across_hosts(cl: LabEnv) -> None:
    a = ha_create(cl, "spread1", 1, group="spread")
    b = ha_create(cl, "spread2", 2, group="spread")
    c = ha_create(cl, "spread3", 3, group="spread")
    assert sorted([a, b, c]) == ["h1", "h2", "h3"]       # anti-affinity and spread
    assert "no host fits domain spread4" in cl.fails(
        "create", str(cl.write_cfg("spread4", "bridge=xenbr0",
                                   'ha_group = "spread"')), host="h1")
    # names are cluster-wide; verbs work from any host
    assert "already in use in the cluster" in cl.fails(
        "create", str(cl.write_cfg("spread1", "bridge=xenbr0")), host="h3")
    other = next(h for h in ("h1", "h2", "h3") if h != a)
    assert views(cl)["spread1"]["host"] == a
    cl.gridvm("pause", "spread1", host=other)
    assert views(cl)["spread1"]["state"] == "paused"
    cl.gridvm("unpause", "spread1", host=other)
    for name in ("spread1", "spread2", "spread3"):
        cl.gridvm("destroy", name, host=other)
    assert views(cl) == {}
    assert all(not r["domains"] for r in hosts(cl).values())


def test_partition_never_runs_two_copies(cl: LabEnv) -> None:
    boss = leader(cl)
    victim = next(h for h in ("h1", "h2", "h3") if h != boss)
    ha_create(cl, "db1", 10, "--host", victim)
    ip = cl.guest_ip(10)
    first = cl.wait_http(ip)
    assert first == "db1"
    boot0 = cl.http(ip, "/bootid")

    seen: list[tuple[float, int, set[str]]] = []
    stop = threading.Event()

    def watch() -> None:  # every 0.1 s: QEMUs of db1 in every host, and who answers where
        while not stop.is_set():
            copies = sum(qemus(cl, h, "db1") for h in ("h1", "h2", "h3"))
            boots = set()
            for h in ("h1", "h2", "h3"):
                with contextlib.suppress(OSError):
                    boots.add(netns.call_in(cl.ns(h), lambda: httpprobe.http_get(
                        ip, "/bootid", timeout=0.3)))
            seen.append((time.monotonic(), copies, boots))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        cl.gridvm("lab", "partition", victim, "--name", cl.name)
        wait_for("db1 back elsewhere", lambda: cl.http(ip, "/bootid", timeout=1) != boot0,
                 timeout=60)
        assert hosts(cl, boss)[victim]["state"] == "fenced"
        cl.gridvm("lab", "heal", victim, "--name", cl.name)
        wait_for("the partitioned host back up",
                 lambda: hosts(cl, boss)[victim]["state"] == "up", timeout=30)
        time.sleep(2)
    finally:
        stop.set()
        watcher.join(timeout=10)
        cl.gridvm("lab", "heal", victim, "--name", cl.name, check=False)
    assert max(n for _, n, _ in seen) == 1, "two QEMUs of db1 ran at once"
    assert all(len(b) <= 1 for _, _, b in seen), "two copies of db1 answered at once"
    assert any(boot0 in b for _, _, b in seen) and any(b and boot0 not in b for _, _, b in seen)
    assert sum(qemus(cl, h, "db1") for h in ("h1", "h2", "h3")) == 1
    assert qemus(cl, victim, "db1") == 0
    v = views(cl)["db1"]
    assert v["host"] != victim and v["state"] == "running"
    cl.gridvm("destroy", "db1", host=boss)


def test_power_loss_restarts_ha_domains_elsewhere_even_the_managers_host(cl: LabEnv) -> None:
    boss = leader(cl)
    others = [h for h in ("h1", "h2", "h3") if h != boss]
    placed = {ha_create(cl, "web1", 1, "--host", others[0]),
              ha_create(cl, "web2", 2, "--host", boss)}
    assert placed == {others[0], boss}
    for n, name in ((1, "web1"), (2, "web2")):
        assert cl.wait_http(cl.guest_ip(n)) == name

    # a host that is not the manager's loses power: web1 comes back, away from web2
    cl.gridvm("lab", "poweroff", others[0], "--name", cl.name)
    assert cl.wait_http(cl.guest_ip(1), timeout=60) == "web1"
    v = views(cl)
    assert v["web1"]["host"] == others[1] and v["web2"]["host"] == boss  # anti-affinity
    assert hosts(cl, boss)[others[0]]["state"] == "fenced"
    cl.gridvm("lab", "poweron", others[0], "--name", cl.name)
    wait_for("power-on host up", lambda: hosts(cl, boss)[others[0]]["state"] == "up")

    # now the HA manager's own host dies: another host is elected and restarts web2
    cl.gridvm("lab", "poweroff", boss, "--name", cl.name)
    assert cl.wait_http(cl.guest_ip(2), timeout=60) == "web2"
    v = views(cl)
    assert v["web2"]["host"] == others[0], v                # the one without web1
    assert leader(cl) != boss
    cl.gridvm("lab", "poweron", boss, "--name", cl.name)
    wait_for("old manager host back", lambda: hosts(cl, others[1])[boss]["state"] == "up")
    assert sum(qemus(cl, h, "web2") for h in ("h1", "h2", "h3")) == 1
    for name in ("web1", "web2"):
        cl.gridvm("destroy", name, host=others[1])


class Copies:
    """Notes, every 0.1 s in a thread, the hosts where a domain's QEMU runs (one QEMU
    daemonizing shows as two processes for a moment: hosts are what counts)."""

    def __init__(self, cl: LabEnv, name: str) -> None:
        self.seen: list[set[str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(cl, name), daemon=True)

    def _run(self, cl: LabEnv, name: str) -> None:
        while not self.stop.is_set():
            self.seen.append({h for h in ("h1", "h2", "h3") if qemus(cl, h, name)})
            time.sleep(0.1)

    def __enter__(self) -> Copies:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    @property
    def most(self) -> int:
        return max(len(hosts) for hosts in self.seen)


def test_a_crash_is_restarted_by_its_host_or_else_by_the_ha_manager(cl: LabEnv) -> None:
    """on_crash=restart (the default): its QEMU dies, its host restarts it in place and the
    HA manager leaves it be. on_crash=destroy: the guest crashes, its host does not restart
    it, the registry marks it lost (not deleted) and the HA manager restarts it. Either way
    it never runs on two hosts."""
    all_up(cl)
    home = next(h for h in ("h1", "h2", "h3") if h != leader(cl))
    try:
        ha_create(cl, "cr1", 14, "--host", home, group="cr1")
        ip = cl.guest_ip(14)
        assert cl.wait_http(ip) == "cr1"
        boot = cl.http(ip, "/bootid")
        [pid] = qemu_pids(cl, home, "cr1")
        with Copies(cl, "cr1") as copies:
            os.kill(pid, signal.SIGKILL)
            wait_for("cr1 rebooted", lambda: cl.http(ip, "/bootid", timeout=1) != boot, 60)
            time.sleep(TTL + 3)              # a round of the HA manager would have acted
        assert copies.most == 1 and {home} in copies.seen
        assert qemus(cl, home, "cr1") == 1 and qemu_pids(cl, home, "cr1") != [pid]
        assert views(cl)["cr1"]["host"] == home and views(cl)["cr1"]["state"] == "running"

        cfg = cl.write_cfg("cr2", "bridge=xenbr0", f'ip = "{cl.guest_ip(15)}"\n'
                           'netmask = "255.255.255.0"\nha = "restart"\nha_group = "cr2"\n'
                           'on_crash = "destroy"\n')
        cl.gridvm("create", str(cfg), "--host", home, host=home)
        ip = cl.guest_ip(15)
        assert cl.wait_http(ip) == "cr2"
        boot = cl.http(ip, "/bootid")
        with Copies(cl, "cr2") as copies:
            with contextlib.suppress(OSError):
                cl.http(ip, "/crash", timeout=1)
            wait_for("cr2 restarted by the HA manager",
                     lambda: cl.http(ip, "/bootid", timeout=1) != boot, 60)
            time.sleep(TTL + 3)
        assert copies.most == 1 and set() in copies.seen     # it was down, then back
        assert sum(qemus(cl, h, "cr2") for h in ("h1", "h2", "h3")) == 1
        assert views(cl)["cr2"]["state"] == "running"
    finally:
        for name in ("cr1", "cr2"):
            cl.gridvm("destroy", name, host=home, check=False)


def test_an_ha_failed_domain_is_listed_and_started_again_by_the_operator(cl: LabEnv) -> None:
    """A guest that keeps crashing is given up after 3 counted restarts in 5 minutes
    (ha-failed): listed with its reason, verbs other than start/delete refused with what
    to do, `gridvm start` places and runs it again with its restart count cleared (the
    next crash is restarted again rather than given up at once)."""
    all_up(cl)
    cfg = cl.write_cfg("cr3", "bridge=xenbr0", f'ip = "{cl.guest_ip(16)}"\n'
                       'netmask = "255.255.255.0"\nha = "restart"\nha_group = "cr3"\n'
                       'on_crash = "destroy"\n')
    via = alive_host(cl)
    cl.gridvm("create", str(cfg), host=via)
    ip = cl.guest_ip(16)

    def crash_and_wait_back() -> None:
        boot = cl.http(ip, "/bootid")
        with contextlib.suppress(OSError):
            cl.http(ip, "/crash", timeout=1)
        wait_for("cr3 back", lambda: cl.http(ip, "/bootid", timeout=1) != boot, 60)

    try:
        assert cl.wait_http(ip) == "cr3"
        for _ in range(3):
            crash_and_wait_back()
        with contextlib.suppress(OSError):
            cl.http(ip, "/crash", timeout=1)
        failed = wait_for("cr3 given up", lambda: views(cl).get("cr3", {}).get("state")
                          == "ha-failed" and views(cl)["cr3"], 60)
        assert failed["host"] in ("h1", "h2", "h3") and failed["domid"] is None
        assert sum(qemus(cl, h, "cr3") for h in ("h1", "h2", "h3")) == 0
        refused = cl.gridvm("shutdown", "cr3", host=via, check=False)
        assert refused.returncode != 0 and "ha-failed" in refused.stderr \
            and "gridvm start cr3" in refused.stderr
        info = json.loads(cl.gridvm("list", "cr3", "--json", host=via).stdout)
        assert info[0]["state"] == "ha-failed"

        out = cl.gridvm("start", "cr3", host=via).stdout
        assert "Started domain cr3" in out
        assert cl.wait_http(ip) == "cr3"
        assert views(cl)["cr3"]["state"] == "running"
        crash_and_wait_back()                          # counted afresh: restarted again
        assert views(cl)["cr3"]["state"] == "running"
        assert sum(qemus(cl, h, "cr3") for h in ("h1", "h2", "h3")) == 1
    finally:
        cl.gridvm("destroy", "cr3", host=via, check=False)
        cl.gridvm("delete", "cr3", host=via, check=False)
    assert "cr3" not in views(cl)


# ----- evacuate -------------------------------------------------------------------------------


class Poller:
    """A client in the lab's client namespace: GET / every 20 ms, each request allowed 3
    tries of 1 s; counts requests and failed requests."""

    def __init__(self, cl: LabEnv, ip: str) -> None:
        self.ip = ip
        self.requests = self.failures = self.retries = 0
        self.events: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: netns.call_in(cl.ns("client"),
                                                                    self._run), daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for _ in range(3):
                t0 = time.monotonic()
                try:
                    httpprobe.http_get(self.ip, "/", timeout=1.0)
                    break
                except OSError as exc:
                    self.retries += 1
                    self.events.append((t0, repr(exc)))
            else:
                self.failures += 1
            self.requests += 1
            time.sleep(0.02)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def all_up(cl: LabEnv) -> None:
    wait_for("every host up", lambda: all(r["state"] == "up" for r in hosts(cl).values()))


@pytest.mark.timeout(600)
def test_evacuate_empties_a_host_live_then_maintenance(cl: LabEnv) -> None:
    all_up(cl)
    victim, keeper, third = "h2", "h1", "h3"
    ha_create(cl, "ev1", 21, "--host", victim, group="evac")
    ha_create(cl, "ev2", 22, "--host", victim, group="ev2")
    ha_create(cl, "ev3", 23, "--host", keeper, group="evac")   # ev1 must avoid h1
    for n, name in ((21, "ev1"), (22, "ev2"), (23, "ev3")):
        assert cl.wait_http(cl.guest_ip(n)) == name
    with Poller(cl, cl.guest_ip(21)) as p1, Poller(cl, cl.guest_ip(22)) as p2:
        time.sleep(1)
        t0 = time.monotonic()
        proc = cl.gridvm("host", "evacuate", victim, "--json", host=keeper, timeout=500)
        t1 = time.monotonic()
        time.sleep(1)
    res = json.loads(proc.stdout)
    assert res["host"] == victim and res["maintenance"] and res["left"] == []
    moved = {m["domain"]: m["to"] for m in res["moved"]}
    assert moved.keys() == {"ev1", "ev2"} and moved["ev1"] == third   # anti-affinity held
    assert victim not in moved.values()
    for p in (p1, p2):
        assert p.requests > 5 and p.failures == 0, (p.requests, p.failures, p.retries,
                                                      [(round(t - t0, 2), e) for t, e in p.events],
                                                      res, round(t1 - t0, 2))
    rows = hosts(cl)
    assert rows[victim]["state"] == "maintenance" and rows[victim]["domains"] == []
    v = views(cl)
    assert v["ev1"]["host"] == third and v["ev2"]["host"] == moved["ev2"]
    assert all(v[n]["state"] == "running" for n in ("ev1", "ev2", "ev3"))
    assert qemus(cl, victim, "ev1") == qemus(cl, victim, "ev2") == 0
    for n, name in ((21, "ev1"), (22, "ev2")):
        assert cl.http(cl.guest_ip(n)) == name
    # the host is empty and in maintenance: new domains go elsewhere
    assert ha_create(cl, "ev4", 24, group="ev4") != victim
    # human output: a line per domain
    out = cl.gridvm("host", "evacuate", victim, host=third).stdout
    assert "0 domain(s) moved; host is in maintenance" in out
    cl.gridvm("host", "maintenance", victim, "off", host=keeper)
    for name in ("ev1", "ev2", "ev3", "ev4"):
        cl.gridvm("destroy", name, host=keeper)
    assert views(cl) == {}


def test_evacuate_refuses_without_room_and_moves_nothing(cl: LabEnv) -> None:
    all_up(cl)
    assert "unknown host 'h9' (hosts: h1, h2, h3)" in cl.fails("host", "evacuate", "h9",
                                                                host="h1")
    victim = "h3"
    ha_create(cl, "free1", 25, "--host", victim, group="free1")
    pinned = cl.write_cfg("pinned1", "bridge=xenbr0", f'ip = "{cl.guest_ip(26)}"\n'
                          'netmask = "255.255.255.0"\nha = "restart"\nhosts = ["h3"]\n')
    cl.gridvm("create", str(pinned), host="h1")
    before = {n: qemu_pids(cl, victim, n) for n in ("free1", "pinned1")}
    msg = cl.fails("host", "evacuate", victim, host="h1")
    assert msg.startswith("cannot evacuate h3: no host fits domain pinned1"), msg
    assert "h1: not in the domain's hosts (h3)" in msg and \
        "h2: not in the domain's hosts (h3)" in msg and msg.endswith("nothing was moved"), msg
    v = views(cl)
    assert v["free1"]["host"] == v["pinned1"]["host"] == victim
    assert qemus(cl, victim, "free1") == qemus(cl, victim, "pinned1") == 1
    assert before == {n: qemu_pids(cl, victim, n) for n in ("free1", "pinned1")}
    assert hosts(cl)[victim]["state"] == "up"          # not put in maintenance either
    for name in ("free1", "pinned1"):
        cl.gridvm("destroy", name, host="h1")


# ----- removing a dead host -------------------------------------------------------------------


def test_remove_forgets_a_dead_host_and_frees_its_domains_names(cl: LabEnv) -> None:
    all_up(cl)
    survivor = leader(cl)
    victim = next(h for h in ("h3", "h2", "h1") if h != survivor)
    cfg = cl.write_cfg("plain1", "bridge=xenbr0", f'ip = "{cl.guest_ip(30)}"\n'
                       'netmask = "255.255.255.0"\n')
    cl.gridvm("create", str(cfg), "--host", victim, host=survivor)
    assert "is up" in cl.fails("host", "remove", victim, host=survivor)
    assert "unknown host" in cl.fails("host", "remove", "h9", host=survivor)
    assert "cannot remove itself" in cl.fails("host", "remove", survivor, host=survivor)

    cl.gridvm("lab", "poweroff", victim, "--name", cl.name)
    wait_for(f"{victim} down", lambda: hosts(cl, survivor)[victim]["state"] in (
        "down", "fenced"), 60)
    assert "already in use" in cl.fails("create", str(cfg), "--host", survivor,
                                        host=survivor)
    victim_cert = Identity(Path(cl.state.host(victim).home) / "pki").client_context()
    assert peer_answers(cl, survivor, victim_cert)           # a member still: accepted
    out = json.loads(cl.gridvm("host", "remove", victim, "--json", host=survivor).stdout)
    assert out["host"] == victim and out["forgotten"] == ["plain1"]
    assert out["revoked_serial"].isdigit()
    assert victim not in hosts(cl, survivor)
    # Its certificate is revoked: the survivor's TLS handshake refuses it (CRL reloaded
    # within a heartbeat), before any handler runs.
    wait_for("the survivor to refuse the removed host", lambda: not peer_answers(
        cl, survivor, victim_cert), 15)
    cl.gridvm("create", str(cfg), "--host", survivor, host=survivor)   # the name is free
    assert cl.wait_http(cl.guest_ip(30)) == "plain1"
    cl.gridvm("destroy", "plain1", host=survivor)
