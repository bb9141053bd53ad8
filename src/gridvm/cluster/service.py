"""The cluster's operations on hosts and placement: where a new domain goes, the evacuation
plan, the host list, maintenance and host removal. They read and write the cluster state
through the node (etcd) and never import the API layer; `evacuation.py` runs the plans.
"""

from __future__ import annotations

from typing import Any

from gridvm.cluster import enroll
from gridvm.cluster.custody import WAITING, Custody
from gridvm.cluster.node import ClusterNode
from gridvm.cluster.placement import (
    ACTIVE,
    Demand,
    NoHostFits,
    loads_from,
    place,
    place_ha,
    why_not,
)
from gridvm.config.model import RESTARTED, DomainConfig
from gridvm.errors import Conflict, NotFound, ResourceError

MOVABLE = ("running", "blocked", "paused")


def evacuation_plan(node: ClusterNode, name: str) -> dict[str, Any]:
    """Where each running domain of `name` goes, by placement over the other hosts (largest
    first, each placement counting against its host). Raises before anything moves: the
    host is unknown or down, or some domain fits nowhere (with each host's reason). Domains
    bound to their host (`ha = "fence"`, e.g. database members) stay: they are `left`."""
    ccfg, cluster = node.need()
    states = cluster.host_states()
    if name not in states:
        raise NotFound(f"unknown host {name!r} (hosts: {', '.join(sorted(states))})")
    if states[name] not in ("up", "maintenance"):
        raise Conflict(f"host {name} is {states[name]}: there is nothing to migrate from it "
                       "(HA restarts its domains elsewhere)")
    registry = cluster.domains()
    loads = loads_from(states, cluster.capacity(), registry)
    others = [h for n, h in sorted(loads.items()) if n != name]
    mine = sorted(((uuid, DomainConfig.model_validate(rec["config"]), rec)
                   for uuid, rec in registry.items() if rec.get("host") == name),
                  key=lambda t: (-Demand.of(t[1]).memory_mb, -Demand.of(t[1]).cpu, t[1].name))
    moves: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    for uuid, cfg, rec in mine:
        if rec.get("state") not in MOVABLE:
            left.append({"domain": cfg.name, "uuid": uuid, "state": rec.get("state")})
            continue
        if cfg.ha.ha == "fence":      # host-bound: its service moves its role, not the domain
            left.append({"domain": cfg.name, "uuid": uuid, "state": rec.get("state"),
                         "reason": "bound to its host (ha = fence)"})
            continue
        demand = Demand.of(cfg)
        try:
            dest = place(demand, others, cpu_ratio=ccfg.cpu_ratio)
        except NoHostFits as exc:
            raise ResourceError(f"cannot evacuate {name}: {exc}; nothing was moved") from None
        dest.add(demand)
        moves.append({"domain": cfg.name, "uuid": uuid, "from": name, "to": dest.name,
                      "memory_mb": demand.memory_mb, "state": rec.get("state")})
    return {"host": name, "state": states[name], "url": cluster.hosts()[name].get("url"),
            "moves": moves, "left": left}


def host_list(node: ClusterNode) -> list[dict[str, Any]]:
    """Every joined host: state, capacity, load and domains."""
    _, cluster = node.need()
    states = cluster.host_states()
    caps = cluster.capacity()
    registry = cluster.domains()
    loads = loads_from(states, caps, registry)
    leader = node.election.leader() if node.election else None
    rows = []
    for name, state in sorted(states.items()):
        load, cap = loads[name], caps.get(name, {})
        rows.append({
            "name": name, "state": state, "leader": name == leader,
            "cpus": cap.get("cpus"), "memory_mb": cap.get("memory_mb"),
            "used_mb": load.used_mb, "used_cpu": round(load.used_cpu, 2),
            "load": cap.get("load"), "domains": sorted(
                str(r["name"]) for r in registry.values() if r.get("host") == name)})
    return rows


def set_maintenance(node: ClusterNode, name: str, on: bool) -> dict[str, Any]:
    _, cluster = node.need()
    key = cluster.key("hosts", name)
    rec = cluster.etcd.get_json(key)
    if rec is None:
        raise NotFound(f"unknown host {name!r} (hosts: {', '.join(cluster.hosts())})")
    cluster.etcd.put_json(key, {**rec, "maintenance": on})
    return {"host": name, "maintenance": on}


