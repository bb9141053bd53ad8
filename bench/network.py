"""Guest-to-guest TCP throughput over gridvm networks, each against namespace-to-namespace
over the same path, measured side by side in one run.

Paths (in a two-host lab made for the run, removed at the end):
  bridge   guest A → guest B, both on h1's bridge network xenbr0
  lan      guest A (h1) → guest C (h2), across the lab LAN
  nat      guest C (h2) → guest N on h1's NAT network, over a connection N opened
           (masqueraded by h1)

The baseline of each path swaps every guest for a network namespace plugged into the same
bridge (a veth where the guest has a tap), with the same addresses and routes.

The tiny guest has no iperf, and busybox's small nc stops at the peer's half-close, so
each transfer is one HTTP GET with busybox (`httpd` serving a sparse file of zeros,
`wget -O - | wc -c` checking the byte count), driven in guests over their serial consoles
and in namespaces with the host's busybox. Throughput is bytes over wall-clock time on the
host, connection set-up and teardown included.

    .venv/bin/python bench/network.py [--accel auto|kvm|tcg] [--seconds 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gridvm.api.client import Client
from gridvm.config.model import DomainConfig, NetParams, VifSpec
from gridvm.host import netdevs, netns
from gridvm.images.tiny import build_tiny
from gridvm.lab import lab as labmod
from gridvm.paths import Home

PORT = 5001
NAT_SUBNET = ipaddress.IPv4Network("10.88.9.0/24")


class GuestShell:
    """Run shell commands in a guest over its serial console."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0.2)

    def run(self, cmd: str, timeout: float = 300) -> str:
        tag = uuid.uuid4().hex[:8]
        # The quotes keep the echoed command line from matching the marker.
        self.sock.sendall(f"{cmd}\necho END{tag}''DONE\n".encode())
        marker = f"END{tag}DONE".encode()
        buf = b""
        deadline = time.monotonic() + timeout
        while marker not in buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest command timed out: {cmd}")
            with contextlib.suppress(TimeoutError):
                buf += self.sock.recv(65536)
        return buf.decode(errors="replace")

    def close(self) -> None:
        self.sock.close()


class Endpoint:
    """One side of a transfer: a guest (over its console) or a namespace (host busybox).

    The receiver fetches; the sender is a busybox httpd serving a sparse file of zeros.
    """

    def __init__(self, ip: str, *, shell: GuestShell | None = None, ns: str | None = None,
                 www: Path | None = None) -> None:
        self.ip, self.shell, self.ns, self.www = ip, shell, ns, www
        self.serving = False

    def serve(self, mbytes: int) -> None:
        """Serve http://IP:PORT/MBYTES, a file of that many MiB."""
        if self.shell:
            self.shell.run(f"mkdir -p /tmp/www && truncate -s {mbytes}M /tmp/www/{mbytes}")
            if not self.serving:
                self.shell.run(f"httpd -p {PORT} -h /tmp/www")
        else:
            assert self.ns is not None and self.www is not None
            self.www.mkdir(parents=True, exist_ok=True)
            (self.www / str(mbytes)).touch()
            os.truncate(self.www / str(mbytes), mbytes << 20)
            if not self.serving:
                subprocess.Popen([*netns.exec_prefix(self.ns), "busybox", "httpd", "-f", "-p",
                                  str(PORT), "-h", str(self.www)])
        self.serving = True

    def fetch(self, src: str, mbytes: int) -> float:
        """GET MBYTES MiB from src; seconds on the host's clock (the byte count is checked)."""
        cmd = f"wget -q -O - http://{src}:{PORT}/{mbytes} | wc -c"
        t0 = time.monotonic()
        if self.shell:
            out = self.shell.run(cmd).splitlines()
            got = next((ln.strip() for ln in reversed(out) if ln.strip().isdigit()), "0")
        else:
            assert self.ns is not None
            got = subprocess.run(
                [*netns.exec_prefix(self.ns), "busybox", "sh", "-c",
                 cmd.replace("wget", "busybox wget").replace("wc", "busybox wc")],
                check=True, timeout=600, capture_output=True, text=True).stdout.strip()
        elapsed = time.monotonic() - t0
        if int(got) != mbytes << 20:
            raise RuntimeError(f"fetched {got} bytes from {src}, expected {mbytes << 20}")
        return elapsed


def measure(src: Endpoint, dst: Endpoint, seconds: float) -> float:
    """Throughput src → dst in Mbit/s; a short probe sizes a transfer of about `seconds`."""
    mbytes = 4
    for _ in range(6):
        src.serve(mbytes)
        elapsed = dst.fetch(src.ip, mbytes)
        if elapsed >= seconds * 0.6 or mbytes >= 65536:
            break
        mbytes = min(65536, max(mbytes * 2, int(mbytes * seconds / max(elapsed, 0.01))))
    return mbytes * 8 * 1.048576 / elapsed


@contextlib.contextmanager
def stand_in(host_ns: str, bridge: str, name: str, address: str,
             gateway: str | None = None) -> Iterator[str]:
    """A namespace with a veth into `bridge` of `host_ns`: a guest's place, without a guest."""
    netns.create(name)
    port = f"si{abs(hash(name)) % 10**6}"
    try:
        def plug() -> None:
            netdevs.veth(port, "eth0", name)
            netdevs.set_master(port, bridge)

        def inside() -> None:
            netdevs.set_up("lo")
            netdevs.add_address("eth0", ipaddress.IPv4Interface(address))
            netdevs.set_up("eth0")
            if gateway:
                netdevs.add_route("eth0", netdevs.Route("default", gateway))

        netns.call_in(host_ns, plug)
        netns.call_in(name, inside)
        yield name
    finally:
        for pid in labmod.namespace_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        netns.remove(name)


