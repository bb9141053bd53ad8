"""Noisy neighbour: can one guest hurt another on the same host, and do gridvm's knobs stop it?

A victim (tiny guest, 1 vCPU, busybox httpd on :8080) serves closed-loop HTTP GETs from a
load generator in the bench's own network namespace, across the bridge the bench creates.
An attacker (tiny guest, 2 vCPUs, 256 MiB, a 256 MiB data disk) on the same bridge runs,
in turn:

  cpu       a busy loop on every vCPU
  disk      O_DIRECT dd floods of its data disk (two writers)
  net       bulk TCP into a sink on the host side of the bridge, plus ping -A floods
            (1000-byte echoes) at the victim
  memory    tmpfs fills inside the guest while the host balloons it 256 <-> 192 MiB
  forkbomb  an exponential fork bomb (guest threads-max 1500, so it churns, not dies)

For each attack the victim's request rate and p50/p99 latency are measured (a) alone (the
attacker idle), (b) beside the unconfined attacker and (c) beside the attacker confined by
gridvm's knobs: credit `cap`/`weight`, disk `bps`/`iops`, vif `rate`, `mem-set` (balloon)
and `mem_limit` (the QEMU's memory cgroup). "held" means p99 confined <= 2x p99 alone.

    .venv/bin/python bench/noisy_neighbour.py [--quick] [--json] [--accel tcg|kvm|auto]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import guestlab
from guestlab import GuestShell, Lab

from gridvm.config.model import DiskSpec, DomainConfig, NetParams, Sched, VifSpec
from gridvm.host import procs

PORT = 8080
SINK_PORT = 9000
ATTACKER, VICTIM = "nn-attacker", "nn-victim"
SAVE = "/tmp/gridvm-noisy-neighbour.json"
CAPW = {"cap": 50, "weight": 64, "victim_weight": 1024}

SINK = """
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("{ip}", {port})); srv.listen(16)
def drain(c):
    while c.recv(65536): pass
while True:
    c, _ = srv.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
"""

LOOP = "sh -c '{body}' </dev/null >/dev/null 2>&1 &"


def attack_commands(attack: str, victim_ip: str, bridge_ip: str) -> list[str]:
    """Console commands that start `attack` in the attacker's guest (all in background)."""
    if attack == "cpu":
        return [LOOP.format(body="while :; do :; done")] * 2
    if attack == "disk":
        return [LOOP.format(body=f"while :; do dd if=/dev/zero of=/dev/vda bs=1M count=120 "
                                 f"seek={seek} oflag=direct; done") for seek in (0, 128)]
    if attack == "net":
        return [LOOP.format(body=f"while :; do nc {bridge_ip} {SINK_PORT} </dev/zero; "
                                 "sleep 0.2; done")] * 2 + \
            [f"ping -A -q -s 1000 {victim_ip} </dev/null >/dev/null 2>&1 &"] * 2
    if attack == "memory":
        return [LOOP.format(body=f"while :; do dd if=/dev/zero of=/run/fill{i} bs=1M count=50;"
                                 f" rm -f /run/fill{i}; done") for i in (1, 2)]
    if attack == "forkbomb":
        return ["echo 1500 >/proc/sys/kernel/threads-max",
                "b() { while [ ! -e /tmp/stop ]; do b & done; }",
                "(b) </dev/null >/dev/null 2>&1 &"]
    raise ValueError(attack)


def stop_attack(shell: GuestShell) -> None:
    """Stop everything the attack started: builtins only (a fork bomb leaves no fork)."""
    shell.run(": >/tmp/stop", timeout=60)
    time.sleep(1.0)
    for _ in range(3):
        shell.run("kill -9 -1", timeout=60)   # every process but init and this shell
        time.sleep(0.5)
    shell.run("rm -f /tmp/stop /run/fill*; echo 30000 >/proc/sys/kernel/threads-max",
              timeout=60)


# (label, knobs) per attack; the last entry is the one --quick measures.
CONFINED: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "cpu": [("cap 50 + weight 64/1024", CAPW)],
    "disk": [("bps 4M, iops 100", {"bps": 4 << 20, "iops": 100}),
             ("bps/iops + cap/weight", {"bps": 4 << 20, "iops": 100, **CAPW})],
    "net": [("rate 2Mb/s", {"rate": "2Mb/s"}),
            ("pps 200", {"pps": 200}),
            ("rate + pps + cap/weight", {"rate": "2Mb/s", "pps": 200, **CAPW})],
    "memory": [("mem-set 160 + mem_limit", {"balloon": 160, "mem_limit": 480}),
               ("mem + cap/weight", {"balloon": 160, "mem_limit": 480, **CAPW})],
    "forkbomb": [("cap 50 + weight 64/1024", CAPW)],
}


