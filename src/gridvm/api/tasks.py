"""Tasks: every mutating action run through gridvmd, with a live log and a final status
(Proxmox's task log). Kept in the home's `tasks.db`, listed by `gridvm task list` and the
web console.

A task is started with an action name (`gridvm.api.actions`), a target and parameters. The
action's check runs first, in the request: bad input or a domain that does not exist is an
error and no task is made. Then the task runs in the background: `log` lines and `progress`
are stored as they come, and the task ends `ok` (with a result) or `failed` (with one line
saying why). Tasks a previous gridvmd left running are marked failed when gridvmd starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from gridvm.errors import GridvmError, NotFound
from gridvm.paths import Home

log = logging.getLogger("gridvm.tasks")

TaskState = Literal["running", "ok", "failed"]
KEEP = 1000                 # tasks kept in the list (the oldest finished ones go first)

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    user TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    error TEXT,
    progress TEXT,
    result TEXT
);
CREATE TABLE IF NOT EXISTS task_log (
    task TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (task, seq)
);
"""


class TaskStore:
    """Tasks and their log lines in SQLite."""

    def __init__(self, home: Home) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(home.root / "tasks.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _exec(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add(self, tid: str, action: str, target: str, user: str, started: float) -> None:
        self._exec("INSERT INTO tasks(id, action, target, user, state, started) "
                   "VALUES (?, ?, ?, ?, 'running', ?)", tid, action, target, user, started)
        old = self._exec("SELECT id FROM tasks WHERE state != 'running' ORDER BY started DESC "
                         "LIMIT -1 OFFSET ?", KEEP)
        for (gone,) in old:
            self._exec("DELETE FROM task_log WHERE task = ?", gone)
            self._exec("DELETE FROM tasks WHERE id = ?", gone)

    def line(self, tid: str, seq: int, text: str) -> None:
        self._exec("INSERT INTO task_log VALUES (?, ?, ?, ?)", tid, seq, time.time(), text)

    def progress(self, tid: str, progress: dict[str, Any]) -> None:
        self._exec("UPDATE tasks SET progress = ? WHERE id = ?", json.dumps(progress), tid)

    def finish(self, tid: str, state: TaskState, error: str | None, result: Any) -> None:
        self._exec("UPDATE tasks SET state = ?, finished = ?, error = ?, result = ? "
                   "WHERE id = ?", state, time.time(), error, json.dumps(result), tid)

    def interrupted(self) -> list[str]:
        """Mark tasks left running by a previous gridvmd as failed; their ids."""
        ids = [r[0] for r in self._exec("SELECT id FROM tasks WHERE state = 'running'")]
        for tid in ids:
            self.finish(tid, "failed", "gridvmd stopped while the task ran; check the "
                        "domain's state", None)
        return ids

    def view(self, tid: str) -> dict[str, Any]:
        rows = self._exec("SELECT * FROM tasks WHERE id = ?", tid)
        if not rows:
            raise NotFound(f"no task {tid!r}")
        return _view(rows[0])

    def views(self, limit: int, target: str | None = None) -> list[dict[str, Any]]:
        if target:
            rows = self._exec("SELECT * FROM tasks WHERE target = ? ORDER BY started DESC "
                              "LIMIT ?", target, limit)
        else:
            rows = self._exec("SELECT * FROM tasks ORDER BY started DESC LIMIT ?", limit)
        return [_view(r) for r in rows]

    def lines(self, tid: str, after: int = 0) -> list[dict[str, Any]]:
        rows = self._exec("SELECT seq, time, line FROM task_log WHERE task = ? AND seq > ? "
                          "ORDER BY seq", tid, after)
        return [{"seq": s, "time": t, "line": text} for s, t, text in rows]


def _view(row: tuple[Any, ...]) -> dict[str, Any]:
    tid, action, target, user, state, started, finished, error, progress, result = row
    return {"id": tid, "action": action, "target": target, "user": user, "state": state,
            "started": started, "finished": finished, "error": error,
            "progress": json.loads(progress) if progress else None,
            "result": json.loads(result) if result else None}


class Task:
    """A running task, as its action sees it: `log` a line, report `progress`."""

    def __init__(self, tid: str, service: Tasks) -> None:
        self.id = tid
        self._svc = service
        self._seq = 0

    def log(self, text: str) -> None:
        self._seq += 1
        self._svc.store.line(self.id, self._seq, text)
        self._svc.bump()

    def progress(self, **progress: Any) -> None:
        self._svc.store.progress(self.id, progress)
        self._svc.bump()


Runner = Callable[[Task], Awaitable[Any]]


class Tasks:
    """Starts tasks and tells watchers (the web console) when any task changed."""

    def __init__(self, home: Home) -> None:
        self.store = TaskStore(home)
        self.version = 0
        self._changed = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}

    def reconcile(self) -> None:
        for tid in self.store.interrupted():
            log.warning("task %s was interrupted by a gridvmd restart", tid)

    def bump(self) -> None:
        self.version += 1
        self._changed.set()

    async def wait_change(self, version: int, timeout: float) -> int:
        """Wait until the version moves past `version` (or `timeout`); the current one."""
        with contextlib.suppress(TimeoutError):
            while self.version == version:
                self._changed.clear()
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.version

    def start(self, action: str, target: str, user: str, run: Runner) -> dict[str, Any]:
        """Record a task and run it in the background; its view (state running)."""
        tid = f"{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}"
        self.store.add(tid, action, target, user, time.time())
        task = Task(tid, self)
        self._running[tid] = asyncio.create_task(self._run(task, action, target, run),
                                                 name=f"task-{tid}")
        self.bump()
        return self.store.view(tid)

    async def _run(self, task: Task, action: str, target: str, run: Runner) -> None:
        log.info("task %s: %s %s started", task.id, action, target)
        try:
            result = await run(task)
        except asyncio.CancelledError:
            self.store.finish(task.id, "failed", "gridvmd stopped while the task ran", None)
            raise
        except Exception as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, GridvmError):
                log.exception("task %s failed", task.id)
                error = f"internal error: {type(exc).__name__}: {error}"
            task.log(f"error: {error}")
            self.store.finish(task.id, "failed", error, None)
            log.info("task %s: %s %s failed: %s", task.id, action, target, error)
        else:
            task.log("done")
            self.store.finish(task.id, "ok", None, result)
            log.info("task %s: %s %s done", task.id, action, target)
        finally:
            self._running.pop(task.id, None)
            self.bump()

    async def close(self) -> None:
        for t in list(self._running.values()):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.store.close()


class TaskRequest(BaseModel):
    action: str = Field(max_length=64)
    target: str = Field(min_length=1, max_length=256)
    params: dict[str, Any] = Field(default_factory=dict)
    user: str = Field(default="cli", max_length=128)


Starter = Callable[[TaskRequest], Awaitable[dict[str, Any]]]


def task_routes(tasks: Tasks, start: Starter) -> APIRouter:
    """`/v1/tasks`: start one (`start` checks and runs the action), list, show, log."""
    r = APIRouter(prefix="/v1/tasks")

    @r.post("")
    async def create(req: TaskRequest) -> dict[str, Any]:
        return await start(req)

    @r.get("")
    async def list_tasks(limit: int = Query(default=50, ge=1, le=1000),
                         target: str | None = None) -> list[dict[str, Any]]:
        return tasks.store.views(limit, target)

    @r.get("/{tid}")
    async def show(tid: str, after: int = Query(default=0, ge=0)) -> dict[str, Any]:
        return {**tasks.store.view(tid), "log": tasks.store.lines(tid, after)}

    return r
