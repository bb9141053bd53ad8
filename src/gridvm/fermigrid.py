"""`gridvm demo fermigrid`: FermiGrid-HA (2008) in a lab, through the loss of a host.

Brings up a two-host lab cluster (etcd, host lease TTL 2 s), starts the eight guests of
examples/fermigrid-ha/ (fg5x1…fg5x4 on h1, fg6x1…fg6x4 on h2; each pair shares an
anti-affinity group), puts each service (voms, gums, saz, squid) behind a virtual service
over its pair, drives client load at every VIP from the lab's client namespace, powers off
h1, keeps driving until every HA domain is back and serving, and reports: requests sent and
failed per service, the longest gap any client saw, when and where each HA domain came back,
and the final placement. Then it removes everything.

With `db=True` (`gridvm demo fermigrid --db`) the lab also runs FermiGrid's third pillar: a
replicated MariaDB (gridvm.db: members fgdb1 on h1, the primary, and fgdb2 on h2) behind a
writer VIP, with a client writing sequence numbers through it the whole time; the report
adds its acknowledged and lost writes and its longest write gap. Two hosts leave the
survivor without a replica to acknowledge, so the demo's database is made with
`--ack-timeout 2`: after the failover it goes on asynchronously (and says so) instead of
waiting for h1. It costs two Debian guests: the MariaDB image is built once (about 80 s),
and the members boot beside the tiny guests (about a minute under TCG).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gridvm.api.client import Client, q
from gridvm.config.xmfile import load_config
from gridvm.db import seqwriter
from gridvm.errors import GridvmError
from gridvm.host import httpprobe, netns
from gridvm.images.tiny import build_tiny
from gridvm.lab import cluster as labcluster
from gridvm.lab import lab as labmod
from gridvm.paths import Home

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fermigrid-ha"
RECIPES = EXAMPLE.parent / "recipes"
TTL = 2
VICTIM = "h1"


PACE_S = 0.2          # a client starts a request every 200 ms (5 requests/s per service)
TIMEOUT_S = 2.0


class Driver(threading.Thread):
    """One client: a GET at a VIP every PACE_S (TIMEOUT_S each), every answer recorded."""

    def __init__(self, ns: str, vip: str, port: int) -> None:
        super().__init__(daemon=True)
        self.ns, self.vip, self.port = ns, vip, port
        self.log: list[tuple[float, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        def loop() -> None:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    body: str | None = httpprobe.http_get(self.vip, port=self.port,
                                                          timeout=TIMEOUT_S)
                except OSError:
                    body = None
                self.log.append((t0, body))
                self.stop.wait(max(0.0, PACE_S - (time.monotonic() - t0)))
        netns.call_in(self.ns, loop)

    def first_from(self, name: str, since: float) -> float | None:
        return next((t for t, b in self.log if t >= since and b == name), None)

    def summary(self, t0: float) -> dict[str, Any]:
        ok = [t for t, b in self.log if b]
        gaps = [(b - a, a) for a, b in zip(ok, ok[1:], strict=False)]
        gap, at = max(gaps, default=(0.0, t0))
        return {"sent": len(self.log), "failed": sum(b is None for _, b in self.log),
                "failed_before": sum(b is None for t, b in self.log if t < t0),
                "longest_gap_s": round(gap, 2), "gap_at_s": round(at - t0, 1),
                "answered_by": sorted({b for _, b in self.log if b})}


def _spec(topo: dict[str, Any], lan: str) -> list[dict[str, Any]]:
    out = []
    for s in topo["services"]:
        backends = [{"domain": f"{fg}x{s['n']}", "port": 80} for fg in topo["hosts"]]
        out.append({"name": s["name"], "vip": f"{lan}.{s['vip']}", "port": s["port"],
                    "scheduler": "rr", "check": topo["check"], "interval": topo["interval"],
                    "rise": topo["rise"], "fall": topo["fall"], "backends": backends})
    return out


def _wait(what: str, fn: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(GridvmError, OSError):
            if fn():
                return
        if time.monotonic() > deadline:
            raise GridvmError(f"fermigrid demo: timed out waiting for {what}")
        time.sleep(0.25)


def _console(client: Client, name: str) -> str:
    """The last lines of a domain's console (for an error message)."""
    try:
        return str(client.get(f"/domains/{q(name)}/dmesg", params={"lines": 15})["text"])
    except (GridvmError, OSError) as exc:
        return f"(not readable: {exc})"


