"""Per-domain usage sampling (xentop's counters) with a short history per domain.

Every `interval` seconds the `Sampler` reads, for each running domain, its CPU time (cgroup
accounting, else /proc), balloon size (QMP `query-balloon`), block counters (QMP
`query-blockstats`) and tap counters (netlink), and derives rates over the last interval.
Blocking reads for all domains share one worker-thread hop per tick; QMP queries run
concurrently. `gridvm top`, `GET /v1/stats` and `GET /metrics` read the stored samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gridvm.errors import GridvmError
from gridvm.host import hostinfo, links, procs
from gridvm.host.vm import Vm

if TYPE_CHECKING:
    from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.stats")

INTERVAL_S = 1.0
KEEP = 300            # samples of history per domain (5 minutes at 1 s)
QMP_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Counters:
    """Cumulative readings of one domain at one instant (what rates are derived from)."""

    mono: float = 0.0
    cpu_seconds: float = 0.0
    net_rx: int = 0       # guest's view: bytes the guest received (its taps' tx)
    net_tx: int = 0       # bytes the guest sent (its taps' rx)
    block_read: int = 0
    block_write: int = 0
    block_read_ops: int = 0
    block_write_ops: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    """One domain at one instant: cumulative counters, rates over the last interval, sizes."""

    time: float
    uuid: str
    name: str
    domid: int | None
    state: str
    cpu_seconds: float
    cpu_percent: float     # over the last interval; 100 = one host CPU
    memory: int            # MiB (balloon actual, else configured)
    maxmem: int            # MiB
    vcpus: int
    nets: int
    vbds: int
    net_rx: int
    net_tx: int
    net_rx_rate: float     # bytes/s
    net_tx_rate: float
    block_read: int
    block_write: int
    block_read_ops: int
    block_write_ops: int
    block_read_rate: float  # bytes/s
    block_write_rate: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class HostSample:
    """Host facts taken with each tick."""

    time: float = 0.0
    nr_cpus: int = 1
    total_memory: int = 0  # MiB
    free_memory: int = 0   # MiB (MemAvailable)


def _rate(new: float, old: float, dt: float) -> float:
    """Per-second rate of a counter; a counter that went backwards (reset) gives 0."""
    return max(new - old, 0) / dt if dt > 0 else 0.0


def derive(vm_info: dict[str, Any], now: Counters, prev: Counters | None,
           wall: float) -> Sample:
    """A Sample from this tick's counters and the previous tick's (None: first sight)."""
    dt = now.mono - prev.mono if prev is not None else 0.0
    p = prev if prev is not None else now
    return Sample(
        time=round(wall, 3),
        cpu_seconds=round(now.cpu_seconds, 3),
        cpu_percent=round(100.0 * _rate(now.cpu_seconds, p.cpu_seconds, dt), 1),
        net_rx=now.net_rx, net_tx=now.net_tx,
        net_rx_rate=round(_rate(now.net_rx, p.net_rx, dt), 1),
        net_tx_rate=round(_rate(now.net_tx, p.net_tx, dt), 1),
        block_read=now.block_read, block_write=now.block_write,
        block_read_ops=now.block_read_ops, block_write_ops=now.block_write_ops,
        block_read_rate=round(_rate(now.block_read, p.block_read, dt), 1),
        block_write_rate=round(_rate(now.block_write, p.block_write, dt), 1),
        **vm_info,
    )


def _host_side(vms: list[Vm], cpu_ns: Callable[[Vm], int | None]
               ) -> tuple[list[tuple[float, int, int]], HostSample]:
    """Blocking part of a tick (runs in a thread): CPU time, tap counters, meminfo."""
    rows = []
    for vm in vms:
        ns = cpu_ns(vm)
        cpu = ns / 1e9 if ns is not None else procs.cpu_seconds(vm.pid)
        rx = tx = 0
        for tap in vm.rec.taps:
            try:
                tap_rx, tap_tx = links.link_counters(tap)
            except Exception:  # a tap vanishing mid-read is not an error
                continue
            rx, tx = rx + tap_tx, tx + tap_rx   # a tap's tx is what the guest receives
        rows.append((cpu, rx, tx))
    mem = hostinfo.meminfo_mb()
    host = HostSample(time=time.time(), nr_cpus=hostinfo.ncpus(),
                      total_memory=mem.get("MemTotal", 0), free_memory=mem.get("MemAvailable", 0))
    return rows, host


async def _blockstats(vm: Vm) -> tuple[int, int, int, int, int] | None:
    """(devices, read bytes, written bytes, read ops, write ops) summed over the disks."""
    try:
        devices = await vm.monitor.execute("query-blockstats", timeout=QMP_TIMEOUT_S)
    except GridvmError:
        return None
    rd = wr = rd_ops = wr_ops = 0
    for dev in devices:
        s = dev.get("stats", {})
        rd += int(s.get("rd_bytes", 0))
        wr += int(s.get("wr_bytes", 0))
        rd_ops += int(s.get("rd_operations", 0))
        wr_ops += int(s.get("wr_operations", 0))
    return len(devices), rd, wr, rd_ops, wr_ops


class Sampler:
    """Samples every running domain of a HostManager once per interval, forever."""

    def __init__(self, manager: HostManager, *, interval: float = INTERVAL_S,
                 keep: int = KEEP) -> None:
        self.m = manager
        self.interval = interval
        self.keep = keep
        self.host = HostSample()
        self._history: dict[str, deque[Sample]] = {}   # by uuid
        self._prev: dict[str, tuple[int, Counters]] = {}  # uuid -> (pid, counters)
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""

    # ----- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stats-sampler")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                await self.sample_once()
                self._last_error = ""
            except Exception as exc:  # never let the sampler die; log each new failure once
                if str(exc) != self._last_error:
                    log.exception("sampling failed")
                    self._last_error = str(exc)
            due += self.interval
            now = loop.time()
            if due < now:           # a slow tick: skip the missed ones, keep the cadence
                due = now + self.interval
            await asyncio.sleep(due - now)

    # ----- one tick ----------------------------------------------------------------------

    async def sample_once(self) -> None:
        """Sample every running domain now; forget domains that no longer run."""
        vms = list(self.m.vms.values())
        (rows, host), answers = await asyncio.gather(
            asyncio.to_thread(_host_side, vms, self.m.res.cpu_ns),
            asyncio.gather(*(self._qmp(vm) for vm in vms)))
        mono, wall = time.monotonic(), time.time()
        for vm, (cpu, rx, tx), (mem, blk) in zip(vms, rows, answers, strict=True):
            uuid = vm.rec.uuid
            cfg = vm.rec.config
            nblk, rd, wr, rd_ops, wr_ops = blk if blk is not None else (len(cfg.disks), 0, 0, 0, 0)
            now = Counters(mono, cpu, rx, tx, rd, wr, rd_ops, wr_ops)
            prev = self._prev.get(uuid)
            # A new QEMU (restart under the same uuid) starts its counters from zero.
            before = prev[1] if prev is not None and prev[0] == vm.pid else None
            self._prev[uuid] = (vm.pid, now)
            info = {"uuid": uuid, "name": vm.rec.name, "domid": vm.rec.domid,
                    "state": vm.rec.state, "memory": mem if mem is not None else cfg.memory,
                    "maxmem": cfg.max_memory, "vcpus": cfg.vcpus, "nets": len(vm.rec.taps),
                    "vbds": nblk}
            history = self._history.get(uuid)
            if history is None:
                history = self._history[uuid] = deque(maxlen=self.keep)
            history.append(derive(info, now, before, wall))
        self.host = host
        self._forget(set(self.m.vms))

    async def _qmp(self, vm: Vm) -> tuple[int | None, tuple[int, int, int, int, int] | None]:
        mem, blk = await asyncio.gather(self.m.res.current_memory(vm), _blockstats(vm))
        return mem, blk

    def _forget(self, live: Iterable[str]) -> None:
        keep = set(live)
        for uuid in [u for u in self._history if u not in keep]:
            del self._history[uuid]
        for uuid in [u for u in self._prev if u not in keep]:
            del self._prev[uuid]

    # ----- reading -----------------------------------------------------------------------

    def latest(self) -> list[Sample]:
        """The newest sample of each running domain (name and state as of now), by domid."""
        out = []
        for uuid, vm in self.m.vms.items():
            history = self._history.get(uuid)
            if history:
                s = history[-1]
                out.append(dataclasses.replace(s, name=vm.rec.name, state=vm.rec.state,
                                               domid=vm.rec.domid))
        return sorted(out, key=lambda s: (s.domid is None, s.domid or 0, s.name))

    def history(self, uuid: str, limit: int | None = None) -> list[Sample]:
        """Up to `limit` newest samples of a domain, oldest first (empty if not running)."""
        samples = list(self._history.get(uuid, ()))
        return samples[-limit:] if limit else samples

    def totals(self) -> dict[str, Any]:
        """Host facts and sums over the running domains."""
        samples = self.latest()
        return {
            "time": self.host.time,
            "nr_cpus": self.host.nr_cpus,
            "total_memory": self.host.total_memory,
            "free_memory": self.host.free_memory,
            "running": len(samples),
            "cpu_percent": round(sum(s.cpu_percent for s in samples), 1),
            "memory": sum(s.memory for s in samples),
            "vcpus": sum(s.vcpus for s in samples),
        }
