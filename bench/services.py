"""Requests per second and latency through a gridvm virtual service, against the same guests
reached directly and through HAProxy, measured side by side in one run.

In a one-host lab made for the run (removed at the end), N tiny guests answer HTTP on the
bridge network xenbr0 and three paths lead to them from the lab's client namespace:

  direct    the client spreads requests round-robin over the guests' own addresses
  service   a gridvm virtual service (VIP on h1, nftables DNAT, rr, tcp checks)
  haproxy   HAProxy on h1 (mode tcp, balance roundrobin, no checks in the data path)

The guests (a shell answering each connection, under TCG) bound all three paths, so the
same comparison is made a second time with the guests' places taken by namespaces on the
same bridge running a fast asyncio HTTP server (bench/network.py's stand-ins): the
director's nft table is then programmed by gridvm's Director directly (the daemon's
backends are domains), and the figures show the data paths themselves.

Each request is one HTTP/1.0 GET / on a new TCP connection (the server closes after every
answer), made by `--concurrency` asyncio workers for `--seconds`. Paths are measured in
interleaved rounds so a drift in the backends' speed affects all of them alike.

With `--poweroff N` it measures instead what clients see when a host loses power: per
trial a fresh two-host lab cluster (lease TTL 2 s) with one guest on each host behind one
virtual service (tcp checks every 0.5 s, fall 2), client load at the VIP, and after 3 s
`lab poweroff` of the VIP's owner (odd trials) or of the other host (even trials); the
load goes on for 8 s more. The load is open-loop (`--rate` requests/s, `--timeout` each),
so requests hung on the dead host do not hold new ones back. Reported: requests; failures
split into those in flight at the power-off and those sent after it; the longest time
between two answers; the slowest answer to a request sent after the power-off; when the
VIP was up on the survivor.

    .venv/bin/python bench/services.py [--guests 2] [--seconds 5] [--rounds 2]
                                       [--concurrency 16] [--accel auto|kvm|tcg] [--json]
    .venv/bin/python bench/services.py --poweroff 4 [--rate 20] [--timeout 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gridvm.api.client import Client
from gridvm.config.model import DomainConfig, NetParams, VifSpec
from gridvm.errors import GridvmError
from gridvm.host import httpprobe, netns
from gridvm.images.tiny import build_tiny
from gridvm.lab import cluster as labcluster
from gridvm.lab import lab as labmod
from gridvm.lb import vip as vipmod
from gridvm.lb.director import Director, Programmed
from gridvm.lb.model import Target
from gridvm.paths import Home

sys.path.insert(0, str(Path(__file__).parent))
from network import stand_in  # noqa: E402  (bench/network.py: a namespace on a bridge)

HAPROXY_PORT = 8081
HAPROXY_FAST_PORT = 8082

FAST_SERVER = """
import asyncio, sys
body = sys.argv[1].encode()
reply = b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body)
async def handle(r, w):
    await r.readuntil(b"\\r\\n\\r\\n")
    w.write(reply)
    await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(handle, "0.0.0.0", 80, backlog=1024)
    await srv.serve_forever()
asyncio.run(main())
"""

HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind {bind}
    default_backend be
backend be
    balance roundrobin
{servers}
frontend fast
    bind {bind_fast}
    default_backend fastbe
backend fastbe
    balance roundrobin
{fast_servers}
"""


async def _get(ip: str, port: int, timeout: float) -> bool:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), timeout)
        return data.startswith(b"HTTP/1.0 200")
    finally:
        writer.close()


async def _load(targets: list[tuple[str, int]], seconds: float, concurrency: int
                ) -> dict[str, Any]:
    lat: list[float] = []
    failed = 0
    counter = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal failed, counter
        while time.monotonic() < end:
            ip, port = targets[counter % len(targets)]
            counter += 1
            t0 = time.monotonic()
            try:
                ok = await _get(ip, port, 10.0)
            except (OSError, TimeoutError):
                ok = False
            if ok:
                lat.append(time.monotonic() - t0)
            else:
                failed += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - t0
    lat.sort()
    return {"requests": len(lat), "failed": failed, "seconds": wall,
            "latencies": lat}


