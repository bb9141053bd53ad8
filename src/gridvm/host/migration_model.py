"""The vocabulary of live migration (gridvm.host.migration): options, the peer protocol, the
source's `Job` and the destination's `Incoming`, each with its phase type and transition
table (`JOB_PHASES`, `INCOMING_STATES`); `set_phase` / `set_state` check and log each step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, Field, field_validator

from gridvm.config.model import DomainConfig, Path_
from gridvm.errors import GridvmError
from gridvm.fsm import Machine

if TYPE_CHECKING:
    from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.migration")

RELOCATION_PORT = 8002              # xend's relocation port
HOLD_ENV = "GRIDVM_MIGRATION_HOLD"  # tests: a directory of gates (see `hold`)
POLL_S = 0.05
PROGRESS_S = 0.25                   # query-migrate at most this often between QEMU's events
PEER_CHECK_S = 1.0
PEER_MISSES = 3                     # unanswered status checks before the source gives up
SETTLE_S = 30.0
STALL_PASSES = 3                    # passes without progress that mean "stalled"
STALL_STEP_S = 3.0                  # at least this long without progress per raise
STALL_MIN_S = 10.0                  # at the ceiling, stalled this long: "cannot converge"
KEEP = 50                           # finished migrations remembered for `status`
UNLIMITED_MIBS = 10 * 1024          # QEMU's max-bandwidth when none is asked for
DEFAULT_DOWNTIME_MS = 300           # ceiling of the downtime limit: QEMU's default
INITIAL_DOWNTIME_MS = 10            # the limit a migration starts with
MIB = 1024 * 1024
JOURNAL_OUT = "migration.out"
JOURNAL_IN = "migration.in"
CAPS = ("events", "return-path", "validate-uuid", "auto-converge", "pause-before-switchover")
TERMINAL = ("completed", "failed", "cancelled")


class MigrateOptions(BaseModel):
    """What `gridvm migrate` asks for."""

    live: bool = False
    downtime_ms: int | None = Field(default=None, ge=1, le=600_000)
    bandwidth: int | None = Field(default=None, ge=1, le=1_000_000, description="MiB/s")
    auto_converge: bool = False
    copy_storage: bool = False
    timeout: float = Field(default=600, ge=5, le=86_400)


class DiskCopy(BaseModel):
    """A disk the destination creates and the source mirrors into (--copy-storage)."""

    index: int = Field(ge=0)
    vdev: str
    path: Path_                 # on the source
    local: str | None = None    # relative to the source's storage directory, if under it
    format: Literal["raw", "qcow2"]
    size: int = Field(ge=0)     # virtual size in bytes
    ident: tuple[int, int]      # (st_dev, st_ino) on the source: detects a shared file

    @field_validator("local")
    @classmethod
    def _local(cls, v: str | None) -> str | None:
        if v is not None and (v.startswith("/") or "\0" in v or ".." in Path(v).parts
                              or not v.strip()):
            raise ValueError(f"{v[:80]!r} is not a path inside the storage directory")
        return v


class PrepareRequest(BaseModel):
    id: str
    source: str                 # "<hostname>:<home>" of the source gridvmd
    config: DomainConfig
    managed: bool = False
    started_at: float | None = None
    restarts: list[float] = Field(default_factory=list)
    vcpu_pins: dict[int, str] = Field(default_factory=dict)
    resume: bool = False        # non-live: resume the guest once it has arrived
    copies: list[DiskCopy] = Field(default_factory=list)
    capabilities: dict[str, bool] = Field(default_factory=dict)
    timeout: float = 600


class PrepareAnswer(BaseModel):
    id: str
    # QEMU's stream, e.g. tcp:10.77.0.12:40123 (never exec: or file: from a peer)
    uri: str = Field(pattern=r"^tcp:(\[[0-9A-Fa-f:.]+\]|[0-9.]+):[0-9]{1,5}$")
    domid: int
    nbd: dict[str, str] = Field(default_factory=dict)      # drive id -> NBD URI
    targets: dict[str, str] = Field(default_factory=dict)  # vdev -> image on the destination

    @field_validator("nbd")
    @classmethod
    def _nbd(cls, v: dict[str, str]) -> dict[str, str]:
        for uri in v.values():
            if not uri.startswith("nbd://") or any(c in uri for c in ", \0\n"):
                raise ValueError(f"bad NBD URI {uri[:80]!r}")
        return v


class IncomingState(StrEnum):
    """The destination's half: waiting for the stream, then the domain runs here (running or
    paused), or the half failed and everything it made is gone."""

    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    FAILED = "failed"


INCOMING_STATES: dict[IncomingState, set[IncomingState]] = {
    IncomingState.WAITING: {IncomingState.RUNNING, IncomingState.PAUSED, IncomingState.FAILED},
    IncomingState.RUNNING: set(),
    IncomingState.PAUSED: set(),
    IncomingState.FAILED: set(),
}
INCOMING = Machine("incoming migration", INCOMING_STATES, log)


class JobPhase(StrEnum):
    """The source's half, in order; it ends completed, failed or cancelled."""

    STARTING = "starting"        # accepted, not yet talking to the destination
    PREPARING = "preparing"      # the destination prepares the domain
    STORAGE = "storage"          # disks are mirrored (--copy-storage)
    MEMORY = "memory"            # QEMU copies RAM
    SWITCHOVER = "switchover"    # the guest is paused and its RAM sent: disks finish
    SWITCHED = "switched"        # the destination runs it: the source copy is retired
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_P = JobPhase
_ENDS = {_P.SWITCHED, _P.FAILED, _P.CANCELLED}   # SWITCHED: the destination has the domain
JOB_PHASES: dict[JobPhase, set[JobPhase]] = {
    _P.STARTING: {_P.PREPARING} | _ENDS,    # SWITCHED: settled by a restarted gridvmd
    _P.PREPARING: {_P.STORAGE, _P.MEMORY} | _ENDS,
    _P.STORAGE: {_P.MEMORY} | _ENDS,
    _P.MEMORY: {_P.SWITCHOVER} | _ENDS,
    _P.SWITCHOVER: _ENDS,
    _P.SWITCHED: {_P.COMPLETED, _P.FAILED, _P.CANCELLED},   # retiring the source failed
    _P.COMPLETED: set(),
    _P.FAILED: set(),
    _P.CANCELLED: set(),
}
JOB = Machine("migration", JOB_PHASES, log)