class Bench:
    def __init__(self, lab: Lab, seconds: float, settle: float,
                 say: Callable[[str], None]) -> None:
        self.lab, self.seconds, self.settle, self.say = lab, seconds, settle, say
        self.c = lab.client
        self.victim_ip = f"{lab.subnet}.10"
        self.attacker_ip = f"{lab.subnet}.11"

    def start_guests(self) -> None:
        img = self.lab.image
        disk = self.lab.work / "attacker.raw"
        procs.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "256M"])

        def cfg(name: str, ip: str, **kw: Any) -> DomainConfig:
            return DomainConfig(name=name, kernel=str(img.kernel), ramdisk=str(img.ramdisk),
                                vifs=[VifSpec(bridge="xenbr0")],
                                net=NetParams(ip=ip, netmask="255.255.255.0", hostname=name),
                                **kw)

        self.victim = self.lab.boot(cfg(VICTIM, self.victim_ip, memory=128))
        self.attacker = self.lab.boot(cfg(
            ATTACKER, self.attacker_ip, memory=256, maxmem=256, vcpus=2,
            disks=[DiskSpec(target=str(disk), vdev="xvda")]))
        self.victim.run(f"mkdir -p /tmp/www && echo victim >/tmp/www/index.html && "
                        f"httpd -p {PORT} -h /tmp/www")
        self.sink = self.lab.spawn_in_ns(sys.executable, "-c", SINK.format(
            ip=self.lab.bridge_ip, port=SINK_PORT))

    def measure(self) -> dict[str, Any]:
        time.sleep(self.settle)
        r = guestlab.load(self.lab.ns, self.victim_ip, PORT, self.seconds)
        r["load1"] = guestlab.load1()
        return r

    # ----- knobs, through the same API the CLI uses --------------------------------------

    def confine(self, knobs: dict[str, Any]) -> None:
        a, v = f"/domains/{ATTACKER}", f"/domains/{VICTIM}"
        if "cap" in knobs:
            self.c.post(f"{a}/sched-credit", {"cap": knobs["cap"], "weight": knobs["weight"]})
            self.c.post(f"{v}/sched-credit", {"weight": knobs["victim_weight"]})
        if "bps" in knobs:
            self.c.post(f"{a}/block-throttle/xvda", {"bps": knobs["bps"], "iops": knobs["iops"]})
        if "rate" in knobs:
            self.c.post(f"{a}/network-rate/0", {"rate": knobs["rate"]})
        if "pps" in knobs:
            self.c.post(f"{a}/network-pps/0", {"pps": knobs["pps"]})
        if "balloon" in knobs:
            self.c.post(f"{a}/mem-set", {"mb": knobs["balloon"]})
            self.c.post(f"{a}/mem-limit", {"mb": knobs["mem_limit"]})

    def unconfine(self) -> None:
        a, v = f"/domains/{ATTACKER}", f"/domains/{VICTIM}"
        d = Sched()
        self.c.post(f"{a}/sched-credit", {"cap": d.cap, "weight": d.weight})
        self.c.post(f"{v}/sched-credit", {"weight": d.weight})
        self.c.post(f"{a}/block-throttle/xvda", {"bps": 0, "iops": 0})
        self.c.post(f"{a}/network-rate/0", {"rate": None})
        self.c.post(f"{a}/network-pps/0", {"pps": None})
        self.c.post(f"{a}/mem-limit", {"mb": 0})
        self.c.post(f"{a}/mem-set", {"mb": 256})

    @contextlib.contextmanager
    def attacking(self, attack: str, balloon: bool) -> Iterator[None]:
        for cmd in attack_commands(attack, self.victim_ip, self.lab.bridge_ip):
            self.attacker.run(cmd, timeout=60)
        stop = threading.Event()
        toggler = threading.Thread(target=self._balloon, args=(stop,), daemon=True)
        if attack == "memory" and balloon:
            toggler.start()
        try:
            yield
        finally:
            stop.set()
            if toggler.is_alive():
                toggler.join(timeout=30)
            stop_attack(self.attacker)

    def _balloon(self, stop: threading.Event) -> None:
        """The host side of the memory attack: the balloon swings 256 <-> 192 MiB."""
        size = 192
        while not stop.wait(1.0):
            with contextlib.suppress(Exception):
                self.c.post(f"/domains/{ATTACKER}/mem-set", {"mb": size})
            size = 448 - size

    def run(self, attacks: list[str], quick: bool, rounds: int) -> list[dict[str, Any]]:
        """Each attack: `rounds` interleaved rounds of alone / unconfined / each confinement
        (machine noise then falls on every phase alike); latencies merged per phase."""
        rows: list[dict[str, Any]] = []
        for attack in attacks:
            settings = CONFINED[attack][-1:] if quick else CONFINED[attack]
            runs: dict[str, list[dict[str, Any]]] = {}
            for _ in range(rounds):
                runs.setdefault("alone", []).append(self.measure())
                with self.attacking(attack, balloon=True):
                    runs.setdefault("unconfined", []).append(self.measure())
                for label, knobs in settings:
                    self.confine(knobs)
                    try:
                        with self.attacking(attack, balloon="balloon" not in knobs):
                            runs.setdefault(label, []).append(self.measure())
                    finally:
                        self.unconfine()
                self.say(f"{attack}: " + ", ".join(
                    f"{k} p99 {v[-1]['p99_ms']} ms" for k, v in runs.items()))
            merged = {k: guestlab.merge(v) for k, v in runs.items()}
            confined = [dict(merged[label], knobs=label) for label, _ in settings]
            alone = merged["alone"]
            held = [m for m in confined if m["p99_ms"] <= 2 * alone["p99_ms"] and m["rps"] > 0]
            rows.append({"attack": attack, "alone": alone, "unconfined": merged["unconfined"],
                         "confined": confined, "held": bool(held),
                         "held_by": [m["knobs"] for m in held]})
        return rows


