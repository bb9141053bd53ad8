"""The HA manager's environment: everything one HA round touches, behind one Protocol.

`HaManager` (cluster/ha.py) sees the world only through a `HaEnv`: two clocks, whether this
host leads, the cluster's view (host states, capacities, the domain registry with its
compare-and-swap, name reservations), fencing, launching a domain on a host, running one
priority level's launches, and a log of its decisions. `EtcdHaEnv` is the real one (the
registry in etcd, the configured fence command, a launcher the node passes in); the HA
simulator (cluster/hasim.py) is the other.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from gridvm.cluster.core import Cluster
from gridvm.errors import GridvmError
from gridvm.host import procs

log = logging.getLogger("gridvm.ha")

Launcher = Callable[[str, dict[str, Any], bool], None]
"""launch(host, config, managed): start a domain on a host; raises GridvmError on failure."""

MAX_PARALLEL = 8
FENCE_TIMEOUT_S = 30.0


class FenceFailed(GridvmError):
    """The fence action failed: the host is not known to be off."""


class HaEnv(Protocol):
    """What one HA round needs from the world, and nothing else."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (margins, observations)."""

    def wall(self) -> float:
        """Seconds since the epoch (restart timestamps kept in the registry)."""

    def is_leader(self) -> bool:
        """This host holds the HA election (it runs rounds; others only observe)."""

    def host_states(self) -> dict[str, str]:
        """up | down | fenced | maintenance for every joined host."""

    def capacity(self) -> dict[str, dict[str, Any]]:
        """Published capacity by host (`cpus`, `memory_mb`); only hosts whose lease lives."""

    def domains(self) -> dict[str, dict[str, Any]]:
        """Registry records by uuid."""

    def domain_kv(self, uuid: str) -> tuple[dict[str, Any], int] | None:
        """One registry record and its revision (for `move_domain`)."""

    def move_domain(self, uuid: str, expect_rev: int, update: dict[str, Any]) -> bool:
        """Merge `update` into the record if it is still at `expect_rev`; False if not."""

    def put_domain(self, uuid: str, record: dict[str, Any]) -> None:
        """Write a whole registry record."""

    def reserve_name(self, name: str, uuid: str) -> None:
        """Claim a domain name for `uuid` (idempotent); Conflict if another domain has it."""

    def fence(self, host: str) -> None:
        """Run the fence action on a host that is down; FenceFailed if it did not work."""

    def mark_fenced(self, host: str) -> None:
        """Record `fenced/<host>`: its domains may now run elsewhere."""

    def launch(self, host: str, config: dict[str, Any], managed: bool) -> None:
        """Start a domain on `host`; raises GridvmError if it did not start."""

    def run_all(self, jobs: Sequence[Callable[[], None]]) -> None:
        """Run independent jobs (one priority level's launches), side by side or not."""

    def log(self, level: int, message: str) -> None:
        """Log a decision."""


class EtcdHaEnv:
    """The real environment: the cluster registry in etcd, the host's fence command, and
    a launcher (today a call to the peer's gridvmd API, passed in by the node)."""

    def __init__(self, cluster: Cluster, host: str, *, launch: Launcher,
                 is_leader: Callable[[], bool], fence_command: str | None = None) -> None:
        self.cluster = cluster
        self.host = host
        self._launch = launch
        self._is_leader = is_leader
        self.fence_command = fence_command

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def is_leader(self) -> bool:
        return self._is_leader()

    def host_states(self) -> dict[str, str]:
        return self.cluster.host_states()

    def capacity(self) -> dict[str, dict[str, Any]]:
        return self.cluster.capacity()

    def domains(self) -> dict[str, dict[str, Any]]:
        return self.cluster.domains()

    def domain_kv(self, uuid: str) -> tuple[dict[str, Any], int] | None:
        return self.cluster.domain_kv(uuid)

    def move_domain(self, uuid: str, expect_rev: int, update: dict[str, Any]) -> bool:
        return self.cluster.move_domain(uuid, expect_rev, update)

    def put_domain(self, uuid: str, record: dict[str, Any]) -> None:
        self.cluster.put_domain(uuid, record)

    def reserve_name(self, name: str, uuid: str) -> None:
        self.cluster.reserve_name(name, uuid)

    def fence(self, host: str) -> None:
        if not self.fence_command:
            return
        try:
            procs.run([*shlex.split(self.fence_command), host], timeout=FENCE_TIMEOUT_S)
        except procs.CommandError as exc:
            raise FenceFailed(str(exc)) from exc

    def mark_fenced(self, host: str) -> None:
        self.cluster.mark_fenced(host, by=self.host)

    def launch(self, host: str, config: dict[str, Any], managed: bool) -> None:
        self._launch(host, config, managed)

    def run_all(self, jobs: Sequence[Callable[[], None]]) -> None:
        if len(jobs) <= 1:
            for job in jobs:
                job()
            return
        with ThreadPoolExecutor(max_workers=min(len(jobs), MAX_PARALLEL),
                                thread_name_prefix="ha-restart") as pool:
            list(pool.map(lambda job: job(), jobs))

    def log(self, level: int, message: str) -> None:
        log.log(level, "%s", message)
