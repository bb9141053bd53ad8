"""The actions a task can run: domain verbs, create, migrate, host maintenance and evacuation,
virtual-service drain and weights. Each calls the gridvmd API in-process (`AppClient`), so the
same routes, checks and cluster routing serve the CLI, tasks and the web console.

`prepare(api, req)` checks the request (bad parameters, unknown domain, host or service are
errors here and no task is made) and returns the runner that does the work and logs it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from gridvm.api.client import AppClient, q
from gridvm.api.tasks import Runner, Task, TaskRequest
from gridvm.config.xmfile import parse_config
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound

FOLLOW_S = 0.25              # how often a migration's progress is read
LOG_PROGRESS_S = 1.0         # a progress line in the log at most this often


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def progress_detail(job: dict[str, Any]) -> str:
    """A migration job's RAM progress in one line."""
    ram = job["ram"]
    parts = [f"sent {size_text(ram['transferred'])}", f"left {size_text(ram['remaining'])}",
             f"dirty {size_text(ram['dirty_rate'])}/s"]
    if job.get("expected_downtime_ms") is not None:
        parts.append(f"expected downtime {job['expected_downtime_ms']} ms")
    if ram["iterations"]:
        parts.append(f"pass {ram['iterations']}")
    return " · ".join(parts)


def migration_summary(job: dict[str, Any], host: str) -> str:
    """One line with QEMU's figures for a completed migration."""
    total = job["total_time_ms"]
    parts = [f"total {total / 1000:.2f} s" if total is not None else "total ?",
             f"downtime {job['downtime_ms']} ms", f"setup {job['setup_time_ms']} ms",
             f"sent {size_text(job['ram']['transferred'])}"]
    if job["copy_storage"]:
        parts.append(f"disks {size_text(job['storage']['total'])}")
    where = f"{host} (id={job['dest_domid']})" if job["dest_domid"] is not None else host
    return f"Migrated {job['domain']} to {where}: " + ", ".join(parts)


def percent(job: dict[str, Any]) -> float:
    """How far a migration job is, 0–100."""
    if job["phase"] == "completed":
        return 100.0
    if job["phase"] == "storage" and job["storage"]["total"]:
        return 100.0 * float(job["storage"]["copied"]) / float(job["storage"]["total"])
    ram = job["ram"]
    if job["phase"] in ("memory", "switchover") and ram["total"] and ram["transferred"]:
        done = float(ram["total"] - ram["remaining"]) / float(ram["total"])
        return max(0.0, min(99.0, 100.0 * done))
    return 0.0


# ----- parameters ------------------------------------------------------------------------


class NoParams(BaseModel, extra="forbid"):
    pass


class WaitParams(BaseModel, extra="forbid"):
    timeout: float = Field(default=120, ge=1, le=3600)


class CreateParams(BaseModel, extra="forbid"):
    config: str = Field(min_length=1, max_length=64 * 1024)   # xm/xl config text
    host: str | None = None                                   # cluster: skip placement
    managed: bool = False                                     # define (xm new) …
    start: bool = True                                        # … and start it or not


class MigrateParams(BaseModel, extra="forbid"):
    host: str | None = None        # a cluster host, or …
    address: str | None = None     # … a gridvmd's ADDR:PORT
    live: bool = True
    bandwidth: int | None = Field(default=None, ge=1, le=1_000_000)   # MiB/s
    timeout: float = Field(default=600, ge=5, le=86_400)


class MaintenanceParams(BaseModel, extra="forbid"):
    on: bool


class EvacuateParams(BaseModel, extra="forbid"):
    timeout: float = Field(default=600, ge=5, le=86_400)


class DrainParams(BaseModel, extra="forbid"):
    domain: str
    undo: bool = False


class WeightParams(BaseModel, extra="forbid"):
    domain: str
    weight: int = Field(ge=0, le=65535)


# ----- domain verbs ----------------------------------------------------------------------


async def _domain(api: AppClient, ref: str) -> dict[str, Any]:
    """A domain's view; in a cluster with the host that has it."""
    view: dict[str, Any] = await api.get(f"/domains/{q(ref)}")
    if "host" not in view and (await api.get("/cluster")).get("joined"):
        view["host"] = next((d.get("host") for d in await api.get("/domains")
                             if d["uuid"] == view["uuid"]), None)
    return view


def _where(view: dict[str, Any]) -> str:
    return f" on {view['host']}" if view.get("host") else ""


