"""Start and stop one gridvmd as a child process (optionally inside a network namespace)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gridvm.api.client import Client, DaemonNotRunning, q
from gridvm.errors import GridvmError
from gridvm.paths import Home


def gridvmd_argv() -> list[str]:
    """How to run gridvmd with this interpreter (works from a venv or a checkout)."""
    return [sys.executable, "-m", "gridvm.gridvmd"]


class Agent:
    """A gridvmd child with its own home; the guests it starts outlive it."""

    def __init__(self, home: Path, *, ns: str | None = None, accel: str = "auto",
                 images: Path | None = None, args: Sequence[str] = (),
                 wrap: Sequence[str] = ()) -> None:
        self.home = Home(home.absolute())
        self.args = list(args)     # more gridvmd options, e.g. --listen
        self.wrap = list(wrap)     # runs it elsewhere, e.g. in a lab machine's mount namespace
        self.ns = ns
        self.accel = accel
        self.images = images
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.home.ensure()
        env = dict(os.environ, GRIDVM_HOME=str(self.home.root), GRIDVM_ACCEL=self.accel)
        if self.images:
            env["GRIDVM_IMAGES"] = str(self.images)
        argv = self.wrap + gridvmd_argv() + (["--netns", self.ns] if self.ns else []) + \
            self.args
        if os.environ.get("GRIDVM_DEBUG"):
            argv.append("-v")
        out = open(self.home.root / "gridvmd.stderr", "ab")  # noqa: SIM115 (owned by child)
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=out, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.home.root / "gridvmd.stderr").read_text(errors="replace")
                raise GridvmError(f"gridvmd exited at start: {tail.strip()[-300:]}")
            if self.ping():
                return
            time.sleep(0.05)
        self.stop()
        raise GridvmError(f"gridvmd did not answer within {timeout:.0f}s")

    def ping(self) -> bool:
        if not self.home.api_socket.exists():
            return False
        c = self.client()
        try:
            c.get("/info", timeout=2)
            return True
        except (DaemonNotRunning, GridvmError):
            return False
        finally:
            c.close()

    def client(self) -> Client:
        return Client(self.home)

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the daemon only (SIGTERM, or SIGKILL with kill=True); guests keep running."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def destroy_all(self) -> None:
        """Destroy every running domain and delete every definition (for teardown)."""
        c = self.client()
        try:
            for view in c.get("/domains"):
                with contextlib.suppress(GridvmError):
                    if view["domid"] is not None:
                        c.post(f"/domains/{q(view['uuid'])}/destroy")
                with contextlib.suppress(GridvmError):
                    c.delete(f"/domains/{q(view['uuid'])}")
        finally:
            c.close()
