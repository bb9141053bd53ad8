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

    .venv/bin/python bench/services.py [--guests 2] [--seconds 5] [--rounds 2]
                                       [--concurrency 16] [--accel auto|kvm|tcg] [--json]
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gridvm.api.client import Client
from gridvm.config.model import DomainConfig, NetParams, VifSpec
from gridvm.host import httpprobe, netns
from gridvm.images.tiny import build_tiny
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per path")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
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
