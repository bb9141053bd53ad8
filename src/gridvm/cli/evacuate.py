"""`gridvm host evacuate`: start the evacuation job in gridvmd and follow it (progress bar);
Ctrl-C detaches, the job goes on."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from gridvm.api.client import Client, q
from gridvm.errors import GridvmError

POLL_S = 0.25
err = Console(stderr=True)


def _line(job: dict[str, Any]) -> str:
    cur = job.get("current") or {}
    if job["phase"] != "running" or not cur:
        return str(job["phase"])
    step = job["moves"][job["index"]]
    ram = cur.get("ram") or {}
    sent = ram.get("transferred", 0) / 2**20
    return (f"{step['domain']} → {step['to']}: {cur.get('phase')} "
            f"({sent:.0f} MiB sent)")


def _follow(c: Client, jid: str, show: bool) -> dict[str, Any]:
    job: dict[str, Any] = c.get(f"/cluster/evacuations/{q(jid)}")
    if not show:
        while job["phase"] == "running":
            time.sleep(POLL_S)
            job = c.get(f"/cluster/evacuations/{q(jid)}")
        return job
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[what]}"),
                  console=err, transient=True) as bar:
        task = bar.add_task(f"evacuating {job['host']}", total=max(job["total"], 1),
                            what=_line(job))
        while job["phase"] == "running":
            bar.update(task, completed=len(job["moved"]), what=_line(job))
            time.sleep(POLL_S)
            job = c.get(f"/cluster/evacuations/{q(jid)}")
        bar.update(task, completed=len(job["moved"]), what=job["phase"])
    return job


def run(host: str, timeout: float, follow: str | None, as_json: bool) -> None:
    from gridvm.cli.main import client, emit_json, out

    c = client(60)
    jid = follow or str(c.post(f"/cluster/hosts/{q(host)}/evacuate", {"timeout": timeout})["id"])
    try:
        job = _follow(c, jid, show=not as_json)
    except KeyboardInterrupt:
        out.print(f"stopped following; the evacuation goes on in gridvmd "
                  f"(gridvm host evacuate {host} --follow {jid})", highlight=False)
        raise SystemExit(130) from None
    if as_json:
        emit_json({"host": job["host"], "job": job["id"], "phase": job["phase"],
                   "maintenance": True, "moved": job["moved"], "left": job["left"],
                   "error": job["error"]})
        if job["phase"] != "completed":
            raise SystemExit(1)
        return
    for m in job["moved"]:
        out.print(f"{m['domain']}: {m['from']} -> {m['to']} in {m['total_ms']} ms "
                  f"(downtime {m['downtime_ms']} ms)", highlight=False)
    for d in job["left"]:
        out.print(f"{d['domain']} is {d['state']}: its definition stays on {host}",
                  highlight=False)
    if job["phase"] != "completed":
        done = ", ".join(m["domain"] for m in job["moved"]) or "none"
        raise GridvmError(f"evacuation of {host} {job['phase']}: {job['error']}; moved: "
                          f"{done}; {host} stays in maintenance")
    out.print(f"{host}: {len(job['moved'])} domain(s) moved; host is in maintenance "
              f"(gridvm host maintenance {host} off to bring it back)", highlight=False)