def _database(c: Client, state: labmod.LabState, lan: str,
              say: Callable[[str], None]) -> str:
    """The demo's database (primary on the victim); its writer VIP."""
    vip = f"{lan}.190"
    c.post("/databases", {"name": "fgdb", "members": 2, "hosts": [VICTIM, "h2"],
                          "ip": f"{lan}.150/24", "vip": f"{vip}:3306", "memory": 448,
                          "ack_timeout": 2.0})
    say("database fgdb: booting its members (fgdb1 on h1, fgdb2 on h2)")
    _wait("database fgdb to be ready",
          lambda: c.get("/databases/fgdb")["phase"] in ("ready", "failed"), 900)
    view = c.get("/databases/fgdb")
    if view["phase"] == "failed":
        raise GridvmError(f"database fgdb: {view['error']}")
    c.post("/databases/fgdb/users", {"user": seqwriter.APP_USER,
                                     "password": seqwriter.APP_PASSWORD, "database": "app"})

    def table() -> None:
        conn = seqwriter.connect(vip, timeout=30)
        with conn.cursor() as cur:
            cur.execute(seqwriter.TABLE)
        conn.close()
    netns.call_in(state.client.ns, table)
    return vip


def run(*, say: Callable[[str], None], warmup: float = 5.0, settle: float = 5.0,
        example: Path = EXAMPLE, db: bool = False) -> dict[str, Any]:
    """Run the whole demo; return the report (see the module docstring)."""
    topo = json.loads((example / "services.json").read_text())
    images = Home.resolve().images
    say("building the tiny guest image (cached after the first run)")
    img = build_tiny(images)
    if db:
        from gridvm.provision.debian import build_debian
        from gridvm.provision.recipe import load_recipe

        say("building the MariaDB image (cached after the first run)")
        build_debian(images, load_recipe(RECIPES / "mariadb.toml"), name="mariadb",
                     base_dir=RECIPES)
    root = Path(tempfile.mkdtemp(prefix="gridvm-fermigrid-"))
    state = labmod.plan(f"fg{os.getpid() % 100000}", 2, root=root / "lab", images=images,
                        accel=os.environ.get("GRIDVM_ACCEL", "auto"), cluster=True, ttl=TTL)
    t_start = time.monotonic()
    say(f"lab {state.name}: two hosts, etcd, lease TTL {TTL}s")
    labmod.up(state)
    lan = ".".join(state.subnet.split(".")[:3])
    clients = {h.name: labmod.client(state, h, 300) for h in state.hosts}
    drivers: dict[str, Driver] = {}
    writer: seqwriter.Writer | None = None
    try:
        names = []
        for fg, host in topo["hosts"].items():
            for n in range(1, 5):
                res = load_config(example / "fermigrid.cfg", {
                    "fg": fg.removeprefix("fg"), "n": str(n), "lan": lan,
                    "image_kernel": str(img.kernel), "image_ramdisk": str(img.ramdisk)})
                cfg = res.config.model_dump(mode="json")
                def create(cfg: dict[str, Any] = cfg, host: str = host) -> bool:
                    return bool(clients["h1"].post("/domains", {"config": cfg},
                                                   params={"host": host}))
                _wait(f"{host} to take {cfg['name']} (hosts join the cluster)", create, 30)
                names.append((cfg["name"], cfg["net"]["ip"], host))
        say(f"booting {len(names)} guests: " + ", ".join(f"{n}@{h}" for n, _, h in names))
        for name, ip, host in names:
            def answers(ip: str = ip) -> bool:
                return bool(httpprobe.get(ip, ns=state.client.ns, timeout=1.0))
            try:
                _wait(f"{name} to answer", answers, 180)
            except GridvmError as exc:
                raise GridvmError(f"{exc}; its console ends:\n" + _console(
                    clients[host], name)) from None
        specs = _spec(topo, lan)
        for spec in specs:
            clients["h1"].post("/services", spec)
        for h, c in clients.items():
            def routed(c: Client = c) -> bool:
                views = c.get("/services")
                return len(views) == len(specs) and all(
                    b["in_rotation"] for v in views for b in v["backends"])
            _wait(f"every service routed on {h}", routed, 60)
        _wait("an owner for every VIP", lambda: all(
            v["vip_owner"] for v in clients["h1"].get("/services")), 30)
        owners_before = {v["name"]: v["vip_owner"] for v in clients["h1"].get("/services")}
        say("VIP owners: " + ", ".join(f"{k}@{v}" for k, v in owners_before.items()))
        db_vip = _database(clients["h1"], state, lan, say) if db else None
        if db_vip is not None:
            writer = seqwriter.Writer(state.client.ns, db_vip)
            writer.start()
        for spec in specs:
            d = Driver(state.client.ns, spec["vip"], spec["port"])
            drivers[spec["name"]] = d
            d.start()
        say(f"client load on every VIP; powering off {VICTIM} in {warmup:g}s")
        time.sleep(warmup)
        t_off = time.monotonic()
        labcluster.poweroff(state, VICTIM)
        survivor = next(h.name for h in state.hosts if h.name != VICTIM)
        c = clients[survivor]
        moved = [n for n, _, h in names if h == VICTIM]
        back: dict[str, dict[str, Any]] = {}

        def all_back() -> bool:
            views = {v["name"]: v for v in c.get("/domains")}
            for name in moved:
                v = views.get(name)
                if name not in back and v and v.get("host") == survivor and \
                        v.get("state") in ("running", "blocked"):
                    back[name] = {"host": survivor,
                                  "running_at_s": round(time.monotonic() - t_off, 1)}
            return len(back) == len(moved) and all(
                any(d.first_from(n, t_off) for d in drivers.values()) for n in moved)

        say(f"{VICTIM} is off; waiting for its HA domains to come back")
        _wait("the HA domains to come back and serve", all_back, 180)
        time.sleep(settle)
        for d in drivers.values():
            d.stop.set()
        for d in drivers.values():
            d.join(timeout=5)
        for name in moved:
            t = min(x for d in drivers.values() if (x := d.first_from(name, t_off)))
            back[name]["serving_at_s"] = round(t - t_off, 1)
        services = {n: d.summary(t_off) for n, d in drivers.items()}
        database = None
        if writer is not None and db_vip is not None:
            writer.halt()
            rows = seqwriter.count_rows(state.client.ns, db_vip)
            got = seqwriter.verify(writer.acked, rows)
            gap, at = writer.longest_gap(t_off - 1)
            view = c.get("/databases/fgdb")
            database = {"acknowledged": got["acked"], "lost": len(got["lost"]),
                        "duplicated": len(got["duplicated"]),
                        "failed_attempts": len(writer.failed),
                        "longest_gap_s": round(gap, 2), "gap_at_s": round(at - t_off, 1),
                        "primary_after": view.get("primary"), "writes": view.get("writes")}
        views = c.get("/services")
        report: dict[str, Any] = {
            "lab": state.name, "ttl_s": TTL, "powered_off": VICTIM,
            "services": services,
            "longest_gap_s": max(s["longest_gap_s"] for s in services.values()),
            "requests": sum(s["sent"] for s in services.values()),
            "failed": sum(s["failed"] for s in services.values()),
            "vip_owners": {"before": owners_before,
                           "after": {v["name"]: v["vip_owner"] for v in views}},
            "ha_domains": back,
            "placement": {v["name"]: v.get("host") for v in c.get("/domains")},
            "database": database,
            "seconds": round(time.monotonic() - t_start, 1),
        }
        return report
    finally:
        for d in drivers.values():
            d.stop.set()
        if writer is not None:
            writer.stop.set()
        for cl in clients.values():
            cl.close()
        say(f"removing lab {state.name}")
        with contextlib.suppress(GridvmError):
            labmod.down(state.name)
        shutil.rmtree(root, ignore_errors=True)


