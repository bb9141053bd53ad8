"""Placement: which host should run a domain (pure logic, no I/O).

A host fits when it is up (not down, fenced or in maintenance), is allowed by the domain's
pins (`hosts = [...]`), has the memory left, has CPU left (each vCPU counts as one CPU, or
`cap`/100 of one when capped; hosts may be overcommitted by `cpu_ratio`), and runs no other
domain of the same anti-affinity group (`ha_group`). Among fitting hosts the least loaded
wins (memory share, then CPU share, then fewest domains, then name), which spreads domains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gridvm.cluster.custody import Custody
from gridvm.config.model import DomainConfig
from gridvm.errors import ResourceError
from gridvm.lifecycle import WITH_QEMU

DEFAULT_CPU_RATIO = 4.0


@dataclass(frozen=True)
class Demand:
    """What one domain needs from a host."""

    name: str
    memory_mb: int
    cpu: float
    group: str | None = None
    pins: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg: DomainConfig) -> Demand:
        cap = cfg.sched.cap
        cpu = min(cfg.vcpus, cap / 100) if cap else float(cfg.vcpus)
        return cls(name=cfg.name, memory_mb=cfg.max_memory, cpu=cpu, group=cfg.ha.ha_group,
                   pins=tuple(cfg.ha.hosts))


@dataclass
class HostLoad:
    """A host's capacity and what is already placed on it."""

    name: str
    state: str = "up"                 # up | down | fenced | maintenance
    cpus: int = 1
    memory_mb: int = 0                # memory available to guests in total
    used_mb: int = 0
    used_cpu: float = 0.0
    domains: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)   # ha_group -> a domain in it

    def add(self, d: Demand) -> None:
        self.used_mb += d.memory_mb
        self.used_cpu += d.cpu
        self.domains.append(d.name)
        if d.group:
            self.groups.setdefault(d.group, d.name)

    def remove(self, d: Demand) -> None:
        self.used_mb -= d.memory_mb
        self.used_cpu -= d.cpu
        if d.name in self.domains:
            self.domains.remove(d.name)
        if d.group and self.groups.get(d.group) == d.name:
            del self.groups[d.group]


class NoHostFits(ResourceError):
    """No host can take the domain; the message says why for each host."""

    def __init__(self, demand: Demand, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        detail = "; ".join(f"{h}: {r}" for h, r in sorted(reasons.items())) or "no hosts"
        super().__init__(f"no host fits domain {demand.name} ({demand.memory_mb} MiB, "
                         f"{demand.cpu:g} CPU): {detail}")


def why_not(d: Demand, h: HostLoad, *, cpu_ratio: float = DEFAULT_CPU_RATIO,
            strict_groups: bool = True) -> str | None:
    """Why `h` cannot take `d`, or None if it can."""
    if h.state != "up":
        return "host is in maintenance" if h.state == "maintenance" else f"host is {h.state}"
    if d.pins and h.name not in d.pins:
        return f"not in the domain's hosts ({', '.join(d.pins)})"
    free = h.memory_mb - h.used_mb
    if d.memory_mb > free:
        return f"memory: needs {d.memory_mb} MiB, {max(free, 0)} MiB free"
    cpu_free = h.cpus * cpu_ratio - h.used_cpu
    if d.cpu > cpu_free + 1e-9:
        return f"cpu: needs {d.cpu:g}, {max(cpu_free, 0):g} free"
    if strict_groups and d.group and d.group in h.groups:
        return f"anti-affinity: {h.groups[d.group]} of group {d.group} runs there"
    return None


def _score(d: Demand, h: HostLoad, cpu_ratio: float) -> tuple[float, float, int, bool, str]:
    mem = (h.used_mb + d.memory_mb) / max(h.memory_mb, 1)
    cpu = (h.used_cpu + d.cpu) / max(h.cpus * cpu_ratio, 1e-9)
    shares_group = bool(d.group and d.group in h.groups)
    return (round(mem, 3), round(cpu, 3), len(h.domains), shares_group, h.name)


def place(d: Demand, hosts: Iterable[HostLoad], *, cpu_ratio: float = DEFAULT_CPU_RATIO,
          strict_groups: bool = True) -> HostLoad:
    """The best host for `d`; raises NoHostFits naming each host's reason."""
    reasons: dict[str, str] = {}
    fits: list[HostLoad] = []
    for h in hosts:
        why = why_not(d, h, cpu_ratio=cpu_ratio, strict_groups=strict_groups)
        if why is None:
            fits.append(h)
        else:
            reasons[h.name] = why
    if not fits:
        raise NoHostFits(d, reasons)

    def key(h: HostLoad) -> tuple[bool, tuple[float, float, int, bool, str]]:
        score = _score(d, h, cpu_ratio)
        return score[3], score  # hosts without a member of the group first

    return min(fits, key=key)


def place_ha(d: Demand, hosts: Sequence[HostLoad], *,
             cpu_ratio: float = DEFAULT_CPU_RATIO) -> HostLoad:
    """Placement for an HA restart: anti-affinity holds whenever room allows."""
    try:
        return place(d, hosts, cpu_ratio=cpu_ratio)
    except NoHostFits:
        return place(d, hosts, cpu_ratio=cpu_ratio, strict_groups=False)


def plan(demands: Sequence[Demand], hosts: Sequence[HostLoad], *,
         cpu_ratio: float = DEFAULT_CPU_RATIO, ha: bool = False) -> dict[str, str]:
    """Place several domains in order (e.g. by HA priority): domain name -> host name.

    Each placement counts against the host for the next ones; raises NoHostFits for the
    first domain that fits nowhere."""
    out: dict[str, str] = {}
    for d in demands:
        h = place_ha(d, hosts, cpu_ratio=cpu_ratio) if ha else place(d, hosts,
                                                                     cpu_ratio=cpu_ratio)
        h.add(d)
        out[d.name] = h.name
    return out


def loads_from(states: dict[str, str], capacity: dict[str, dict[str, object]],
               registry: dict[str, dict[str, object]], *,
               skip: frozenset[str] = frozenset()) -> dict[str, HostLoad]:
    """HostLoads from the cluster's view: host states, published capacity, and the
    registry's active domains (except uuids in `skip`)."""
    loads = {}
    for name, state in states.items():
        cap = capacity.get(name)
        loads[name] = HostLoad(
            name=name, state=state if cap is not None or state != "up" else "down",
            cpus=int(str((cap or {}).get("cpus", 1))),
            memory_mb=int(str((cap or {}).get("memory_mb", 0))))
    for uuid, rec in registry.items():
        host = loads.get(str(rec.get("host")))
        if host is None or uuid in skip or rec.get("state") not in ACTIVE:
            continue
        cfg = DomainConfig.model_validate(rec["config"])
        host.add(Demand.of(cfg))
    return loads


# Registry states in which a domain occupies its host: every domain state with a QEMU, and
# the HA manager's "restarting" (placed, being launched).
ACTIVE = (*sorted(WITH_QEMU), Custody.RESTARTING.value)
