"""What the browser sees, kept fresh: one poller per gridvmd shared by every open page.

The hub reads the API in-process in sections (hosts, domains, tasks, networks, services,
images) and hands each subscriber a section whenever it changed (a server-sent event per
section). Domains and hosts are read every second, and at once when a domain of this host
changes state (the hub looks at the host's running domains ten times a second) or a task
moved; tasks whenever one changed; the slower sections every few seconds. It runs only while
a page is subscribed, and a little longer (a reload or a new tab paints from memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from gridvm.api.client import AppClient
from gridvm.api.tasks import Tasks
from gridvm.errors import GridvmError
from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.web")

TICK_S = 0.1            # how often the host's own domains are looked at
FAST_S = 1.0            # hosts, domains (the whole cluster)
SLOW_S = 3.0            # networks, services, images
TASKS_SHOWN = 50
LINGER_S = 30.0         # keep reading this long after the last page left


class Hub:
    def __init__(self, api: AppClient, manager: HostManager, tasks: Tasks) -> None:
        self.api = api
        self.m = manager
        self.tasks = tasks
        self.sections: dict[str, str] = {}          # name -> JSON text last sent
        self._subs: set[asyncio.Queue[tuple[str, str]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._refresh = asyncio.Event()
        self._left = 0.0                            # when the last subscriber left

    # ----- subscribers ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[tuple[str, str]]]:
        """A queue of (section, JSON) updates, starting with every section known now."""
        q: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for name, text in self.sections.items():
            q.put_nowait((name, text))
        self._subs.add(q)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="web-hub")
        try:
            yield q
        finally:
            self._subs.discard(q)
            self._left = time.monotonic()

    def poke(self) -> None:
        """Read the fast sections now (an action was just started)."""
        self._refresh.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _publish(self, name: str, data: Any) -> None:
        text = json.dumps(data, separators=(",", ":"), default=str)
        if self.sections.get(name) == text:
            return
        self.sections[name] = text
        for q in self._subs:
            q.put_nowait((name, text))

    # ----- the poller -------------------------------------------------------------------

    def _local_states(self) -> tuple[tuple[str, str, int | None], ...]:
        return tuple(sorted((vm.rec.uuid, vm.rec.state, vm.rec.domid)
                            for vm in self.m.vms.values()))

    async def _run(self) -> None:
        fast = slow = 0.0
        seen_local = None
        seen_tasks = -1
        while self._subs or time.monotonic() - self._left < LINGER_S:
            now = time.monotonic()
            local = self._local_states()
            tasks_moved = self.tasks.version != seen_tasks
            try:
                if tasks_moved:
                    seen_tasks = self.tasks.version
                    self._publish("tasks", self.tasks.store.views(TASKS_SHOWN))
                if local != seen_local or now - fast >= FAST_S or self._refresh.is_set() \
                        or tasks_moved:
                    self._refresh.clear()
                    seen_local, fast = local, now
                    await self._fast()
                if now - slow >= SLOW_S:
                    slow = now
                    await self._slow()
            except Exception:                       # keep serving the pages
                log.exception("web: reading the API failed")
                await asyncio.sleep(FAST_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), TICK_S)
        self.sections.clear()                       # nobody watches: read afresh next time

    async def _get(self, path: str, default: Any, host: str | None = None) -> Any:
        try:
            return await self.api.get(path, host=host)
        except GridvmError as exc:
            log.debug("web: GET %s: %s", path, exc)
            return default

    async def _fast(self) -> None:
        info = await self._get("/info", {})
        cluster = await self._get("/cluster", {"joined": False})
        if cluster.get("joined"):
            hosts = await self._get("/cluster/hosts", [])
        else:
            hosts = [{"name": "localhost", "state": "up", "leader": False,
                      "cpus": info.get("nr_cpus"), "memory_mb": info.get("total_memory"),
                      "used_mb": info.get("total_memory", 0) - info.get("free_memory", 0),
                      "load": None, "domains": []}]
        domains = await self._get("/domains", [])
        live = [h["name"] for h in hosts if h["state"] in ("up", "maintenance")] \
            if cluster.get("joined") else [None]
        cpu = {s["uuid"]: s["cpu_percent"] for h in live
               for s in (await self._get("/stats", {}, host=h)).get("domains", [])}
        for d in domains:
            slim(d)
            if d.get("uuid") in cpu:
                d["cpu_percent"] = cpu[d["uuid"]]
        self._publish("hosts", {"info": info, "cluster": cluster, "hosts": hosts})
        self._publish("domains", domains)

    async def _slow(self) -> None:
        self._publish("networks", await self._get("/networks", []))
        self._publish("services", await self._get("/services", []))
        self._publish("images", await self._get("/images", []))


def slim(view: dict[str, Any]) -> None:
    """A domain's view for the list: its IPs and HA settings instead of its whole config."""
    cfg = view.pop("config", None) or {}
    view["ha"] = cfg.get("ha") or {}
    view["vnc"] = bool((cfg.get("display") or {}).get("vnc"))
    view["ips"] = sorted({str(v["ip"]) for v in view.get("vifs") or [] if v.get("ip")})
    view.pop("disks", None)
