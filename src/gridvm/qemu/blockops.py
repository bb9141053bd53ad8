"""QMP block operations on a running domain: internal qcow2 snapshots (disk-only, atomic
across disks; with memory through the snapshot-save/-load jobs), persistent dirty bitmaps,
and a disk's live conversion to qcow2 (a mirror that pivots).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from gridvm.errors import QemuError
from gridvm.qemu.qmp import Monitor

_ids = itertools.count(1)
POLL_S = 0.05


async def run_job(mon: Monitor, cmd: str, args: dict[str, Any], timeout: float) -> None:
    """Start a QMP job (`job-id` is added) and wait until it has concluded; its error, if
    any, is raised as a QemuError. The job is dismissed either way."""
    job = f"gv-{cmd}-{next(_ids)}"
    await mon.execute(cmd, {"job-id": job, **args})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    mine: dict[str, Any] | None = None
    try:
        while True:
            jobs = {j["id"]: j for j in await mon.execute("query-jobs")}
            mine = jobs.get(job)
            if mine is None or mine["status"] in ("concluded", "null"):
                break
            if loop.time() > deadline:
                await mon.execute("job-cancel", {"id": job})
                raise QemuError(f"{cmd} did not finish within {timeout:.0f}s")
            await asyncio.sleep(POLL_S)
    finally:
        if mine is not None and mine["status"] == "concluded":
            await mon.execute("job-dismiss", {"id": job})
    if mine is not None and mine.get("error"):
        raise QemuError(f"{cmd}: {mine['error']}")


async def snapshot_disks(mon: Monitor, nodes: list[str], name: str) -> None:
    """An internal snapshot `name` of every node, atomically (one transaction)."""
    await mon.execute("transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": n, "name": name}}
        for n in nodes]}, timeout=120)


async def delete_snapshot(mon: Monitor, node: str, name: str) -> None:
    await mon.execute("blockdev-snapshot-delete-internal-sync",
                      {"device": node, "name": name}, timeout=300)


async def save_vm(mon: Monitor, name: str, vmstate: str, nodes: list[str]) -> None:
    """Memory and disks as internal snapshot `name` (the guest is stopped meanwhile and
    resumed if it ran)."""
    await run_job(mon, "snapshot-save", {"tag": name, "vmstate": vmstate, "devices": nodes},
                  timeout=600)


async def load_vm(mon: Monitor, name: str, vmstate: str, nodes: list[str]) -> None:
    """Back to internal snapshot `name`: memory and disks."""
    await run_job(mon, "snapshot-load", {"tag": name, "vmstate": vmstate, "devices": nodes},
                  timeout=600)


async def remove_bitmaps(mon: Monitor, node: str, names: list[str]) -> None:
    for name in names:
        await mon.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


async def convert_live(mon: Monitor, node: str, target: str, *,
                       target_node: bool = False) -> None:
    """Copy a disk into a new qcow2 image `target` (with `target_node`, into the block node
    of that name, already added) while the guest runs, then switch the guest over to it
    (drive-mirror or blockdev-mirror, block-job-complete)."""
    job = f"gv-convert-{next(_ids)}"
    async with mon.listen("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR") as ev:
        if target_node:
            await mon.execute("blockdev-mirror", {"job-id": job, "device": node,
                                                  "target": target, "sync": "full"})
        else:
            await mon.execute("drive-mirror", {"job-id": job, "device": node,
                                               "target": target, "format": "qcow2",
                                               "sync": "full", "mode": "absolute-paths"})
        completing = False
        while True:
            try:
                raw: Any = await asyncio.wait_for(ev.get(), 3600)
            except TimeoutError:
                await mon.execute("block-job-cancel", {"device": job, "force": True})
                raise QemuError("converting the disk took more than an hour") from None
            event: dict[str, Any] = dict(raw)
            data: dict[str, Any] = dict(event.get("data") or {})
            if data.get("device") != job:
                continue
            if event["event"] == "BLOCK_JOB_ERROR":
                await mon.execute("block-job-cancel", {"device": job, "force": True})
                raise QemuError(f"converting the disk failed: {data.get('operation')} error")
            if event["event"] == "BLOCK_JOB_READY" and not completing:
                completing = True
                await mon.execute("block-job-complete", {"device": job})
            elif event["event"] == "BLOCK_JOB_COMPLETED":
                if data.get("error"):
                    raise QemuError(f"converting the disk failed: {data['error']}")
                return