def _verb(verb: str, *, wait: bool = False) -> Prepare:
    async def prepare(api: AppClient, target: str, params: BaseModel) -> tuple[str, Runner]:
        view = await _domain(api, target)
        if verb == "start" and view["domid"] is not None:
            raise Conflict(f"domain {view['name']} is already running")
        if verb != "start" and view["domid"] is None:
            raise Conflict(f"domain {view['name']} is not running")
        uuid = view["uuid"]

        async def run(task: Task) -> Any:
            task.log(f"{verb} {view['name']}{_where(view)}")
            body: dict[str, Any] = {}
            if wait:
                assert isinstance(params, WaitParams)
                body = {"wait": True, "timeout": params.timeout}
                task.log(f"waiting up to {params.timeout:.0f} s for the guest")
            answer = await api.post(f"/domains/{q(uuid)}/{verb}", body)
            if verb == "start":
                task.log(f"started domain {answer['name']} (id={answer['domid']})")
            return answer

        return view["name"], run
    return prepare


async def _create(api: AppClient, target: str, params: BaseModel) -> tuple[str, Runner]:
    assert isinstance(params, CreateParams)
    loaded = await asyncio.to_thread(parse_config, params.config, "<config>")  # CPU-bound
    cfg = loaded.config.model_dump(mode="json")

    async def run(task: Task) -> Any:
        for warning in loaded.warnings:
            task.log(f"warning: {warning}")
        what = "define" if not params.start else "create"
        task.log(f"{what} domain {loaded.config.name}"
                 + (f" on {params.host}" if params.host else ""))
        view = await api.post("/domains", {"config": cfg, "managed": params.managed,
                                           "start": params.start},
                              params={"host": params.host} if params.host else None)
        if params.start:
            task.log(f"started domain {view['name']} (id={view['domid']}){_where(view)}")
        return view

    return loaded.config.name, run


# ----- migration -------------------------------------------------------------------------


async def follow_migration(api: AppClient, task: Task, job: dict[str, Any],
                           source: str | None, timeout: float) -> dict[str, Any]:
    """Follow a migration job on its source host until it ends; log and report progress."""
    deadline = time.monotonic() + timeout + 60
    phase, logged = "", 0.0
    while True:
        if job["phase"] != phase:
            phase = job["phase"]
            task.log(f"{job['domain']}: {phase}")
        pct = percent(job)
        task.progress(phase=phase, percent=round(pct, 1), domain=job["domain"],
                      transferred=job["ram"]["transferred"], remaining=job["ram"]["remaining"])
        if phase in ("memory", "switchover") and time.monotonic() - logged >= LOG_PROGRESS_S:
            logged = time.monotonic()
            task.log(f"{job['domain']}: {pct:.0f}% {progress_detail(job)}")
        if job["finished"] is not None:
            return job
        if time.monotonic() > deadline:
            raise GridvmError(f"migration of {job['domain']} did not end in time")
        await asyncio.sleep(FOLLOW_S)
        job = await api.get(f"/migrations/{q(job['id'])}", host=source)


async def _migrate(api: AppClient, target: str, params: BaseModel) -> tuple[str, Runner]:
    assert isinstance(params, MigrateParams)
    view = await _domain(api, target)
    if view["domid"] is None:
        raise Conflict(f"domain {view['name']} is not running")
    if params.host and params.host == view.get("host"):
        raise Conflict(f"domain {view['name']} already runs on {params.host}")
    if not (params.host or params.address):
        raise ConfigError("migrate: say where to: a host of the cluster or ADDR:PORT")
    dest = params.host or str(params.address)

    async def run(task: Task) -> Any:
        task.log(f"migrate {view['name']}{_where(view)} to {dest}, "
                 + ("live" if params.live else "paused during the copy"))
        job = await api.post(f"/domains/{q(view['uuid'])}/migrate", {
            "target": dest, "live": params.live, "bandwidth": params.bandwidth,
            "timeout": params.timeout})
        job = await follow_migration(api, task, job, view.get("host"), params.timeout)
        if job["phase"] != "completed":
            raise GridvmError(job["error"] or f"migration of {job['domain']} {job['phase']}")
        task.log(migration_summary(job, dest))
        return {**job, "from": view.get("host"), "to": params.host}

    return view["name"], run


# ----- hosts -----------------------------------------------------------------------------


async def _maintenance(api: AppClient, target: str, params: BaseModel) -> tuple[str, Runner]:
    assert isinstance(params, MaintenanceParams)
    hosts = {h["name"] for h in await api.get("/cluster/hosts")}
    if target not in hosts:
        raise NotFound(f"unknown host {target!r} (hosts: {', '.join(sorted(hosts))})")

    async def run(task: Task) -> Any:
        task.log(f"maintenance {'on' if params.on else 'off'} for host {target}")
        return await api.post(f"/cluster/hosts/{q(target)}/maintenance", {"on": params.on})

    return target, run


