"""Placement: memory/CPU fit, caps, spread, anti-affinity, pins, per-host reasons."""

from __future__ import annotations

import pytest

from gridvm.cluster.placement import Demand, HostLoad, NoHostFits, place, place_ha, plan
from gridvm.config.model import DomainConfig


def hosts(*names: str, mem: int = 1000, cpus: int = 2) -> list[HostLoad]:
    return [HostLoad(name=n, cpus=cpus, memory_mb=mem) for n in names]


def test_demand_counts_maxmem_and_cap() -> None:
    cfg = DomainConfig.model_validate({"name": "a", "memory": 100, "maxmem": 300, "vcpus": 4,
                                       "sched": {"cap": 50}, "ha": {"ha_group": "g",
                                                                    "hosts": ["h1"]}})
    d = Demand.of(cfg)
    assert (d.memory_mb, d.cpu, d.group, d.pins) == (300, 0.5, "g", ("h1",))
    assert Demand.of(DomainConfig(name="b", vcpus=3)).cpu == 3


def test_spreads_by_load_then_name() -> None:
    hs = hosts("h1", "h2", "h3")
    got = plan([Demand(f"d{i}", 100, 1) for i in range(6)], hs)
    assert sorted(got.values()) == ["h1", "h1", "h2", "h2", "h3", "h3"]
    assert got["d0"] == "h1" and got["d1"] == "h2"


def test_anti_affinity_pins_and_reasons() -> None:
    hs = hosts("h1", "h2", "h3")
    hs[0].add(Demand("fg5x1", 100, 1, group="voms"))
    hs[1].state = "down"
    assert place(Demand("fg6x1", 100, 1, group="voms"), hs).name == "h3"
    with pytest.raises(NoHostFits) as exc:
        place(Demand("x", 100, 1, group="voms", pins=("h1", "h2")), hs)
    msg = str(exc.value)
    assert "h1: anti-affinity: fg5x1 of group voms runs there" in msg
    assert "h2: host is down" in msg and "h3: not in the domain's hosts (h1, h2)" in msg
    # an HA restart may share a host when nothing else fits
    assert place_ha(Demand("x", 100, 1, group="voms", pins=("h1",)), hs).name == "h1"


def test_memory_and_cpu_limits() -> None:
    hs = hosts("h1", mem=500, cpus=1)
    hs[0].add(Demand("a", 300, 3))
    with pytest.raises(NoHostFits, match="memory: needs 300 MiB, 200 MiB free"):
        place(Demand("b", 300, 0.5), hs)
    with pytest.raises(NoHostFits, match="cpu: needs 2, 1 free"):
        place(Demand("c", 100, 2), hs, cpu_ratio=4)
    assert place(Demand("d", 100, 1), hs, cpu_ratio=4).name == "h1"
    hs[0].state = "maintenance"
    with pytest.raises(NoHostFits, match="h1: host is in maintenance"):
        place(Demand("e", 10, 0.1), hs)
