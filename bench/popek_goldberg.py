"""Popek and Goldberg's three properties of a virtual machine monitor, measured on gridvm.

  equivalence  the same deterministic programs (integer and floating-point arithmetic, a
               memory fill, a file written and read back) give identical output in a guest
               and on the host. Both run the *same* busybox binary (the tiny guest's
               initramfs is built from the host's busybox-static); outputs compared by
               SHA-256.
  control      the guest cannot take the host's resources from another guest: the summary
               of bench/noisy_neighbour.py (its saved JSON, or a --quick run made here).
  efficiency   guest speed over host speed (median of 3 alternating runs; 1 with --quick)
               for CPU (awk loop), memory bandwidth (dd /dev/zero -> /dev/null), disk
               (O_DIRECT writes, virtio disk vs a file on the same host filesystem) and
               network (HTTP GET of 256 MiB from the host side of the bridge vs the same GET
               inside the host namespace); on TCG here, and on KVM
               when gridvm's KVM probe boots a guest.

Guest commands time themselves with /proc/uptime (10 ms ticks; every guest run lasts well
over a second); host runs are timed by the bench around the same command line.

    .venv/bin/python bench/popek_goldberg.py [--quick] [--json] [--control FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import guestlab
import noisy_neighbour
from guestlab import GuestShell, Lab

from gridvm.config.model import DiskSpec, DomainConfig, NetParams, VifSpec
from gridvm.host import procs
from gridvm.images.tiny import build_tiny
from gridvm.paths import Home

APPLETS = ("awk", "sha256sum", "md5sum", "dd", "head", "cut", "wget", "cat", "sh", "rm")
HTTP_PORT = 8081

# name -> (what, command); NITER is filled per mode. Each prints its result on stdout.
EQUIVALENCE = {
    "integer": ("awk integer hash loop",
                "awk 'BEGIN{h=0;for(i=1;i<=NITER;i++){h=(h*31+i)%1000000007};print h}'"),
    "float": ("awk double-precision sums",
              "awk 'BEGIN{s=0;x=1;for(i=1;i<=NITER;i++){s+=1/(i*i)-0.5/(i+0.25);"
              "x=x*1.0000003+1/i};printf \"%.15e %.15e\\n\",s,x}'"),
    "memory": ("awk array fill, then sha256",
               "awk 'BEGIN{for(i=0;i<NITER;i++)a[i]=(i*2654435761)%4294967296;"
               "for(i=0;i<NITER;i++)print a[i]}' | sha256sum"),
    "file": ("2 MiB written O_DIRECT, read back, md5",
             "awk 'BEGIN{for(i=0;i<150000;i++)print i, i*i, 3*i}' | head -c 2097152 | "
             "dd of=TARGET bs=64k oflag=direct conv=fsync 2>/dev/null; "
             "dd if=TARGET bs=64k count=32 iflag=direct 2>/dev/null | md5sum"),
}


def efficiency_commands(n_cpu: int, mem_mb: int, disk_mb: int, url: str) -> dict[str, str]:
    return {
        "cpu": f"awk 'BEGIN{{h=0;for(i=1;i<={n_cpu};i++){{h=(h*31+i)%1000000007}};print h}}'"
               " >/dev/null",
        "memory": f"dd if=/dev/zero of=/dev/null bs=1M count={mem_mb} 2>/dev/null",
        "disk": f"dd if=/dev/zero of=TARGET bs=1M count={disk_mb} oflag=direct 2>/dev/null",
        "network": f"wget -q -O /dev/null {url}",
    }


class Host:
    """The host side: the same busybox applets first on PATH, run in the bench's namespace."""

    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab, self.bin = lab, work / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        for applet in APPLETS:
            link = self.bin / applet
            if not link.exists():
                link.symlink_to("/bin/busybox")
        self.target = work / "host-disk.raw"
        procs.run(["qemu-img", "create", "-q", "-f", "raw", str(self.target), "256M"])

    def run(self, cmd: str) -> tuple[str, float]:
        env = dict(os.environ, PATH=f"{self.bin}:/usr/bin:/bin")
        t0 = time.monotonic()
        out = subprocess.run(["ip", "netns", "exec", self.lab.ns, str(self.bin / "sh"), "-c",
                              cmd.replace("TARGET", str(self.target))], env=env, check=True,
                             capture_output=True, text=True, timeout=600).stdout
        return out.strip(), time.monotonic() - t0