def print_table(result: dict[str, Any]) -> None:
    print(f"Noisy neighbour: victim HTTP (busybox httpd, 1 vCPU) beside an attacker (2 vCPUs); "
          f"accel {result['accel']}, {os.cpu_count()} host CPUs, {result['seconds']:.0f}s "
          f"per phase")
    if result["accel"] != "kvm":
        print(f"TCG = software emulation, not hardware virtualization; KVM probe: "
              f"{result['accel_reason']}")
    print(f"load average: {result['load_before']} (start), {result['load_after']} (end)"
          f"{'  -- MEASURED UNDER LOAD (>2.5)' if result['under_load'] else ''}")
    head = f"{'attack':<9}{'phase':<26}{'req/s':>7}{'p50 ms':>9}{'p99 ms':>9}{'p99/alone':>10}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        base = r["alone"]["p99_ms"] or float("nan")
        phases = [("alone", r["alone"]), ("unconfined", r["unconfined"])]
        phases += [(m["knobs"], m) for m in r["confined"]]
        for i, (label, m) in enumerate(phases):
            err = f"  ({m['errors']} errors)" if m["errors"] else ""
            print(f"{r['attack'] if i == 0 else '':<9}{label:<26}{m['rps']:>7.1f}"
                  f"{m['p50_ms']:>9.1f}{m['p99_ms']:>9.1f}{m['p99_ms'] / base:>9.2f}x{err}")
        print(f"{'':<9}" + (f"held by: {'; '.join(r['held_by'])}" if r["held"] else
                            "NOT held (p99 confined > 2x alone)"))


def run_bench(*, quick: bool, accel: str = "auto", attacks: list[str] | None = None,
              say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The whole experiment; a dict of figures (also what --json prints)."""
    seconds, settle, rounds = (4.0, 1.0, 1) if quick else (5.0, 1.5, 2)
    load_before = guestlab.loadavg()
    with guestlab.lab(accel) as lab:
        bench = Bench(lab, seconds, settle, say)
        bench.start_guests()
        try:
            info = lab.client.get("/info")
            real_accel, accel_reason = info["accel"], info["accel_reason"]
            rows = bench.run(attacks or list(CONFINED), quick, rounds)
        finally:
            bench.sink.kill()
            bench.sink.wait(timeout=10)
            bench.victim.close()
            bench.attacker.close()
    load_after = guestlab.loadavg()
    under = max(float(load_before.split(",")[0]), float(load_after.split(",")[0])) > 2.5
    return {"accel": real_accel, "accel_reason": accel_reason, "seconds": seconds * rounds,
            "quick": quick, "rows": rows,
            "load_before": load_before, "load_after": load_after, "under_load": under}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short phases, one confinement each")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--save", default=SAVE, help="also write the JSON figures here "
                    "(bench/popek_goldberg.py reads them for its control row)")
    ap.add_argument("--attack", action="append", choices=list(CONFINED),
                    help="only these attacks (repeatable)")
    args = ap.parse_args()
    say: Callable[[str], None] = (lambda m: None) if args.json else (
        lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    result = run_bench(quick=args.quick, accel=args.accel, attacks=args.attack, say=say)
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    result["command"] = " ".join(["bench/noisy_neighbour.py", *sys.argv[1:]])
    if args.save:
        with contextlib.suppress(OSError), open(args.save, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"(whole run {result['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