def boot(c: Client, image: Any, name: str, bridge: str, ip: str | None,
         prefix: int, gateway: str | None = None) -> GuestShell:
    cfg = DomainConfig(name=name, memory=128, kernel=str(image.kernel),
                       ramdisk=str(image.ramdisk), vifs=[VifSpec(bridge=bridge)],
                       net=NetParams(ip=ip, hostname=name, gateway=gateway,
                                     netmask=str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}")
                                                 .netmask) if ip else None))
    c.post("/domains", {"config": cfg.model_dump(mode="json")})
    deadline = time.monotonic() + 180
    while "gridvm-guest: ready" not in c.get(f"/domains/{name}/dmesg",
                                             params={"lines": 5000})["text"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not boot")
        time.sleep(0.3)
    # Only now: a connected console that nobody reads stalls the guest's serial output.
    shell = GuestShell(Path(c.get(f"/domains/{name}/console")["socket"]))
    for _ in range(20):  # the console shell starts just after the ready line
        with contextlib.suppress(TimeoutError):
            shell.run("true", timeout=3)
            return shell
    raise TimeoutError(f"{name}: no shell on the console")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--seconds", type=float, default=3.0, help="target length of a transfer")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    home = Home.resolve()
    image = build_tiny(home.images)
    name = f"bn{os.getpid() % 100000}"
    state = labmod.plan(name, 2, root=Path(f"/tmp/gridvm-bench-{name}"), images=home.images,
                        accel=args.accel)
    say: Callable[[str], None] = (lambda m: None) if args.json else (
        lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    labmod.up(state)
    say(f"lab up in {time.monotonic() - t0:.1f}s")
    lan = ipaddress.IPv4Network(state.subnet)
    ip = {k: str(lan.network_address + n) for k, n in
          (("A", 101), ("B", 102), ("C", 103), ("sA", 201), ("sB", 202), ("sC", 203))}
    h1, h2 = (Client(Home(Path(h.home)), timeout=300) for h in state.hosts)
    results: list[dict[str, Any]] = []
    try:
        h1.post("/networks", {"name": "nat9", "mode": "nat", "subnet": str(NAT_SUBNET)})
        gw = str(NAT_SUBNET.network_address + 1)
        say("booting 4 guests")
        shells = {
            "A": boot(h1, image, "A", "xenbr0", ip["A"], lan.prefixlen),
            "B": boot(h1, image, "B", "xenbr0", ip["B"], lan.prefixlen),
            "C": boot(h2, image, "C", "xenbr0", ip["C"], lan.prefixlen),
            "N": boot(h1, image, "N", "nat9", None, NAT_SUBNET.prefixlen),
        }
        accel = h1.get("/info")["accel"]
        ns1, ns2 = state.hosts[0].ns, state.hosts[1].ns
        lanp = f"/{lan.prefixlen}"
        with stand_in(ns1, "xenbr0", f"{name}-sA", ip["sA"] + lanp) as sa, \
                stand_in(ns1, "xenbr0", f"{name}-sB", ip["sB"] + lanp) as sb, \
                stand_in(ns2, "xenbr0", f"{name}-sC", ip["sC"] + lanp) as sc, \
                stand_in(ns1, "nat9", f"{name}-sN", f"{NAT_SUBNET.network_address + 200}/24",
                         gw) as sn:
            g = {k: Endpoint(ip.get(k, ""), shell=sh) for k, sh in shells.items()}
            www = Path(state.root) / "www"
            s = {k: Endpoint(ip.get(f"s{k}", ""), ns=n, www=www / k)
                 for k, n in (("A", sa), ("B", sb), ("C", sc), ("N", sn))}
            for path, src, dst, what in (
                    ("bridge", "A", "B", "guest A → guest B on h1's bridge network"),
                    ("lan", "A", "C", "guest A (h1) → guest C (h2) across the LAN"),
                    ("nat", "C", "N", "guest C (h2) → NAT guest N on h1, N connecting")):
                say(f"{path}: {what}")
                guest = measure(g[src], g[dst], args.seconds)
                host = measure(s[src], s[dst], args.seconds)
                results.append({"path": path, "what": what, "guest_mbit": round(guest, 1),
                                "namespace_mbit": round(host, 1),
                                "ratio": round(guest / host, 4)})
        for sh in shells.values():
            sh.close()
    finally:
        h1.close()
        h2.close()
        labmod.down(name)
    if args.json:
        print(json.dumps({"accel": accel, "results": results}, indent=2))
        return
    print(f"TCP throughput (one HTTP GET, busybox), {accel} guests vs namespaces on the "
          "same path")
    print(f"{'path':<8}{'guest→guest':>16}{'ns→ns':>16}{'ratio':>9}")
    for r in results:
        print(f"{r['path']:<8}{r['guest_mbit']:>11.1f} Mb/s{r['namespace_mbit']:>11.1f} Mb/s"
              f"{r['ratio']:>9.3f}")


if __name__ == "__main__":
    main()