class Guest:
    def __init__(self, shell: GuestShell) -> None:
        self.shell = shell

    def run(self, cmd: str) -> tuple[str, float]:
        # Output lines come back prefixed (the console also echoes what is typed).
        text = self.shell.run(
            f"t0=$(cut -d' ' -f1 /proc/uptime); {{ {cmd.replace('TARGET', '/dev/vda')}; }} "
            f">/tmp/pg.out; t1=$(cut -d' ' -f1 /proc/uptime); "
            f"sed 's/^/PG''OUT:/' /tmp/pg.out; echo PG''TIME=$t0=$t1", timeout=600)
        lines = [ln.strip("\r") for ln in text.splitlines()]
        out = [ln[len("PGOUT:"):] for ln in lines if ln.startswith("PGOUT:")]
        _, t0, t1 = next(ln for ln in lines if ln.startswith("PGTIME=")).split("=")
        return "\n".join(out).strip(), float(t1) - float(t0)


def boot_guest(lab: Lab) -> Guest:
    disk = lab.work / "guest-disk.raw"
    procs.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "256M"])
    img = lab.image
    cfg = DomainConfig(name="pg-guest", kernel=str(img.kernel), ramdisk=str(img.ramdisk),
                       memory=512, vcpus=1, disks=[DiskSpec(target=str(disk), vdev="xvda")],
                       vifs=[VifSpec(bridge="xenbr0")],
                       net=NetParams(ip=f"{lab.subnet}.20", netmask="255.255.255.0",
                                     hostname="pg-guest"))
    return Guest(lab.boot(cfg))