def load(ns: str, targets: list[tuple[str, int]], seconds: float, concurrency: int
         ) -> dict[str, Any]:
    """Drive load from inside namespace `ns`."""
    result: dict[str, Any] = netns.call_in(
        ns, lambda: asyncio.run(_load(targets, seconds, concurrency)))
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(x for r in runs for x in r["latencies"])
    n = len(lat)
    secs = sum(r["seconds"] for r in runs)
    return {"requests": n, "failed": sum(r["failed"] for r in runs),
            "rps": round(n / secs, 1) if secs else 0.0,
            "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
            "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 2) if lat else None,
            "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None}


def boot(c: Client, image: Any, name: str, ip: str, prefix: int) -> None:
    cfg = DomainConfig(name=name, memory=96, kernel=str(image.kernel),
                       ramdisk=str(image.ramdisk), vifs=[VifSpec(bridge="xenbr0")],
                       net=NetParams(ip=ip, netmask=str(ipaddress.IPv4Network(
                           f"0.0.0.0/{prefix}").netmask), hostname=name))
    c.post("/domains", {"config": cfg.model_dump(mode="json")})


def wait_answer(ns: str, ip: str, port: int, proc: subprocess.Popen[bytes] | None = None
                ) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            netns.call_in(ns, lambda: httpprobe.http_get(ip, port=port, timeout=2))
            return
        except OSError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise
            time.sleep(0.1)


def measure(ns: str, paths: dict[str, list[tuple[str, int]]], args: argparse.Namespace,
            say: Callable[[str], None], title: str) -> dict[str, dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    load(ns, next(iter(paths.values())), 1.0, args.concurrency)     # warm up
    for r in range(args.rounds):
        for p, targets in paths.items():
            say(f"{title}: round {r + 1}/{args.rounds}: {p}")
            runs[p].append(load(ns, targets, args.seconds, args.concurrency))
    return {p: summary(rs) for p, rs in runs.items()}


# ----- a host powered off under load --------------------------------------------------------


async def _steady(vip: str, port: int, stop: asyncio.Event, rate: float, timeout: float,
                  errors: Counter[str]) -> list[tuple[float, float, bool]]:
    """Open-loop load: a request every 1/rate s until `stop`, whatever the earlier ones are
    doing (a hung request does not hold the next back); (start, end, ok) per request, and
    failures counted by kind in `errors`."""
    log: list[tuple[float, float, bool]] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(t0: float) -> None:
        try:
            ok = await _get(vip, port, timeout)
        except (OSError, TimeoutError) as exc:
            ok = False
            errors[type(exc).__name__] += 1
        log.append((t0, time.monotonic(), ok))

    due = time.monotonic()
    while not stop.is_set():
        task = asyncio.create_task(one(time.monotonic()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        due += 1 / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    await asyncio.gather(*tasks)
    return log


class Steady:
    """`_steady` in the lab's client namespace, in a thread of its own."""

    def __init__(self, ns: str, vip: str, port: int, rate: float, timeout: float) -> None:
        self.log: list[tuple[float, float, bool]] = []
        self.errors: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        started = threading.Event()

        async def run() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            started.set()
            self.log = await _steady(vip, port, self._stop, rate, timeout, self.errors)

        self._thread = threading.Thread(target=lambda: netns.call_in(
            ns, lambda: asyncio.run(run())), daemon=True)
        self._thread.start()
        started.wait(10)

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def report(self, t_off: float) -> dict[str, Any]:
        """Failures split into requests in flight at the power-off and requests sent after
        it; the longest time between two answers; the slowest answer sent after it."""
        log = self.log
        ends = sorted(end for _, end, ok in log if ok)
        slow = max((end - start for start, end, ok in log if ok and start >= t_off),
                   default=0.0)
        gap = max((b - a for a, b in zip(ends, ends[1:], strict=False)), default=0.0)
        return {"requests": len(log), "failed": sum(not ok for *_, ok in log),
                "failed_in_flight": sum(not ok and start < t_off for start, _, ok in log),
                "failed_new": sum(not ok and start >= t_off for start, _, ok in log),
                "longest_gap_s": round(gap, 3), "slowest_new_s": round(slow, 3),
                "errors": dict(self.errors)}


def poweroff_trial(n: int, victim_role: str, image: Any, args: argparse.Namespace,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """One fresh two-host lab cluster, one guest per host behind a service, one power-off."""
    home = Home.resolve()
    name = f"bp{os.getpid() % 10000}{n}"
    state = labmod.plan(name, 2, root=Path(f"/tmp/gridvm-bench-{name}"), images=home.images,
                        accel=args.accel, cluster=True, ttl=2)
    labmod.up(state)
    lan = ipaddress.IPv4Network(state.subnet)
    clients = {h.name: Client(Home(Path(h.home)), timeout=300) for h in state.hosts}
    vip = str(lan.network_address + 200)
    try:
        for i, h in enumerate(("h1", "h2"), 1):
            cfg = DomainConfig(name=f"g{i}", memory=96, kernel=str(image.kernel),
                               ramdisk=str(image.ramdisk), vifs=[VifSpec(bridge="xenbr0")],
                               net=NetParams(ip=str(lan.network_address + 100 + i),
                                             netmask=str(lan.netmask), hostname=f"g{i}"))
            deadline = time.monotonic() + 30
            while True:                         # until both hosts have joined the cluster
                try:
                    clients["h1"].post("/domains", {"config": cfg.model_dump(mode="json")},
                                       params={"host": h})
                    break
                except GridvmError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        for i in (1, 2):
            wait_answer(state.client.ns, str(lan.network_address + 100 + i), 80)
        clients["h1"].post("/services", {"name": "web", "vip": vip, "port": 80,
                                         "scheduler": "rr", "check": "tcp", "interval": 0.5,
                                         "rise": 2, "fall": 2,
                                         "backends": [{"domain": "g1"}, {"domain": "g2"}]})
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(GridvmError):        # until the spec reaches h2
                views = {h: c.get("/services/web") for h, c in clients.items()}
                owner = views["h1"]["vip_owner"]
                if owner and all(b["in_rotation"] for v in views.values()
                                 for b in v["backends"]):
                    break
            if time.monotonic() > deadline:
                raise GridvmError("the service did not come up in 60 s")
            time.sleep(0.2)
        victim = owner if victim_role == "owner" else ("h2" if owner == "h1" else "h1")
        survivor = "h2" if victim == "h1" else "h1"
        load = Steady(state.client.ns, vip, 80, args.rate, args.timeout)
        time.sleep(3)
        say(f"trial {n}: powering off {victim} ({victim_role})")
        t_off = time.monotonic()
        labcluster.poweroff(state, victim)
        vip_at = None
        while time.monotonic() - t_off < 8:
            if vip_at is None and victim_role == "owner" and \
                    clients[survivor].get("/services/web")["vip_interface"]:
                vip_at = round(time.monotonic() - t_off, 2)
            time.sleep(0.05)
        load.stop()
        return {"trial": n, "powered_off": victim_role, "vip_on_survivor_s": vip_at,
                **load.report(t_off)}
    finally:
        for c in clients.values():
            c.close()
        labmod.down(name)


def poweroff_main(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    image = build_tiny(Home.resolve().images)
    trials = [poweroff_trial(n, "owner" if n % 2 else "standby", image, args, say)
              for n in range(1, args.poweroff + 1)]
    if args.json:
        print(json.dumps({"rate": args.rate, "timeout_s": args.timeout, "trials": trials},
                         indent=2))
        return
    print(f"host power-off under load: {args.rate:g} requests/s (open loop), "
          f"{args.timeout:g}s timeout each, lease TTL 2s, checks 0.5s×2")
    print("failed: in flight = sent before the power-off (to a backend or a director on the "
          "dead host: no balancer saves those); new = sent after it")
    print(f"{'trial':<6}{'host off':<9}{'requests':>9}{'in flight':>10}{'new':>5}"
          f"{'longest gap':>13}{'slowest new':>13}{'VIP moved':>11}")
    for t in trials:
        moved = f"{t['vip_on_survivor_s']:.2f}s" if t["vip_on_survivor_s"] else "-"
        print(f"{t['trial']:<6}{t['powered_off']:<9}{t['requests']:>9}"
              f"{t['failed_in_flight']:>10}{t['failed_new']:>5}{t['longest_gap_s']:>12.2f}s"
              f"{t['slowest_new_s']:>12.2f}s{moved:>11}")
    reqs, failed = sum(t["requests"] for t in trials), sum(t["failed"] for t in trials)
    new = sum(t["failed_new"] for t in trials)
    print(f"all: {failed} of {reqs} requests failed ({100 * failed / max(reqs, 1):.2f}%), "
          f"{new} of them sent after the power-off; longest gap "
          f"{max(t['longest_gap_s'] for t in trials):.2f}s")
    errors: Counter[str] = Counter()
    for t in trials:
        errors.update(t["errors"])
    if errors:
        print("failures by kind: " + ", ".join(f"{k} {v}" for k, v in errors.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per path")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--poweroff", type=int, default=0, metavar="N",
                    help="instead: N host power-off trials under load")
    ap.add_argument("--rate", type=float, default=20.0,
                    help="requests/s (--poweroff; one tiny TCG guest refuses some at 50)")
    ap.add_argument("--timeout", type=float, default=5.0, help="per request (--poweroff)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.poweroff:
        poweroff_main(args, (lambda m: None) if args.json else (
            lambda m: print(m, file=sys.stderr, flush=True)))
        return
    home = Home.resolve()
    image = build_tiny(home.images)
    name = f"bs{os.getpid() % 100000}"
    state = labmod.plan(name, 1, root=Path(f"/tmp/gridvm-bench-{name}"), images=home.images,
                        accel=args.accel)
    say: Callable[[str], None] = (lambda m: None) if args.json else (
        lambda m: print(m, file=sys.stderr, flush=True))
    labmod.up(state)
    lan = ipaddress.IPv4Network(state.subnet)
    host = state.hosts[0]
    client = state.client.ns
    host_ip = host.address.split("/")[0]
    vip, fast_vip = str(lan.network_address + 200), str(lan.network_address + 201)
    guests = {f"g{i}": str(lan.network_address + 100 + i) for i in range(1, args.guests + 1)}
    fast = {f"s{i}": str(lan.network_address + 150 + i) for i in range(1, args.guests + 1)}
    c = Client(Home(Path(host.home)), timeout=300)
    director = Director(f"bench{os.getpid()}")
    servers: list[subprocess.Popen[bytes]] = []
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        with contextlib.ExitStack() as stack:
            say(f"booting {len(guests)} guests")
            for g, ip in guests.items():
                boot(c, image, g, ip, lan.prefixlen)
            for s, ip in fast.items():
                ns = stack.enter_context(stand_in(host.ns, "xenbr0", f"{name}-{s}",
                                                  f"{ip}/{lan.prefixlen}"))
                servers.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-c", FAST_SERVER, s],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for ip in [*guests.values(), *fast.values()]:
                wait_answer(client, ip, 80)
            accel = c.get("/info")["accel"]
            c.post("/services", {"name": "bench", "vip": vip, "port": 80, "scheduler": "rr",
                                 "check": "tcp", "interval": 1.0,
                                 "backends": [{"domain": g} for g in guests]})
            netns.call_in(host.ns, lambda: (director.program(Programmed(
                "fast", fast_vip, 80, "rr", tuple(Target(ip, 80, 1) for ip in fast.values())),
                new=True), vipmod.add(fast_vip)))
            cfg = Path(state.root) / "haproxy.cfg"
            cfg.write_text(HAPROXY_CFG.format(
                bind=f"{host_ip}:{HAPROXY_PORT}", bind_fast=f"{host_ip}:{HAPROXY_FAST_PORT}",
                servers="\n".join(f"    server {g} {ip}:80" for g, ip in guests.items()),
                fast_servers="\n".join(f"    server {g} {ip}:80" for g, ip in fast.items())))
            servers.append(subprocess.Popen(
                ["ip", "netns", "exec", host.ns, "haproxy", "-db", "-f", str(cfg)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_answer(client, host_ip, HAPROXY_PORT, servers[-1])
            tables["guests"] = measure(client, {
                "direct": [(ip, 80) for ip in guests.values()],
                "service": [(vip, 80)],
                "haproxy": [(host_ip, HAPROXY_PORT)]}, args, say, "guests")
            tables["namespaces"] = measure(client, {
                "direct": [(ip, 80) for ip in fast.values()],
                "service": [(fast_vip, 80)],
                "haproxy": [(host_ip, HAPROXY_FAST_PORT)]}, args, say, "namespaces")
            for p in servers:
                p.kill()
                p.wait(timeout=10)
    finally:
        for p in servers:
            if p.poll() is None:
                p.kill()
        c.close()
        labmod.down(name)
    report: dict[str, Any] = {"accel": accel, "guests": len(guests),
                              "concurrency": args.concurrency, "seconds": args.seconds,
                              "rounds": args.rounds, "backends": {}}
    for kind, res in tables.items():
        report["backends"][kind] = {
            "paths": res,
            "service_vs_haproxy_rps": round(res["service"]["rps"] / res["haproxy"]["rps"], 3),
            "service_vs_direct_rps": round(res["service"]["rps"] / res["direct"]["rps"], 3)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"HTTP GET / on a new connection each, {args.concurrency} clients, "
          f"{args.rounds}×{args.seconds:g}s per path, interleaved")
    for kind, r in report["backends"].items():
        what = (f"{len(guests)} tiny {accel} guests" if kind == "guests" else
                f"{len(fast)} namespaces (asyncio server) in the guests' place")
        print(f"\nbackends: {what}")
        print(f"{'path':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}"
              f"{'failed':>8}")
        for p, s in r["paths"].items():
            print(f"{p:<10}{s['rps']:>10.1f}{s['p50_ms']:>10}{s['p99_ms']:>10}"
                  f"{s['mean_ms']:>10}{s['failed']:>8}")
        print(f"service/haproxy req/s {r['service_vs_haproxy_rps']:.3f}, "
              f"service/direct {r['service_vs_direct_rps']:.3f}")


if __name__ == "__main__":
    main()
