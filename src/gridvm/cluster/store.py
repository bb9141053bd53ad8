"""The cluster store: the host's SQLite store, mirrored into the cluster registry in etcd.

The host's own records stay in SQLite (its gridvmd works even while etcd is unreachable);
every change is also published to `/gridvm/domains/<uuid>` with this host's name, and
domain names are claimed cluster-wide in `/gridvm/names/<name>` before a record is first
written. A record that etcd says belongs to another host (the HA manager moved it) is never
overwritten; `resync` reconciles both sides after the host regains its lease.

An HA domain (`ha = 'restart'`, not managed) that stopped unexpectedly and that its host does
not restart becomes `lost` in the registry, never deleted, so the HA manager restarts it
(`hands_over` tells the host so; `delete` hears the stop reason from it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gridvm.cluster.core import Cluster
from gridvm.cluster.custody import WAITING, Custody
from gridvm.cluster.etcd import Compare, EtcdError, delete_op
from gridvm.cluster.placement import ACTIVE
from gridvm.cluster.settings import Files
from gridvm.errors import Conflict, GridvmError
from gridvm.lifecycle import DomainState
from gridvm.store.records import DomainRecord, Store

log = logging.getLogger("gridvm.cluster.store")

# Stops the HA manager undoes. "gone": gridvmd found the QEMU gone when it started (the host
# or gridvmd was down), which the HA manager does not count as a guest failure.
UNEXPECTED = ("poweroff", "crash", "qemu-died", "gone")


def registry_record(rec: DomainRecord, host: str, old: dict[str, Any] | None) -> dict[str, Any]:
    cfg = rec.config
    return {
        "uuid": rec.uuid, "name": rec.name, "host": host, "state": rec.state,
        "managed": rec.managed, "domid": rec.domid, "memory": cfg.max_memory,
        "vcpus": cfg.vcpus, "ha": cfg.ha.ha, "priority": cfg.ha.ha_priority,
        "group": cfg.ha.ha_group, "config": cfg.model_dump(mode="json"),
        "ha_restarts": (old or {}).get("ha_restarts", []),
    }


class ClusterStore:
    """A `Store` for a clustered host (wraps the local one)."""

    def __init__(self, local: Store, cluster: Cluster, host: str, files: Files) -> None:
        self.local = local
        self.cluster = cluster
        self.host = host
        self.files = files
        self.dirty = False
        self.moved_away: set[str] = set()   # migrated to another host: leave the registry be
        self.claims: set[str] = set()       # migrated here: registry not yet given to us

    def fenced(self) -> bool:
        return self.files.fenced.exists()

    def _etcd(self, fn: Callable[[], None], *, required: bool = False) -> None:
        """Run a registry update; if etcd is unreachable fail (`required`) or resync later."""
        if self.fenced():
            if required:
                raise Conflict(f"host {self.host} is fenced (it lost its cluster lease)")
            self.dirty = True
            return
        try:
            fn()
        except EtcdError as exc:
            if required:
                raise GridvmError(f"the cluster store is unreachable: {exc}") from exc
            log.warning("registry update deferred: %s", exc)
            self.dirty = True

    # ----- Store ----------------------------------------------------------------------------

    def put(self, rec: DomainRecord) -> None:
        ha = rec.config.ha.ha != "off"
        if ha and rec.state is DomainState.STARTING and self.fenced():
            raise Conflict(f"host {self.host} is fenced: HA domain {rec.name} cannot start here")
        prev = self.local.get(rec.uuid)
        if prev is None or prev.name != rec.name:
            self._etcd(lambda: self.cluster.reserve_name(rec.name, rec.uuid), required=True)
        self.local.put(rec)
        if prev is not None and prev.name != rec.name:
            self._etcd(lambda: self.cluster.release_name(prev.name, rec.uuid))
        if prev is not None and prev.domid is not None and prev.domid != rec.domid:
            (self.files.ha / str(prev.domid)).unlink(missing_ok=True)
        if ha and rec.domid is not None:
            self.files.ha.mkdir(parents=True, exist_ok=True)
            (self.files.ha / str(rec.domid)).touch()
        if rec.uuid in self.moved_away:     # the destination owns the registry record now
            return
        self._etcd(lambda: self.publish(rec))

    def publish(self, rec: DomainRecord) -> None:
        got = self.cluster.domain_kv(rec.uuid)
        old = got[0] if got else None
        if old and old.get("host") != self.host:
            log.warning("%s: the registry gives it to host %s; not publishing",
                        rec.name, old.get("host"))
            return
        self.cluster.etcd.put_json(self.cluster.key("domains", rec.uuid),
                                   registry_record(rec, self.host, old))

    def delete(self, uuid: str, *, reason: str | None = None) -> None:
        """Forget a domain here; in the registry it becomes `lost` if `hands_over` says the
        HA manager restarts it (the record and the name stay), else it is deleted."""
        rec = self.local.get(uuid)
        self.local.delete(uuid)
        if rec is None:
            return
        if rec.domid is not None:
            (self.files.ha / str(rec.domid)).unlink(missing_ok=True)
        if uuid in self.moved_away:         # the destination takes the record and the name
            self.moved_away.discard(uuid)
            return
        self._etcd(lambda: self._unregister(rec, reason))

    def hands_over(self, rec: DomainRecord, reason: str) -> bool:
        """An HA domain that stopped unexpectedly and that its host does not restart: the
        HA manager restarts it (on any host), so its host must keep no copy of it."""
        return rec.config.ha.ha == "restart" and not rec.managed and reason in UNEXPECTED

    def arrived(self, rec: DomainRecord) -> None:
        """A live migration to this host completed: the registry record (and the name) are
        now this host's, whatever the source has done with them so far."""
        self.claims.add(rec.uuid)
        self._etcd(lambda: self._claim(rec))

    def departing(self, uuid: str) -> None:
        """Migrated away: the destination takes the registry record and the name."""
        self.moved_away.add(uuid)

    def _claim(self, rec: DomainRecord) -> None:
        got = self.cluster.domain_kv(rec.uuid)
        self.cluster.etcd.put_json(self.cluster.key("domains", rec.uuid),
                                   registry_record(rec, self.host, got[0] if got else None))
        self.cluster.reserve_name(rec.name, rec.uuid)
        self.claims.discard(rec.uuid)

    def _unregister(self, rec: DomainRecord, reason: str | None) -> None:
        got = self.cluster.domain_kv(rec.uuid)
        if got is not None:
            old, rev = got
            if old.get("host") != self.host:
                return                      # moved to another host: not ours any more
            if reason is not None and self.hands_over(rec, reason):
                lost = {"state": Custody.LOST.value, "domid": None, "reason": reason}
                if not self.cluster.move_domain(rec.uuid, rev, lost):
                    self.dirty = True       # changed meanwhile: resync marks it lost
                log.warning("%s: stopped (%s) and not restarted here: marked lost for the "
                            "HA manager", rec.name, reason)
                return
            key = self.cluster.key("domains", rec.uuid)
            self.cluster.etcd.txn([Compare(key, "MOD", rev)], [delete_op(key)])
        self.cluster.release_name(rec.name, rec.uuid)

    def get(self, uuid: str) -> DomainRecord | None:
        return self.local.get(uuid)

    def by_name(self, name: str) -> DomainRecord | None:
        return self.local.by_name(name)

    def all(self) -> list[DomainRecord]:
        return self.local.all()

    def next_domid(self) -> int:
        return self.local.next_domid()

    def get_meta(self, key: str) -> str | None:
        return self.local.get_meta(key)

    def set_meta(self, key: str, value: str) -> None:
        self.local.set_meta(key, value)

    # ----- reconciliation -------------------------------------------------------------------

    def resync(self) -> list[DomainRecord]:
        """Publish local records and settle differences with the registry.

        Returns the local records the registry has given to another host (stale copies the
        caller must drop). Registry records of this host that are no longer here are
        marked lost (HA restart) or removed."""
        reg = self.cluster.domains()
        local = {r.uuid: r for r in self.local.all()}
        stale = []
        for r in local.values():
            g = reg.get(r.uuid)
            if r.uuid in self.claims:
                try:
                    self._claim(r)
                except Conflict as exc:
                    log.error("%s: %s", r.name, exc)
                continue
            if g and g.get("host") != self.host:
                stale.append(r)
                continue
            try:
                self.cluster.reserve_name(r.name, r.uuid)
                self.publish(r)
            except Conflict as exc:
                log.error("%s: %s", r.name, exc)
        for uuid, g in reg.items():
            # lost / ha-failed: the HA manager's (a resync may run twice before it acts)
            if g.get("host") != self.host or uuid in local or g.get("state") in WAITING:
                continue
            got = self.cluster.domain_kv(uuid)
            if got is None:
                continue
            if g.get("ha") == "restart" and g.get("state") in ACTIVE:
                self.cluster.move_domain(uuid, got[1], {"state": Custody.LOST.value,
                                                        "domid": None, "reason": "fenced"})
                log.warning("%s: gone while this host was fenced: marked lost for the HA "
                            "manager", g.get("name"))
            else:
                key = self.cluster.key("domains", uuid)
                self.cluster.etcd.txn([Compare(key, "MOD", got[1])], [delete_op(key)])
                self.cluster.release_name(g["name"], uuid)
                log.info("%s: no longer on this host: removed from the registry", g.get("name"))
        self.dirty = False
        return stale