class IncomingView(BaseModel):
    id: str
    name: str
    state: IncomingState
    domid: int | None = None
    error: str | None = None


class Peer(Protocol):
    """The destination's gridvmd as the source sees it (gridvm.api.hostpeer implements it)."""

    address: str

    async def prepare(self, req: PrepareRequest) -> PrepareAnswer: ...

    async def status(self, mid: str) -> IncomingView: ...

    async def abort(self, mid: str) -> IncomingView: ...

    async def close(self) -> None: ...


class Abort(GridvmError):
    """gridvmd itself stops a migration (cancel, timeout, no convergence, peer gone)."""


async def hold(phase: str) -> None:
    """Test hook: wait while the gate file `$GRIDVM_MIGRATION_HOLD/<phase>` exists (≤120 s)."""
    root = os.environ.get(HOLD_ENV)
    if not root or not (Path(root) / phase).exists():
        return
    (Path(root) / f"{phase}.reached").touch()
    deadline = time.monotonic() + 120
    while (Path(root) / phase).exists() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)


def holding(phase: str) -> bool:
    root = os.environ.get(HOLD_ENV)
    return bool(root) and (Path(str(root)) / phase).exists()


def hostport(address: str, port: int | str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def caps_arg(caps: dict[str, bool]) -> dict[str, Any]:
    return {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ----- the source's view of one migration -------------------------------------------------


@dataclass
class Job:
    """One outgoing migration, as `gridvm migrate` follows it."""

    id: str
    name: str
    uuid: str
    target: str
    opts: MigrateOptions
    phase: JobPhase = JobPhase.STARTING
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)   # QEMU's last query-migrate
    storage: tuple[int, int] = (0, 0)                    # disk bytes mirrored, total
    dest_domid: int | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cancel_reason: str | None = None
    peer_problem: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def set_phase(self, new: JobPhase, reason: str) -> None:
        """The one way a job's phase changes: checked against JOB_PHASES and logged."""
        if JOB.step(f"{self.name} migration {self.id}", self.phase, new, reason):
            self.phase = new

    def view(self) -> dict[str, Any]:
        info = self.info
        ram = info.get("ram", {})
        return {
            "id": self.id, "domain": self.name, "uuid": self.uuid, "target": self.target,
            "live": self.opts.live, "copy_storage": self.opts.copy_storage,
            "phase": self.phase, "status": info.get("status"), "error": self.error,
            "ram": {"total": ram.get("total", 0), "transferred": ram.get("transferred", 0),
                    "remaining": ram.get("remaining", 0), "mbps": ram.get("mbps", 0),
                    "dirty_rate": ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096),
                    "iterations": ram.get("dirty-sync-count", 0)},
            "expected_downtime_ms": info.get("expected-downtime"),
            "storage": {"copied": self.storage[0], "total": self.storage[1]},
            "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"), "dest_domid": self.dest_domid,
            "started": self.started, "finished": self.finished,
        }


@dataclass
class Incoming:
    """One incoming migration on the destination."""

    id: str
    uuid: str
    name: str
    source: str
    managed: bool
    resume: bool
    started_at: float | None
    deadline: float                                        # wall clock
    created: list[str] = field(default_factory=list)       # images made for --copy-storage
    nbd: bool = False
    state: IncomingState = IncomingState.WAITING
    error: str | None = None
    domid: int | None = None
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def set_state(self, new: IncomingState, reason: str) -> None:
        """The one way its state changes: checked against INCOMING_STATES and logged."""
        if INCOMING.step(f"{self.name} incoming migration {self.id}", self.state, new, reason):
            self.state = new

    def view(self) -> IncomingView:
        return IncomingView(id=self.id, name=self.name, state=self.state, domid=self.domid,
                            error=self.error)

    def journal(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "source": self.source,
                "managed": self.managed, "resume": self.resume, "started_at": self.started_at,
                "deadline": self.deadline, "created": self.created, "nbd": self.nbd}


class Source(Protocol):
    """What the source's half of a migration needs from the migration service."""

    m: HostManager
    connect: Callable[[str], Peer]

    @property
    def identity(self) -> str: ...

    @property
    def storage_dir(self) -> Path: ...

    def note(self, key: str, mid: str, entry: dict[str, Any] | None) -> None: ...