def render(r: dict[str, Any]) -> str:
    """The report as text."""
    lines = [f"FermiGrid-HA: {r['powered_off']} powered off under load "
             f"(lab {r['lab']}, host lease TTL {r['ttl_s']}s)", "",
             f"{'service':<8}{'sent':>7}{'failed':>8}{'(before)':>9}{'fail %':>8}"
             f"{'longest gap':>13}  VIP owner before → after"]
    for name, s in r["services"].items():
        pct = 100 * s["failed"] / s["sent"] if s["sent"] else 0.0
        lines.append(f"{name:<8}{s['sent']:>7}{s['failed']:>8}{s['failed_before']:>9}"
                     f"{pct:>7.2f}%"
                     f"{s['longest_gap_s']:>12.2f}s  {r['vip_owners']['before'][name]} → "
                     f"{r['vip_owners']['after'][name]}")
    pct = 100 * r["failed"] / r["requests"] if r["requests"] else 0.0
    lines += [f"{'all':<8}{r['requests']:>7}{r['failed']:>8}{'':>9}{pct:>7.2f}%"
              f"{r['longest_gap_s']:>12.2f}s", "",
              "HA domains (seconds after the power-off):"]
    for name, b in r["ha_domains"].items():
        lines.append(f"  {name:<7} running on {b['host']} at +{b['running_at_s']}s, "
                     f"serving through its VIP at +{b['serving_at_s']}s")
    d = r.get("database")
    if d:
        lines += ["", f"database fgdb (primary fgdb1 on h1 → {d['primary_after']}): "
                  f"{d['acknowledged']} writes acknowledged, {d['lost']} lost, "
                  f"{d['duplicated']} duplicated; longest write gap {d['longest_gap_s']:.2f}s "
                  f"(at +{d['gap_at_s']}s)", f"  now: {d['writes']}"]
    by_host: dict[str, list[str]] = {}
    for name, host in sorted(r["placement"].items()):
        by_host.setdefault(str(host), []).append(name)
    lines += ["", "final placement: " + "; ".join(f"{h}: {', '.join(ns)}"
                                                  for h, ns in sorted(by_host.items())),
              f"total {r['seconds']}s"]
    return "\n".join(lines)
