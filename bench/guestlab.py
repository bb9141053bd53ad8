"""Shared by bench/noisy_neighbour.py and bench/popek_goldberg.py: one gridvmd in a private
network namespace with a bridge, tiny guests driven over their serial consoles, an HTTP load
generator run inside that namespace, and the host's load average.

All traffic stays inside the namespace the bench creates (its bridge and the guests on it).

    python bench/guestlab.py loadgen HOST PORT SECONDS CONCURRENCY   (used by the benches)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import network  # bench/network.py: shell commands over a serial console

from gridvm.api.client import Client
from gridvm.config.model import DomainConfig
from gridvm.host import netdevs, netns
from gridvm.images.store import ImageInfo
from gridvm.images.tiny import build_tiny
from gridvm.lab.agent import Agent
from gridvm.paths import Home
from gridvm.qemu.accel import probe_kvm


class GuestShell(network.GuestShell):
    """network.GuestShell that says what the console showed when a command times out."""

    def run(self, cmd: str, timeout: float = 300) -> str:
        tag = os.urandom(4).hex()
        self.sock.sendall(f"{cmd}\necho END{tag}''DONE\n".encode())
        marker = f"END{tag}DONE".encode()
        buf = b""
        deadline = time.monotonic() + timeout
        while marker not in buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest command timed out: {cmd[:80]}; console: "
                                   f"{buf[-300:].decode(errors='replace')!r}")
            with contextlib.suppress(TimeoutError):
                buf += self.sock.recv(65536)
        return buf.decode(errors="replace")


__all__ = ["GuestShell", "Lab", "lab", "load", "loadavg", "percentiles", "kvm_probe"]


def loadavg() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def kvm_probe(image: ImageInfo) -> tuple[bool, str]:
    """gridvm's own KVM probe: boot the probe guest under KVM (a device node proves nothing)."""
    binary = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    return probe_kvm(binary, Path(image.kernel), Path(image.ramdisk))


@dataclass
class Lab:
    """A gridvmd (TCG or KVM) in namespace `ns`, its bridge `xenbr0` at `subnet`.1."""

    agent: Agent
    ns: str
    subnet: str
    image: ImageInfo
    work: Path
    client: Client

    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet}.1"

    def boot(self, cfg: DomainConfig, timeout: float = 180) -> GuestShell:
        """Create a domain and return a shell on its console once its init is ready."""
        self.client.post("/domains", {"config": cfg.model_dump(mode="json")})
        deadline = time.monotonic() + timeout
        while "gridvm-guest: ready" not in self.client.get(
                f"/domains/{cfg.name}/dmesg", params={"lines": 5000})["text"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cfg.name} did not boot")
            time.sleep(0.3)
        shell = GuestShell(Path(self.client.get(f"/domains/{cfg.name}/console")["socket"]))
        for _ in range(20):
            with contextlib.suppress(TimeoutError):
                shell.run("true", timeout=3)
                return shell
        raise TimeoutError(f"{cfg.name}: no shell on the console")

    def run_in_ns(self, *argv: str, timeout: float = 600) -> str:
        return subprocess.run([*netns.exec_prefix(self.ns), *argv], check=True,
                              capture_output=True, text=True, timeout=timeout).stdout

    def spawn_in_ns(self, *argv: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*netns.exec_prefix(self.ns), *argv],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def lab(accel: str = "tcg", subnet_octet: int = 57) -> Iterator[Lab]:
    """A namespace, a bridge in it and a gridvmd; everything removed at the end."""
    image = build_tiny(Home.resolve().images)
    ns = f"gvbn{os.getpid()}"
    subnet = f"10.{subnet_octet}.{os.getpid() % 250}"
    work = Path(tempfile.mkdtemp(prefix="gridvm-bench-"))
    agent = Agent(work / "home", ns=ns, accel=accel, images=Home.resolve().images)
    # a bench stopped by `timeout` or ^C still tears its namespace and guests down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    netns.create(ns)
    client: Client | None = None
    try:
        netns.call_in(ns, lambda: netdevs.host_bridge("xenbr0", f"{subnet}.1/24"))
        netns.call_in(ns, lambda: netdevs.set_up("lo"))
        agent.start()
        client = Client(agent.home, timeout=300)
        yield Lab(agent, ns, subnet, image, work, client)
    finally:
        if client is not None:
            client.close()
        with contextlib.suppress(Exception):
            agent.destroy_all()
        agent.stop()
        with contextlib.suppress(Exception):
            from gridvm.host.resources import remove_home_groups
            remove_home_groups(agent.home)
        netns.remove(ns)
        shutil.rmtree(work, ignore_errors=True)


# ----- HTTP load from inside the namespace ---------------------------------------------------


def load(ns: str, host: str, port: int, seconds: float, concurrency: int = 2) -> dict[str, Any]:
    """Closed-loop HTTP/1.0 GETs of / for `seconds`, run in `ns` by a child process."""
    out = subprocess.run([*netns.exec_prefix(ns), sys.executable, __file__, "loadgen", host,
                          str(port), str(seconds), str(concurrency)], check=True,
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def percentiles(lat: list[float]) -> tuple[float, float]:
    """p50 and p99 of latencies (seconds)."""
    if len(lat) < 2:
        return (lat[0], lat[0]) if lat else (float("nan"), float("nan"))
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return q[49], q[98]


def _loadgen(host: str, port: int, seconds: float, concurrency: int) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    end = time.monotonic() + seconds
    request = f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()

    def worker() -> None:
        nonlocal errors
        while time.monotonic() < end:
            t0 = time.monotonic()
            ok = False
            try:
                with socket.create_connection((host, port), timeout=2.0) as s:
                    s.settimeout(2.0)
                    s.sendall(request)
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                    ok = data.startswith(b"HTTP/1.") and b" 200 " in data[:16]
            except OSError:
                ok = False
            dt = time.monotonic() - t0
            with lock:
                lat.append(dt)  # failures count at the time they took (up to the timeout)
                errors += not ok
            if not ok:
                time.sleep(0.05)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    p50, p99 = percentiles(lat)
    return {"requests": len(lat) - errors, "errors": errors, "seconds": round(wall, 2),
            "rps": round((len(lat) - errors) / wall, 1), "p50_ms": round(p50 * 1000, 1),
            "p99_ms": round(p99 * 1000, 1), "lat_ms": [round(x * 1000, 2) for x in lat]}


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several load runs as one: rates over total time, percentiles over all latencies."""
    lat = [x for r in runs for x in r["lat_ms"]]
    ok, secs = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)
    p50, p99 = percentiles(lat)
    return {"requests": ok, "errors": sum(r["errors"] for r in runs), "seconds": round(secs, 2),
            "rps": round(ok / secs, 1) if secs else 0.0, "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1), "load1": max(r.get("load1", 0.0) for r in runs)}


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "loadgen":
        print(json.dumps(_loadgen(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]),
                                  int(sys.argv[5]))))
    else:
        print(__doc__)