async def _evacuate(api: AppClient, target: str, params: BaseModel) -> tuple[str, Runner]:
    """Start the cluster's evacuation job for a host (gridvm.cluster.evacuation: the plan is
    refused before anything moves) and follow it, logging every step."""
    assert isinstance(params, EvacuateParams)
    await api.get(f"/cluster/hosts/{q(target)}/evacuation")   # refuses up front

    async def run(task: Task) -> Any:
        job = await api.post(f"/cluster/hosts/{q(target)}/evacuate",
                             {"timeout": params.timeout})
        task.log(f"{target}: maintenance on; {job['total']} domain(s) to move "
                 f"(evacuation job {job['id']})")
        logged, phase, said = 0, "", 0.0
        while True:
            for m in job["moved"][logged:]:
                task.log(f"{m['domain']}: {m['from']} -> {m['to']} in {m['total_ms']} ms "
                         f"(downtime {m['downtime_ms']} ms)")
            logged = len(job["moved"])
            cur = job.get("current")
            if job["phase"] == "running" and cur:
                pct = (100.0 * (logged + percent(cur) / 100.0) / max(job["total"], 1))
                task.progress(phase=cur["phase"], percent=round(pct, 1),
                              domain=cur["domain"])
                if cur["phase"] != phase or time.monotonic() - said >= LOG_PROGRESS_S:
                    phase, said = cur["phase"], time.monotonic()
                    task.log(f"[{job['index'] + 1}/{job['total']}] {cur['domain']}: {phase} "
                             f"{percent(cur):.0f}%")
            if job["phase"] != "running":
                break
            await asyncio.sleep(FOLLOW_S)
            job = await api.get(f"/cluster/evacuations/{q(job['id'])}")
        for d in job["left"]:
            task.log(f"{d['domain']} is {d['state']}: its definition stays on {target}")
        if job["phase"] != "completed":
            done = ", ".join(m["domain"] for m in job["moved"]) or "none"
            raise GridvmError(f"evacuation of {target} {job['phase']}: {job['error']}; "
                              f"moved: {done}; {target} stays in maintenance")
        task.log(f"{target}: {len(job['moved'])} domain(s) moved; host is in maintenance "
                 f"(gridvm host maintenance {target} off to bring it back)")
        return {"host": target, "job": job["id"], "maintenance": True, "moved": job["moved"],
                "left": job["left"]}

    return target, run


# ----- virtual services ------------------------------------------------------------------


async def _backend(api: AppClient, service: str, domain: str) -> dict[str, Any]:
    view: dict[str, Any] = await api.get(f"/services/{q(service)}")
    if domain not in {b["domain"] for b in view["backends"]}:
        raise NotFound(f"service {service} has no backend {domain!r}")
    return view


async def _drain(api: AppClient, target: str, params: BaseModel) -> tuple[str, Runner]:
    assert isinstance(params, DrainParams)
    await _backend(api, target, params.domain)

    async def run(task: Task) -> Any:
        task.log(f"{target}: {params.domain} "
                 + ("back into rotation" if params.undo else "draining (open connections finish)"))
        return await api.post(f"/services/{q(target)}/drain",
                              {"domain": params.domain, "undo": params.undo})

    return target, run


async def _weight(api: AppClient, target: str, params: BaseModel) -> tuple[str, Runner]:
    assert isinstance(params, WeightParams)
    await _backend(api, target, params.domain)

    async def run(task: Task) -> Any:
        task.log(f"{target}: {params.domain} weight {params.weight}")
        return await api.post(f"/services/{q(target)}/weight",
                              {"domain": params.domain, "weight": params.weight})

    return target, run


Prepare = Callable[[AppClient, str, BaseModel], Awaitable[tuple[str, Runner]]]

ACTIONS: dict[str, tuple[type[BaseModel], Prepare]] = {
    "domain.create": (CreateParams, _create),
    "domain.start": (NoParams, _verb("start")),
    "domain.shutdown": (WaitParams, _verb("shutdown", wait=True)),
    "domain.reboot": (WaitParams, _verb("reboot", wait=True)),
    "domain.destroy": (NoParams, _verb("destroy")),
    "domain.pause": (NoParams, _verb("pause")),
    "domain.unpause": (NoParams, _verb("unpause")),
    "domain.migrate": (MigrateParams, _migrate),
    "host.maintenance": (MaintenanceParams, _maintenance),
    "host.evacuate": (EvacuateParams, _evacuate),
    "service.drain": (DrainParams, _drain),
    "service.weight": (WeightParams, _weight),
}


async def prepare(api: AppClient, req: TaskRequest) -> tuple[str, Runner]:
    """Check a task request; its target (a domain's name) and the runner that does it."""
    if req.action not in ACTIONS:
        raise ConfigError(f"unknown action {req.action!r} (actions: {', '.join(ACTIONS)})")
    model, prep = ACTIONS[req.action]
    try:
        params = model.model_validate(req.params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "params"
        raise ConfigError(f"{req.action}: {where}: {first['msg']}") from None
    return await prep(api, req.target, params)
