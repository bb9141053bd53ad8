"""The cluster's shared state in etcd, and the lease and election helpers built on it.

Key layout (all under /gridvm/):

    cluster              {"name", "created"}: written by `cluster init`
    hosts/<h>            a joined host: {"name", "api", "address", "maintenance"}
    alive/<h>            present while host h's lease lives (written by its watchdog)
    capacity/<h>         h's capacity and load, on h's lease (written by its gridvmd)
    fenced/<h>           h was declared dead and fenced: {"at", "by"}
    domains/<uuid>       where a domain is defined: {"name", "host", "state", "config", ...}
    names/<name>         <uuid>: cluster-wide unique domain names
    election/ha          the HA manager election (etcd's election API)

`Lease` (a lease kept alive by a thread, with a callback when it is lost) and `Election`
(etcd's campaign on such a lease) are meant for reuse, e.g. by virtual services to own a VIP.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gridvm.cluster import custody
from gridvm.cluster.etcd import Compare, Etcd, EtcdError, delete_op, put_op
from gridvm.cluster.hoststate import derive
from gridvm.errors import Conflict

log = logging.getLogger("gridvm.cluster")

ROOT = "/gridvm/"
HA_ELECTION = "gridvm/election/ha"


class Lease:
    """An etcd lease renewed by a background thread.

    The lease counts as lost when etcd says it expired, or when it could not be renewed for
    `ttl - margin` seconds since the last successful renewal was *sent* — i.e. strictly
    before etcd can expire it. `on_lost(old_id)` runs in the thread; a new lease is then
    granted as soon as etcd answers again (`on_granted(new_id)`). A renewal waits up to
    `rpc_timeout` (default: the renewal interval) for etcd, never past that deadline."""

    def __init__(self, etcd: Etcd, ttl: int, *, margin: float | None = None,
                 rpc_timeout: float | None = None,
                 on_granted: Callable[[int], None] | None = None,
                 on_lost: Callable[[int], None] | None = None, name: str = "lease") -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.margin = margin if margin is not None else max(ttl / 3, 0.5)
        self.interval = max(ttl / 6, 0.1)
        self.rpc_timeout = rpc_timeout if rpc_timeout is not None else self.interval
        self.on_granted = on_granted
        self.on_lost = on_lost
        self.id: int | None = None
        self.last_ok = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, revoke: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl + 2)
        lease, self.id = self.id, None
        if revoke and lease:
            try:
                self.etcd.revoke(lease)
            except EtcdError as exc:
                log.warning("could not revoke lease %x: %s", lease, exc)

    def wait_granted(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.id is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.id

    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self._step(t0)
            except Exception:   # a surprise must not end renewals: the deadline still holds
                log.exception("%s: unexpected error", self._thread.name)
            self._stop.wait(max(self.interval - (time.monotonic() - t0), 0.01))

    def _step(self, t0: float) -> None:
        """Grant a lease if none is held, else renew it (declaring it lost past its deadline)."""
        if self.id is None:
            try:
                lease = self.etcd.grant(self.ttl)
            except EtcdError as exc:
                log.debug("lease grant failed: %s", exc)
                return
            try:
                if self.on_granted:
                    self.on_granted(lease)
                self.id, self.last_ok = lease, t0
            except EtcdError as exc:
                log.warning("lease %x granted but not set up: %s", lease, exc)
                with contextlib.suppress(EtcdError):
                    self.etcd.revoke(lease)
            return
        expired = False
        try:
            left = self.last_ok + self.ttl - self.margin - time.monotonic()
            expired = self.etcd.keepalive(
                self.id, timeout=max(min(self.rpc_timeout, left), 0.05)) <= 0
            if not expired:
                self.last_ok = t0
        except EtcdError as exc:
            log.debug("lease keepalive failed: %s", exc)
        except Exception:     # whatever went wrong, the deadline below still applies
            log.exception("lease %x: keepalive failed unexpectedly", self.id)
        if expired or time.monotonic() - self.last_ok > self.ttl - self.margin:
            lost, self.id = self.id, None
            log.warning("lease %x lost (%s)", lost,
                        "expired" if expired else "could not renew in time")
            if self.on_lost:
                self.on_lost(lost)


class Election:
    """Campaign for leadership of `name` on a lease of our own (etcd's election API).

    `is_leader` is true from the moment etcd elects us until our lease is lost or we stop;
    `stop()` revokes the lease, so another candidate takes over at once. `on_change()` runs
    (in a thread of the election) whenever `is_leader` may have changed, so an owner can act
    at once rather than at its next poll."""

    def __init__(self, etcd: Etcd, name: str, value: str, ttl: int, *,
                 margin: float | None = None, rpc_timeout: float | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.etcd = etcd
        self.name = name
        self.value = value
        self.ttl = ttl
        self.on_change = on_change
        self._key: str | None = None
        self._key_lease: int | None = None
        self.previous: str | None = None         # the leader's value when we last campaigned
        self.lease = Lease(etcd, ttl, margin=margin, rpc_timeout=rpc_timeout, on_lost=self._lost,
                           name=f"election-{name}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._campaign, name=f"campaign-{name}",
                                        daemon=True)

    def start(self) -> None:
        self.lease.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._key = None
        self.lease.stop(revoke=True)

    @property
    def is_leader(self) -> bool:
        return self._key is not None and self._key_lease == self.lease.id

    def leader(self) -> str | None:
        """The current leader's value (e.g. host name), from etcd."""
        kv = self.etcd.leader(self.name)
        return kv.value if kv else None

    def _lost(self, _: int) -> None:
        self._key = None
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("election %s: on_change failed", self.name)

    def _campaign(self) -> None:
        while not self._stop.is_set():
            lease = self.lease.id
            if lease is None or self.is_leader:
                self._stop.wait(0.1)
                continue
            try:
                held = self.etcd.leader(self.name)
                self.previous = held.value if held else None
                key = self.etcd.campaign(self.name, lease, self.value,
                                         timeout=max(self.ttl * 2, 5))
            except EtcdError:
                self._stop.wait(0.2)
                continue
            if self.lease.id == lease and not self._stop.is_set():
                self._key, self._key_lease = key, lease
                log.info("elected leader of %s", self.name)
                self._changed()


class Cluster:
    """Typed access to the cluster's keys in etcd."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    @staticmethod
    def key(*parts: str) -> str:
        return ROOT + "/".join(parts)

    def info(self) -> dict[str, Any] | None:
        data = self.etcd.get_json(self.key("cluster"))
        return data if isinstance(data, dict) else None

    def init(self, name: str) -> dict[str, Any]:
        """Mark this etcd as a gridvm cluster (idempotent)."""
        info = {"name": name, "created": time.time()}
        self.etcd.create(self.key("cluster"), _dumps(info))
        return self.info() or info

    def _map(self, kind: str) -> dict[str, Any]:
        prefix = self.key(kind) + "/"
        return {kv.key.removeprefix(prefix): kv.json() for kv in self.etcd.range(prefix)}

    def hosts(self) -> dict[str, dict[str, Any]]:
        return self._map("hosts")

    def alive(self) -> dict[str, dict[str, Any]]:
        return self._map("alive")

    def capacity(self) -> dict[str, dict[str, Any]]:
        return self._map("capacity")

    def fenced(self) -> dict[str, dict[str, Any]]:
        return self._map("fenced")

    def domains(self) -> dict[str, dict[str, Any]]:
        """Registry records by uuid."""
        return self._map("domains")

    def host_states(self) -> dict[str, str]:
        """up | down | fenced | maintenance (a HostState) for every joined host."""
        alive, fenced = self.alive(), self.fenced()
        out: dict[str, str] = {}
        for name, rec in self.hosts().items():
            out[name] = derive(fenced=name in fenced, alive=name in alive,
                               maintenance=bool(rec.get("maintenance")))
        return out

    def find_domain(self, ref: str) -> dict[str, Any] | None:
        """A registry record by name or uuid."""
        uuid = self.etcd.get(self.key("names", ref))
        rec = self.etcd.get_json(self.key("domains", uuid.value if uuid else ref))
        return rec if isinstance(rec, dict) else None

    def reserve_name(self, name: str, uuid: str) -> None:
        """Claim a domain name for `uuid` (idempotent); Conflict if another domain has it."""
        key = self.key("names", name)
        if self.etcd.create(key, uuid):
            return
        kv = self.etcd.get(key)
        if kv is not None and kv.value != uuid:
            owner = self.etcd.get_json(self.key("domains", kv.value)) or {}
            where = f" on host {owner['host']}" if owner.get("host") else ""
            raise Conflict(f"domain name {name!r} is already in use in the cluster{where}")
        if kv is None:
            self.reserve_name(name, uuid)

    def release_name(self, name: str, uuid: str) -> None:
        key = self.key("names", name)
        self.etcd.txn([Compare(key, "VALUE", uuid)], [delete_op(key)])

    def forget_domain(self, uuid: str, name: str) -> None:
        """Delete a registry record and release its name."""
        self.etcd.delete(self.key("domains", uuid))
        if name:
            self.release_name(name, uuid)

    def forget_domain_at(self, uuid: str, rev: int, name: str) -> bool:
        """Delete a registry record if it is still at revision `rev`, and release its name."""
        key = self.key("domains", uuid)
        if not self.etcd.txn([Compare(key, "MOD", rev)], [delete_op(key)]):
            return False
        self.release_name(name, uuid)
        return True

    def forget_host(self, name: str) -> None:
        """Delete everything kept about a host (its lease-bound keys expire on their own)."""
        for kind in ("hosts", "fenced", "capacity", "alive"):
            self.etcd.delete(self.key(kind, name))

    def move_domain(self, uuid: str, expect_rev: int, update: dict[str, Any]) -> bool:
        """Compare-and-swap a registry record (e.g. give it to a new host); a change of
        custody must be in the table (custody.CUSTODY)."""
        key = self.key("domains", uuid)
        kv = self.etcd.get(key)
        if kv is None or kv.mod_revision != expect_rev:
            return False
        old = kv.json()
        new = {**old, **update}
        custody.step(str(old.get("name", uuid)), old, new)
        return self.etcd.txn([Compare(key, "MOD", expect_rev)], [put_op(key, _dumps(new))])

    def put_domain(self, uuid: str, record: dict[str, Any]) -> None:
        """Write a whole registry record (a change of custody must be in the table)."""
        old = self.etcd.get_json(self.key("domains", uuid))
        custody.step(str(record.get("name", uuid)), old if isinstance(old, dict) else None,
                     record)
        self.etcd.put_json(self.key("domains", uuid), record)

    def mark_fenced(self, host: str, *, by: str) -> None:
        """Record that `host` was declared dead and fenced (by the HA manager on `by`)."""
        self.etcd.put_json(self.key("fenced", host), {"at": time.time(), "by": by})

    def domain_kv(self, uuid: str) -> tuple[dict[str, Any], int] | None:
        kv = self.etcd.get(self.key("domains", uuid))
        return (kv.json(), kv.mod_revision) if kv else None


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)
