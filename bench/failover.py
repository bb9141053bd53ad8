"""Failover benchmark: host power loss → its HA domain answering HTTP again on another host.

    sudo .venv/bin/python bench/failover.py [--trials 5] [--ttl 3] [--margin 1]

Makes a 3-host lab cluster (etcd in its own namespace, every host's lease TTL = --ttl),
creates one HA domain, then per trial pulls the plug on the host running it (`lab
poweroff`: link cut, gridvmd, watchdog and QEMUs SIGKILLed), times until the guest answers
HTTP again from the lab's client namespace with a new boot id, and powers the host back on.
The HA manager's own host is hit as well when the domain lands there. Prints every trial,
the median and the max, and where the time goes, read from etcd as it happens (a watcher in
the lab's etcd namespace, with the lab's certificate):

    detection    power-off → the host's lease expired (`alive/<host>` gone)
    fencing      → the HA manager marked it fenced (its margin, then the fence)
    placement    → the domain's registry record names its new host
    QEMU start   → the record says running (gridvmd on the new host started QEMU)
    boot+answer  → the guest answers HTTP with a new boot id

The lab's hosts are separate machines (own network and mount namespaces) reached over
mutual TLS. All traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gridvm.cluster.etcd import Etcd, EtcdError
from gridvm.host import httpprobe, netns
from gridvm.images.tiny import build_tiny
from gridvm.lab import cluster as labcluster
from gridvm.lab import lab as labmod
from gridvm.lab import pki as labpki

PHASES = ("detection", "fencing", "placement", "QEMU start", "boot+answer")

IMAGES = Path(os.environ.get("GRIDVM_TEST_IMAGES", "/var/cache/gridvm/test-images"))
LAB = "fobench"
GUEST_IP = "10.77.0.150"


def gridvm(home: Path, *args: str, host: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRIDVM_HOST"}
    env.update(GRIDVM_HOME=str(home), GRIDVM_IMAGES=str(IMAGES))
    argv = [sys.executable, "-m", "gridvm", *(["--host", f"{LAB}/{host}"] if host else []),
            *args]
    proc = subprocess.run(argv, env=env, text=True, capture_output=True, timeout=180)
    if proc.returncode != 0:
        raise SystemExit(f"gridvm {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def hosts(home: Path, via: str) -> dict[str, Any]:
    return {r["name"]: r for r in json.loads(gridvm(home, "host", "list", "--json", host=via))}


def wait(what: str, fn: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except (OSError, SystemExit):
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Watcher:
    """Polls etcd (every 20 ms) during one failover and notes when each phase ended."""

    def __init__(self, state: labmod.LabState) -> None:
        self.state = state
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, victim: str, uuid: str) -> None:
        self.marks.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=lambda: netns.call_in(
            self.state.etcd.ns if self.state.etcd else "", lambda: self._poll(victim, uuid)),
            daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        return dict(self.marks)

    def _poll(self, victim: str, uuid: str) -> None:
        root = Path(self.state.root)
        etcd = Etcd(labcluster.etcd_url(self.state), timeout=1,
                    tls=labpki.admin(root).client_context())
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    if "detection" not in self.marks and \
                            etcd.get(f"/gridvm/alive/{victim}") is None:
                        self.marks["detection"] = now
                    if "fencing" not in self.marks and \
                            etcd.get(f"/gridvm/fenced/{victim}") is not None:
                        self.marks["fencing"] = now
                    rec = etcd.get_json(f"/gridvm/domains/{uuid}") or {}
                    if "placement" not in self.marks and rec.get("host") not in (None, victim):
                        self.marks["placement"] = now
                    if "placement" in self.marks and "QEMU start" not in self.marks and \
                            rec.get("state") == "running":
                        self.marks["QEMU start"] = now
                except EtcdError:
                    pass
                time.sleep(0.02)
        finally:
            etcd.close()


def phases(t0: float, marks: dict[str, float], done: float) -> dict[str, float]:
    """Each phase's length in seconds (a phase not seen lasts 0 and the next takes it)."""
    out, last = {}, t0
    for name in PHASES:
        end = done if name == "boot+answer" else marks.get(name, last)
        out[name] = max(end - last, 0.0)
        last = max(end, last)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--ttl", type=int, default=3)
    parser.add_argument("--margin", type=float, default=1.0)
    args = parser.parse_args()
    img = build_tiny(IMAGES)
    tmp = Path(tempfile.mkdtemp(prefix="gridvm-failover-"))
    home = tmp / "home"
    gridvm(home, "lab", "up", "--hosts", "3", "--cluster", "--ttl", str(args.ttl),
           "--margin", str(args.margin),
           "--name", LAB, "--accel", "tcg")
    client_ns = labmod.load(LAB).client.ns

    def bootid() -> str:
        return str(httpprobe.get(GUEST_IP, "/bootid", ns=client_ns, timeout=0.5))

    times: list[float] = []
    parts: list[dict[str, float]] = []
    watcher = Watcher(labmod.load(LAB))
    try:
        cfg = tmp / "fo.cfg"
        cfg.write_text(f'name = "fo"\nmemory = 96\nkernel = "{img.kernel}"\n'
                       f'ramdisk = "{img.ramdisk}"\nvif = [ "bridge=xenbr0" ]\n'
                       f'ip = "{GUEST_IP}"\nnetmask = "255.255.255.0"\nhostname = "fo"\n'
                       'ha = "restart"\n')
        gridvm(home, "create", str(cfg), host="h1")
        boot = wait("the guest", bootid)
        for trial in range(1, args.trials + 1):
            views = json.loads(gridvm(home, "list", "--json", host="h1" if trial % 2 else "h2"))
            victim = next(v["host"] for v in views if v["name"] == "fo")
            via = next(h for h in ("h1", "h2", "h3") if h != victim)
            uuid = next(v["uuid"] for v in views if v["name"] == "fo")
            was_leader = hosts(home, via)[victim]["leader"]
            watcher.start(victim, uuid)
            t0 = time.monotonic()
            gridvm(home, "lab", "poweroff", victim, "--name", LAB)
            boot = wait("failover", lambda b=boot: (lambda n: n if n != b else None)(bootid()))
            done = time.monotonic()
            took = done - t0
            times.append(took)
            parts.append(phases(t0, watcher.stop(), done))
            now = next(v["host"] for v in json.loads(gridvm(home, "list", "--json", host=via))
                       if v["name"] == "fo")
            print(f"trial {trial}: {victim}{' (HA manager)' if was_leader else ''} lost power"
                  f" → fo answers from {now} after {took:.2f} s ("
                  + ", ".join(f"{k} {v:.2f}" for k, v in parts[-1].items()) + ")", flush=True)
            gridvm(home, "lab", "poweron", victim, "--name", LAB)
            wait("the host back up", lambda v=victim, w=via: hosts(home, w)[v]["state"] == "up")
    finally:
        gridvm(home, "lab", "down", "--name", LAB)
    print(f"lease TTL {args.ttl} s, HA margin {args.margin} s, TCG guest boot included: "
          f"median {statistics.median(times):.2f} s, max {max(times):.2f} s "
          f"over {len(times)} trials (target ≤ 5 s median)")
    print("median per phase: " + ", ".join(
        f"{k} {statistics.median(p[k] for p in parts):.2f} s" for k in PHASES))


if __name__ == "__main__":
    main()