def measure(accel: str, quick: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Equivalence and efficiency under one accelerator."""
    n_eq = 20000 if quick else 60000
    n_cpu, mem_mb, disk_mb = (300000, 4096, 128) if quick else (800000, 8192, 240)
    repeat = 1 if quick else 3
    with guestlab.lab(accel, subnet_octet=58) as lab, \
            tempfile.TemporaryDirectory(prefix="gridvm-pg-") as tmp:
        host = Host(lab, Path(tmp))
        guest = boot_guest(lab)
        www = Path(tmp) / "www"
        www.mkdir()
        blob_mb = 128 if quick else 256
        with open(www / "blob", "wb") as f:
            f.truncate(blob_mb << 20)
        server = lab.spawn_in_ns("busybox", "httpd", "-f", "-p",
                                 f"{lab.bridge_ip}:{HTTP_PORT}", "-h", str(www))
        try:
            info = lab.client.get("/info")
            equivalence = []
            for name, (what, cmd) in EQUIVALENCE.items():
                cmd = cmd.replace("NITER", str(n_eq))
                g, _ = guest.run(cmd)
                h, _ = host.run(cmd)
                equivalence.append({"test": name, "what": what, "guest": g, "host": h,
                                    "identical": g == h and bool(g)})
                say(f"{accel} equivalence {name}: {'identical' if g == h else 'DIFFERENT'}")
            url = f"http://{lab.bridge_ip}:{HTTP_PORT}/blob"
            efficiency = []
            sizes = {"cpu": f"{n_cpu} iterations", "memory": f"{mem_mb} MiB",
                     "disk": f"{disk_mb} MiB", "network": f"{blob_mb} MiB"}
            for name, cmd in efficiency_commands(n_cpu, mem_mb, disk_mb, url).items():
                # median of `repeat` alternating runs: machine noise falls on both sides
                gs, hs = [], []
                for _ in range(repeat):
                    gs.append(guest.run(cmd)[1])
                    hs.append(host.run(cmd)[1])
                tg, th = statistics.median(gs), statistics.median(hs)
                efficiency.append({"test": name, "size": sizes[name], "guest_s": round(tg, 3),
                                   "host_s": round(th, 3), "ratio": round(th / max(tg, 0.01),
                                                                          4)})
                say(f"{accel} efficiency {name}: guest {tg:.2f}s host {th:.2f}s")
        finally:
            server.kill()
            server.wait(timeout=10)
            guest.shell.close()
    return {"accel": info["accel"], "accel_reason": info["accel_reason"],
            "equivalence": equivalence, "efficiency": efficiency}


def control(path: str | None, say: Callable[[str], None]) -> dict[str, Any]:
    """The noisy-neighbour figures: from a saved run, or a --quick run made now."""
    if path and Path(path).exists():
        data: dict[str, Any] = json.loads(Path(path).read_text())
        data["source"] = f"{path} ({data.get('command', 'bench/noisy_neighbour.py')})"
        return data
    say("control: no saved noisy-neighbour figures; running bench/noisy_neighbour.py --quick")
    data = noisy_neighbour.run_bench(quick=True, say=say)
    data["source"] = "bench/noisy_neighbour.py --quick, run by this bench"
    return data


def print_table(r: dict[str, Any]) -> None:
    tcg = r["runs"][0]
    print(f"Popek-Goldberg, measured on gridvm ({os.cpu_count()} host CPUs; load average "
          f"{r['load_before']} at start, {r['load_after']} at end"
          f"{'; MEASURED UNDER LOAD (>2.5)' if r['under_load'] else ''})")
    print(f"accelerators: {', '.join(x['accel'] for x in r['runs'])}; KVM probe: "
          f"{r['kvm_probe']}")
    head = f"{'property':<12}{'test':<40}{'guest':>18}{'host':>18}  result"
    print(head)
    print("-" * (len(head) + 12))
    for e in tcg["equivalence"]:
        print(f"{'equivalence':<12}{e['what']:<40}{_short(e['guest']):>18}"
              f"{_short(e['host']):>18}  {'identical' if e['identical'] else 'DIFFERENT'}")
    c = r["control"]
    for row in c["rows"]:
        base = row["alone"]["p99_ms"] or float("nan")
        best = min(row["confined"], key=lambda m: m["p99_ms"])
        print(f"{'control':<12}{row['attack'] + ' attack: victim p99 vs alone':<40}"
              f"{'unconfined x' + format(row['unconfined']['p99_ms'] / base, '.2f'):>18}"
              f"{'confined x' + format(best['p99_ms'] / base, '.2f'):>18}  "
              + (f"held ({row['held_by'][0]})" if row["held"] else "NOT held"))
    for run in r["runs"]:
        for e in run["efficiency"]:
            print(f"{'efficiency':<12}{e['test'] + ' (' + e['size'] + '), ' + run['accel']:<40}"
                  f"{e['guest_s']:>16.2f} s{e['host_s']:>16.2f} s  guest/host speed "
                  f"{e['ratio']:.3f}")
    print(f"control figures from {c['source']}; accel {c['accel']}, load average "
          f"{c['load_before']} .. {c['load_after']}")


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 16 else flat[:15] + "…"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--control", default=noisy_neighbour.SAVE,
                    help="noisy_neighbour JSON to summarize (if absent: a --quick run)")
    args = ap.parse_args()
    say: Callable[[str], None] = (lambda m: None) if args.json else (
        lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    load_before = guestlab.loadavg()
    ok, why = guestlab.kvm_probe(build_tiny(Home.resolve().images))
    runs = [measure("tcg", args.quick, say)]
    if ok:
        runs.append(measure("kvm", args.quick, say))
    result: dict[str, Any] = {"kvm_probe": why, "runs": runs,
                              "control": control(args.control, say),
                              "load_before": load_before, "load_after": guestlab.loadavg()}
    result["under_load"] = max(float(result["load_before"].split(",")[0]),
                               float(result["load_after"].split(",")[0])) > 2.5
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"(whole run {result['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
