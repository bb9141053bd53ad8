"""The self-fencing watchdog: one small process per clustered host.

It holds the host's lease in etcd (the host's heartbeat: `alive/<host>` lives on it) and,
if it cannot renew the lease in time, kills the host's HA domains *before* etcd can expire
the lease — so by the time the HA manager sees the host gone and restarts those domains
elsewhere, no copy runs here. It is a process of its own, not a gridvmd thread, so that a
gridvmd restart or crash neither drops the heartbeat nor leaves HA guests unprotected;
`gridvm lab poweroff` (or a real power loss) kills it with everything else.

Run by gridvmd: `python -m gridvm.cluster.watchdog --home HOME` (detached; re-adopted).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import time
from pathlib import Path

from gridvm.cluster.core import Cluster, Lease
from gridvm.cluster.etcd import EtcdError
from gridvm.cluster.settings import Files
from gridvm.host import procs
from gridvm.paths import Home

log = logging.getLogger("gridvm.watchdog")


def fence(files: Files) -> list[int]:
    """Mark the host fenced, then SIGKILL every HA domain's QEMU; the pids killed."""
    files.fenced.write_text(f"{time.time()}\n")
    killed = []
    for marker in sorted(files.ha.glob("*")):
        rundir = files.run / marker.name
        pid = procs.read_pidfile(rundir / "qemu.pid")
        if pid is not None and procs.pid_alive(pid) and any(
                str(rundir) in a for a in procs.cmdline(pid)):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def argv(home: Home) -> list[str]:
    return [sys.executable, "-m", "gridvm.cluster.watchdog", "--home", str(home.root)]


def running(files: Files) -> int | None:
    """The pid of this home's watchdog if it runs."""
    pid = procs.read_pidfile(files.pid)
    if pid is not None and procs.pid_alive(pid) and "gridvm.cluster.watchdog" in " ".join(
            procs.cmdline(pid)):
        return pid
    return None


def run(home: Home) -> None:
    files = Files(home)
    cfg = files.load()
    if cfg is None:
        raise SystemExit(f"watchdog: {files.config} does not exist")
    # Every call, the grant and the alive key's put included, waits no longer than a renewal
    # may: the lease's deadline counts from before its grant, so a slow grant or put would
    # leave a lease that is lost the moment it is taken.
    etcd = files.etcd(cfg.etcd, timeout=max(cfg.ttl / 6, 0.2))
    cluster = Cluster(etcd)
    alive_key = cluster.key("alive", cfg.host)

    def granted(lease: int) -> None:
        files.lease.write_text(f"{lease}\n")
        etcd.put_json(alive_key, {"host": cfg.host, "lease": lease, "pid": os.getpid(),
                                  "since": time.time()}, lease=lease)
        log.info("lease %x granted (ttl %ss)", lease, cfg.ttl)

    def lost(lease: int) -> None:
        killed = fence(files)
        log.error("lease %x lost: fenced; killed HA QEMUs %s", lease, killed)

    lease = Lease(etcd, cfg.ttl, on_granted=granted, on_lost=lost, name="host-lease")
    stop = False

    def term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, term)
    lease.start()
    while not stop and files.config.exists():
        if not lease.running():       # cannot happen (it catches everything): be safe anyway
            log.error("the lease thread died: fenced; killed HA QEMUs %s", fence(files))
            raise SystemExit(1)       # gridvmd starts another watchdog
        time.sleep(0.2)
    lease.stop(revoke=not files.config.exists())  # `leave` revokes; a plain stop does not
    files.lease.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="gridvm-watchdog", description=__doc__)
    parser.add_argument("--home", required=True)
    args = parser.parse_args()
    home = Home.resolve(args.home)
    files = Files(home)
    handler = logging.FileHandler(files.log)
    logging.basicConfig(handlers=[handler], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if handler.stream is not None:
        faulthandler.register(signal.SIGUSR1, file=handler.stream, all_threads=True)  # stacks
    Path(files.pid).write_text(f"{os.getpid()}\n")
    try:
        run(home)
    except EtcdError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
