"""`host evacuate` as a job inside gridvmd: it outlives the CLI that started it.

The job takes the plan (`service.evacuation_plan`: refused before anything moves if some
domain fits nowhere), puts the host in maintenance, and live-migrates the domains one by
one: it asks the source host (through a HostPeer) to migrate each to its planned
destination and follows that migration until it ends. One evacuation at a time in the whole
cluster: the job holds `evacuation` in etcd, on the host's lease (so a host that dies
mid-way releases it). The CLI follows the job and may detach; `gridvm host evacuate --follow`
finds it again. Services above the cluster layer that keep host-bound domains (the database
service) register a `HostLeaving` hook: it runs first (e.g. a switchover away from the host,
then a clean stop of its members), and a hook that fails fails the job before anything moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gridvm.cluster import service
from gridvm.cluster.node import ClusterNode
from gridvm.errors import Conflict, GridvmError, NotFound

log = logging.getLogger("gridvm.cluster")

Phase = Literal["running", "completed", "failed", "cancelled"]
POLL_S = 0.25
LOCK = "evacuation"


class HostLeaving(Protocol):
    """An upper layer's part in an evacuation: called before the migrations start."""

    async def host_leaving(self, host: str) -> list[str]:
        """Move whatever this service keeps on `host` off it; one line per thing done."""
        ...


@dataclass
class Evacuation:
    id: str
    host: str
    moves: list[dict[str, Any]]
    left: list[dict[str, Any]]
    timeout: float
    phase: Phase = "running"
    index: int = 0                                   # the move in progress (0-based)
    current: dict[str, Any] | None = None            # its migration job's view
    moved: list[dict[str, Any]] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)   # what the hooks did first
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: bool = False

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "phase": self.phase, "index": self.index,
                "total": len(self.moves), "moves": self.moves, "left": self.left,
                "current": self.current, "moved": self.moved, "prepared": self.prepared,
                "error": self.error,
                "started": self.started, "finished": self.finished}


class Evacuations:
    """The evacuation jobs this gridvmd runs (and ran, for the CLI to read back)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.hooks: list[HostLeaving] = []
        self.jobs: dict[str, Evacuation] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, timeout: float = 600) -> Evacuation:
        _, cluster = self.node.need()
        plan = await asyncio.to_thread(service.evacuation_plan, self.node, host)
        job = Evacuation(uuidlib.uuid4().hex[:12], host, plan["moves"], plan["left"], timeout)
        lease = self.node.files.lease_id() or 0
        key = cluster.key(LOCK)
        taken = await asyncio.to_thread(cluster.etcd.create, key, json.dumps(
            {"id": job.id, "host": host, "by": self.node.need()[0].host}), lease=lease)
        if not taken:
            held = await asyncio.to_thread(cluster.etcd.get_json, key) or {}
            raise Conflict(f"an evacuation of {held.get('host', '?')} is already running "
                           f"(job {held.get('id', '?')} on {held.get('by', '?')}); wait for it "
                           "or cancel it")
        try:
            await asyncio.to_thread(service.set_maintenance, self.node, host, True)
        except BaseException:
            await asyncio.to_thread(cluster.etcd.delete, key)
            raise
        self.jobs[job.id] = job
        task = asyncio.create_task(self._run(job), name=f"evacuate-{host}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def job(self, jid: str) -> Evacuation:
        job = self.jobs.get(jid)
        if job is None:
            raise NotFound(f"no evacuation job {jid!r} on this host")
        return job

    def cancel(self, jid: str) -> Evacuation:
        job = self.job(jid)
        job.cancel = True
        return job

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self, job: Evacuation) -> None:
        _, cluster = self.node.need()
        try:
            for hook in self.hooks:
                try:
                    job.prepared += await hook.host_leaving(job.host)
                except GridvmError as exc:
                    job.phase, job.error = "failed", f"nothing was moved: {exc}"
                    return
            for i, step in enumerate(job.moves):
                job.index = i
                if job.cancel:
                    job.phase = "cancelled"
                    break
                await self._move(job, step)
                if job.phase != "running":
                    break
            else:
                job.phase = "completed"
        except asyncio.CancelledError:
            job.phase, job.error = "failed", "gridvmd stopped during the evacuation"
            raise
        except GridvmError as exc:
            job.phase, job.error = "failed", f"{job.moves[job.index]['domain']}: {exc}"
        finally:
            job.finished = time.time()
            with contextlib.suppress(GridvmError):
                await asyncio.to_thread(cluster.etcd.delete, cluster.key(LOCK))
            log.info("evacuation of %s %s (%d moved)", job.host, job.phase, len(job.moved))

    async def _move(self, job: Evacuation, step: dict[str, Any]) -> None:
        """Migrate one domain (the source host runs the migration) and follow it."""
        source = job.host
        mig = await self.node.call(source, "POST", f"/v1/domains/{step['uuid']}/migrate",
                                   {"target": step["to"], "live": True,
                                    "timeout": job.timeout}, timeout=60)
        while mig.get("phase") not in ("completed", "failed", "cancelled"):
            job.current = mig
            await asyncio.sleep(POLL_S)
            if job.cancel:
                with contextlib.suppress(GridvmError):
                    await self.node.call(source, "POST",
                                         f"/v1/domains/{step['uuid']}/migrate/cancel", {})
            mig = await self.node.call(source, "GET", f"/v1/migrations/{mig['id']}")
        job.current = mig
        if mig["phase"] != "completed":
            job.phase = "cancelled" if job.cancel else "failed"
            job.error = f"{step['domain']}: {mig.get('error') or mig['phase']}"
            return
        job.moved.append({"domain": step["domain"], "uuid": step["uuid"], "from": source,
                          "to": step["to"], "total_ms": mig.get("total_time_ms"),
                          "downtime_ms": mig.get("downtime_ms"),
                          "dest_domid": mig.get("dest_domid")})
