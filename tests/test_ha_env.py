"""The real HA environment's own parts that need no etcd: the fence command, launches
through the node's launcher, and one priority level's launches side by side."""

from __future__ import annotations

import threading
from typing import Any, cast

import pytest

from gridvm.cluster.core import Cluster
from gridvm.cluster.ha_env import EtcdHaEnv, FenceFailed
from gridvm.errors import GridvmError


def env(fence_command: str | None = None, **kw: Any) -> EtcdHaEnv:
    launched: list[tuple[str, dict[str, Any], bool]] = kw.pop("launched", [])

    def launch(host: str, config: dict[str, Any], managed: bool) -> None:
        if host == "bad":
            raise GridvmError("cannot reach host bad")
        launched.append((host, config, managed))

    return EtcdHaEnv(cast(Cluster, None), "h1", launch=launch, is_leader=lambda: True,
                     fence_command=fence_command)


def test_fence_runs_the_command_with_the_host() -> None:
    env().fence("h2")                              # no command: nothing to run
    env("true").fence("h2")
    with pytest.raises(FenceFailed, match="false failed"):
        env("false").fence("h2")
    with pytest.raises(FenceFailed, match="exit 3"):
        env("sh -c 'test $0 = h2 && exit 3'").fence("h2")


def test_launch_goes_through_the_nodes_launcher() -> None:
    launched: list[tuple[str, dict[str, Any], bool]] = []
    e = env(launched=launched)
    e.launch("h3", {"name": "web"}, False)
    assert launched == [("h3", {"name": "web"}, False)]
    with pytest.raises(GridvmError, match="cannot reach"):
        e.launch("bad", {"name": "web"}, False)


def test_run_all_runs_a_level_side_by_side() -> None:
    barrier = threading.Barrier(3, timeout=5)     # only passes if all three run at once
    done: list[int] = []

    def job(i: int) -> None:
        barrier.wait()
        done.append(i)

    env().run_all([lambda i=i: job(i) for i in range(3)])
    assert sorted(done) == [0, 1, 2]