def remove_host(node: ClusterNode, name: str) -> dict[str, Any]:
    """Forget a host that is gone for good: its entry, and the registry records of its
    domains (their names become free to use again). Refused for this host, for a host that
    is up or in maintenance (evacuate it and stop it first), and while HA domains of it
    still wait for the HA manager to restart them elsewhere."""
    ccfg, cluster = node.need()
    states = cluster.host_states()
    if name not in states:
        raise NotFound(f"unknown host {name!r} (hosts: {', '.join(sorted(states))})")
    if name == ccfg.host:
        raise Conflict(f"host {name} cannot remove itself; run this on another host")
    if states[name] not in ("down", "fenced"):
        raise Conflict(f"host {name} is {states[name]}: only a host that is down can be "
                       "removed (evacuate it, then stop its gridvmd)")
    mine = {uuid: rec for uuid, rec in cluster.domains().items() if rec.get("host") == name}
    waiting = sorted(str(r["name"]) for r in mine.values() if r.get("ha", "off") in RESTARTED
                     and r.get("state") in (*ACTIVE, "lost"))
    if waiting:
        raise Conflict(f"host {name} still has HA domains waiting to be restarted elsewhere: "
                       f"{', '.join(waiting)}; try again once they run")
    for uuid, rec in mine.items():
        cluster.forget_domain(uuid, str(rec.get("name", "")))
    cluster.forget_host(name)
    revoked = enroll.revoke(cluster, name)
    return {"host": name, "forgotten": sorted(str(r.get("name")) for r in mine.values()),
            "revoked_serial": str(revoked) if revoked is not None else None}


def choose_host(node: ClusterNode, cfg: DomainConfig, forced: str | None) -> str:
    """The host a new domain goes to (placement, or the forced one if it can run it)."""
    ccfg, cluster = node.need()
    existing = cluster.find_domain(cfg.name)
    if existing is not None:
        raise Conflict(f"domain name {cfg.name!r} is already in use in the cluster "
                       f"on host {existing.get('host')}")
    states = cluster.host_states()
    loads = loads_from(states, cluster.capacity(), cluster.domains())
    demand = Demand.of(cfg)
    if forced:
        if forced not in loads:
            raise NotFound(f"unknown host {forced!r} (hosts: {', '.join(sorted(loads))})")
        if loads[forced].state != "up":  # forcing skips placement, not host health
            why = why_not(demand, loads[forced], cpu_ratio=ccfg.cpu_ratio)
            raise ResourceError(f"host {forced} cannot take domain {cfg.name}: {why}")
        return forced
    return place(demand, list(loads.values()), cpu_ratio=ccfg.cpu_ratio).name




def revoke_member(node: ClusterNode, name: str) -> dict[str, Any]:
    """Revoke a member's certificate (an administrator's client, a witness): every host and
    etcd member refuses it from their next CRL reload on. Hosts go through `remove_host`."""
    _, cluster = node.need()
    if name in cluster.hosts():
        raise Conflict(f"{name} is a host: remove it with gridvm host remove {name} (which "
                       "also revokes its certificate)")
    serial = enroll.revoke(cluster, name)
    if serial is None:
        raise NotFound(f"no certificate is in force for {name!r}")
    return {"member": name, "revoked_serial": str(serial)}


def restart_failed(node: ClusterNode, uuid: str) -> tuple[str, dict[str, Any]]:
    """The operator starts a domain the HA manager gave up on (`ha-failed`): place it as an
    HA restart, hand the record to that host (restart count cleared); (host, record) to
    launch there. `relaunch_failed` puts it back if the launch fails."""
    ccfg, cluster = node.need()
    got = cluster.domain_kv(uuid)
    if got is None:
        raise NotFound(f"no domain {uuid} in the cluster")
    rec, rev = got
    if rec.get("state") != Custody.HA_FAILED:
        raise Conflict(f"domain {rec['name']} is {rec.get('state')}: the HA manager restarts "
                       "it; only an ha-failed domain is started by hand")
    registry = cluster.domains()
    loads = loads_from(cluster.host_states(), cluster.capacity(), registry,
                       skip=frozenset({uuid}))
    target = place_ha(Demand.of(DomainConfig.model_validate(rec["config"])),
                      list(loads.values()), cpu_ratio=ccfg.cpu_ratio).name
    update = {"host": target, "state": Custody.RESTARTING.value, "ha_restarts": [],
              "reason": "started by the operator"}
    if not cluster.move_domain(uuid, rev, update):
        raise Conflict(f"domain {rec['name']} changed meanwhile; try again")
    return target, {**rec, **update}


def restart_failed_back(node: ClusterNode, uuid: str, why: str) -> None:
    """The operator's launch failed: the domain is ha-failed again (unless a host has it)."""
    _, cluster = node.need()
    got = cluster.domain_kv(uuid)
    if got is not None and got[0].get("state") == Custody.RESTARTING:
        cluster.move_domain(uuid, got[1], {"state": Custody.HA_FAILED.value, "reason": why})


def forget_waiting(node: ClusterNode, uuid: str) -> dict[str, Any]:
    """Delete a domain no host holds (lost or ha-failed) from the registry; its name is free
    again. Refused if it changed meanwhile (the HA manager restarted it)."""
    _, cluster = node.need()
    got = cluster.domain_kv(uuid)
    if got is None:
        raise NotFound(f"no domain {uuid} in the cluster")
    rec, rev = got
    if rec.get("state") not in WAITING or not cluster.forget_domain_at(uuid, rev,
                                                                       str(rec["name"])):
        raise Conflict(f"domain {rec['name']} is {rec.get('state')} now: a host has it")
    return {"name": rec["name"], "uuid": uuid, "state": "removed"}
