"""`gridvm host evacuate`'s plan (no guests): destinations by placement with the host left
out, largest domains first, and a refusal naming the domain and each host's reason."""

from __future__ import annotations

from typing import Any, cast

import pytest

from gridvm.cluster.node import ClusterNode
from gridvm.cluster.service import evacuation_plan
from gridvm.cluster.settings import ClusterConfig
from gridvm.config.model import DomainConfig
from gridvm.errors import Conflict, NotFound, ResourceError


class FakeCluster:
    def __init__(self, states: dict[str, str], mem: int = 1000) -> None:
        self.states = states
        self.caps = {h: {"cpus": 2, "memory_mb": mem} for h in states}
        self.registry: dict[str, dict[str, Any]] = {}

    def add(self, name: str, host: str, memory: int = 100, state: str = "running",
            **ha: Any) -> None:
        cfg = DomainConfig.model_validate({"name": name, "memory": memory, "ha": ha})
        self.registry[f"uuid-{name}"] = {"name": name, "host": host, "state": state,
                                         "config": cfg.model_dump(mode="json")}

    def host_states(self) -> dict[str, str]:
        return dict(self.states)

    def capacity(self) -> dict[str, dict[str, Any]]:
        return self.caps

    def domains(self) -> dict[str, dict[str, Any]]:
        return self.registry

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {h: {"name": h, "url": f"https://10.0.0.{h[1:]}:8002"} for h in self.states}


class FakeNode:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def need(self) -> tuple[ClusterConfig, FakeCluster]:
        return ClusterConfig(etcd="http://x:2379", host="h1"), self.cluster


def plan_of(cluster: FakeCluster, host: str) -> dict[str, Any]:
    plan: dict[str, Any] = evacuation_plan(cast(ClusterNode, FakeNode(cluster)), host)
    return plan


def test_plan_excludes_the_host_honours_groups_and_goes_largest_first() -> None:
    c = FakeCluster({"h1": "up", "h2": "up", "h3": "up"})
    c.add("small", "h2", 100)
    c.add("big", "h2", 600, ha_group="g")
    c.add("other", "h1", 100, ha_group="g")
    c.add("off", "h2", 100, state="shutoff")
    p = plan_of(c, "h2")
    assert [(m["domain"], m["to"]) for m in p["moves"]] == [("big", "h3"), ("small", "h1")]
    assert p["left"] == [{"domain": "off", "uuid": "uuid-off", "state": "shutoff"}]
    assert p["url"] == "https://10.0.0.2:8002"


def test_no_room_names_the_domain_and_each_hosts_reason() -> None:
    c = FakeCluster({"h1": "up", "h2": "up", "h3": "maintenance"}, mem=500)
    c.add("a", "h2", 400)
    c.add("b", "h2", 300)
    with pytest.raises(ResourceError) as exc:
        plan_of(c, "h2")
    assert str(exc.value) == (
        "cannot evacuate h2: no host fits domain b (300 MiB, 1 CPU): h1: memory: needs "
        "300 MiB, 100 MiB free; h3: host is in maintenance; nothing was moved")


def test_unknown_and_dead_hosts() -> None:
    c = FakeCluster({"h1": "up", "h2": "fenced"})
    with pytest.raises(NotFound, match=r"unknown host 'h9' \(hosts: h1, h2\)"):
        plan_of(c, "h9")
    with pytest.raises(Conflict, match="host h2 is fenced"):
        plan_of(c, "h2")
