"""The cluster store against a real etcd (one member on loopback, no QEMU): an HA domain that
stopped unexpectedly and that its host does not restart becomes `lost` in the registry —
never deleted, its name kept — whether its host saw it stop or found it gone on re-adoption;
the HA manager then restarts it, counting only guest failures."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gridvm.cluster.core import Cluster
from gridvm.cluster.etcd import Etcd, EtcdError
from gridvm.cluster.ha import HaManager
from gridvm.cluster.ha_env import EtcdHaEnv
from gridvm.cluster.node import ClusterNode
from gridvm.cluster.service import forget_waiting, restart_failed, restart_failed_back
from gridvm.cluster.settings import Files
from gridvm.cluster.store import ClusterStore
from gridvm.config.model import DomainConfig
from gridvm.errors import Conflict, NotFound
from gridvm.fsm import IllegalTransition
from gridvm.host.manager import HostManager
from gridvm.host.resources import remove_home_groups
from gridvm.lifecycle import DomainState
from gridvm.paths import Home
from gridvm.store.records import DomainRecord
from gridvm.store.sqlite import SqliteStore


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("etcd")
    url, peer = f"http://127.0.0.1:{_port()}", f"http://127.0.0.1:{_port()}"
    with open(tmp / "etcd.log", "wb") as out:
        proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(tmp / "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"], stdout=out, stderr=out,
            stdin=subprocess.DEVNULL)
    try:
        etcd = Etcd(url, timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                etcd.get("/probe")
                break
            except EtcdError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp / "etcd.log").read_text()[-500:]
                time.sleep(0.1)
        etcd.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def cluster(etcd_url: str) -> Iterator[Cluster]:
    c = Cluster(Etcd(etcd_url, timeout=2))
    c.etcd.call("kv/deleterange", {"key": "Lw==", "range_end": "MA=="})   # "/" .. "0"
    yield c
    c.etcd.close()


def config(name: str, ha: str = "restart") -> DomainConfig:
    return DomainConfig.model_validate({
        "name": name, "uuid": str(uuidlib.uuid4()), "memory": 64, "ha": {"ha": ha}})


def host_store(tmp: Path, cluster: Cluster, host: str = "h1") -> ClusterStore:
    home = Home(tmp / host)
    home.ensure()
    return ClusterStore(SqliteStore(home.db), cluster, host, Files(home))


def running(store: ClusterStore, cfg: DomainConfig, *, managed: bool = False,
            domid: int = 7) -> DomainRecord:
    """A record as the host runtime leaves it once QEMU runs (without QEMU)."""
    rec = DomainRecord(config=cfg, managed=managed, domid=domid,
                       state=DomainState.RUNNING)
    store.put(rec)
    return rec


def registry(cluster: Cluster, cfg: DomainConfig) -> dict[str, Any] | None:
    got = cluster.domain_kv(cfg.uuid)
    return got[0] if got else None


def test_an_ha_domain_its_host_does_not_restart_is_lost_not_deleted(
        tmp_path: Path, cluster: Cluster) -> None:
    store = host_store(tmp_path, cluster)
    web = config("web")
    running(store, web)
    assert (store.files.ha / "7").exists()
    got = registry(cluster, web)
    assert got is not None and (got["state"], got["host"], got["domid"]) == ("running", "h1", 7)
    store.delete(web.uuid, reason="crash")
    got = registry(cluster, web)
    assert got is not None and (got["state"], got["reason"], got["domid"], got["host"]) == \
        ("lost", "crash", None, "h1")
    name = cluster.etcd.get(cluster.key("names", "web"))
    assert name is not None and name.value == web.uuid
    assert store.local.get(web.uuid) is None and not (store.files.ha / "7").exists()


@pytest.mark.parametrize(("ha", "managed", "reason"), [
    ("restart", False, "destroy"),       # the user stopped it
    ("restart", False, "save"),
    ("restart", False, "migration-unknown"),
    ("restart", False, None),            # e.g. rename-restart: the host restarts it
    ("best-effort", False, "crash"),     # only ha=restart domains are restarted when lost
    ("off", False, "qemu-died"),
])
def test_other_stops_leave_the_registry(tmp_path: Path, cluster: Cluster, ha: str,
                                        managed: bool, reason: str | None) -> None:
    store = host_store(tmp_path, cluster)
    web = config("web", ha)
    running(store, web, managed=managed)
    store.delete(web.uuid, reason=reason)
    assert registry(cluster, web) is None
    assert cluster.etcd.get(cluster.key("names", "web")) is None


def test_a_managed_ha_domain_is_never_handed_over(tmp_path: Path, cluster: Cluster) -> None:
    store = host_store(tmp_path, cluster)
    rec = running(store, config("db"), managed=True)
    assert not store.hands_over(rec, "crash") and not store.hands_over(rec, "qemu-died")
    assert store.hands_over(running(store, config("web")), "poweroff")
    assert not store.hands_over(running(store, config("web2")), "reboot")


def test_a_relaunch_in_place_moves_the_ha_marker(tmp_path: Path, cluster: Cluster) -> None:
    """The watchdog kills what the markers name: a restart in place (new domid, same
    record) must not leave the old one behind."""
    store = host_store(tmp_path, cluster)
    rec = running(store, config("web"), domid=7)
    rec.domid = 9
    store.put(rec)
    assert sorted(p.name for p in store.files.ha.iterdir()) == ["9"]


def test_a_resync_keeps_what_waits_for_the_ha_manager(tmp_path: Path, cluster: Cluster) -> None:
    """A host that lost its lease resyncs when quorum is back and again when its new lease
    comes: the second run must not delete the record the first marked lost (the HA manager
    may not have restarted it yet), nor one the HA manager gave up on."""
    store = host_store(tmp_path, cluster)
    web, failed, plain = config("web"), config("failed"), config("plain", "off")
    for cfg in (web, failed, plain):
        running(store, cfg)
    got = cluster.domain_kv(failed.uuid)
    assert got is not None
    cluster.move_domain(failed.uuid, got[1], {"state": "ha-failed"})
    store.files.fenced.write_text("0\n")            # the watchdog fenced the host
    for cfg in (web, failed, plain):
        store.delete(cfg.uuid, reason="qemu-died")   # deferred: fenced
    store.files.fenced.unlink()
    assert store.dirty
    for _ in range(2):
        assert store.resync() == []
        lost = registry(cluster, web)
        assert lost is not None and (lost["state"], lost["reason"]) == ("lost", "fenced")
        kept = registry(cluster, failed)
        assert kept is not None and kept["state"] == "ha-failed"
        assert registry(cluster, plain) is None
    names = {kv.key.rsplit("/", 1)[1] for kv in cluster.etcd.range(cluster.key("names") + "/")}
    assert names == {"web", "failed"}


def test_readoption_marks_a_vanished_ha_domain_lost(tmp_path: Path, cluster: Cluster) -> None:
    """The host comes back before the HA manager moved its domains: its gridvmd finds
    the QEMUs gone. HA domains become lost ("gone"); one that the HA manager already
    gave to another host is left alone; others leave the registry."""
    store = host_store(tmp_path, cluster)
    web, moved, plain = config("web"), config("moved"), config("plain", "off")
    running(store, web, domid=3)
    running(store, moved, domid=4)
    running(store, plain, domid=5)
    got = cluster.domain_kv(moved.uuid)
    assert got is not None
    cluster.move_domain(moved.uuid, got[1], {"host": "h2", "state": "running"})

    async def restart_gridvmd() -> None:
        m = HostManager(Home(tmp_path / "h1"), store, accel="tcg")
        try:
            await m.start()
        finally:
            await m.close()

    try:
        asyncio.run(restart_gridvmd())
    finally:
        remove_home_groups(Home(tmp_path / "h1"))
    assert store.all() == []
    lost = registry(cluster, web)
    assert lost is not None and (lost["state"], lost["reason"]) == ("lost", "gone")
    other = registry(cluster, moved)
    assert other is not None and (other["host"], other["state"]) == ("h2", "running")
    assert registry(cluster, plain) is None
    names = {kv.key.rsplit("/", 1)[1] for kv in cluster.etcd.range(cluster.key("names") + "/")}
    assert names == {"web", "moved"}


def test_the_ha_manager_restarts_lost_domains_counting_guest_failures_only(
        tmp_path: Path, cluster: Cluster) -> None:
    for host in ("h1", "h2"):
        cluster.etcd.put_json(cluster.key("hosts", host), {"name": host})
        cluster.etcd.put_json(cluster.key("alive", host), {})
        cluster.etcd.put_json(cluster.key("capacity", host), {"cpus": 4, "memory_mb": 4096})
    store = host_store(tmp_path, cluster)
    crashed, gone = config("crashed"), config("gone")
    for cfg, reason in ((crashed, "qemu-died"), (gone, "gone")):
        running(store, cfg)
        store.delete(cfg.uuid, reason=reason)
    launched: list[tuple[str, str]] = []

    def launch(host: str, cfg: dict[str, Any], managed: bool) -> None:
        launched.append((host, cfg["name"]))

    HaManager(EtcdHaEnv(cluster, "h2", launch=launch, is_leader=lambda: True)).round()
    assert sorted(name for _, name in launched) == ["crashed", "gone"]
    after = {cfg.name: registry(cluster, cfg) or {} for cfg in (crashed, gone)}
    assert {n: (g["state"], len(g["ha_restarts"])) for n, g in after.items()} == \
        {"crashed": ("restarting", 1), "gone": ("restarting", 0)}



class _Node:
    """What the cluster service needs of a ClusterNode: its settings and its cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def need(self) -> tuple[Any, Cluster]:
        return SimpleNamespace(host="h1", cpu_ratio=4.0), self.cluster


def test_custody_changes_follow_the_table(tmp_path: Path, cluster: Cluster) -> None:
    """The registry's custody of an HA domain changes only as custody.TABLE says: a record
    the HA manager gave up on is not marked lost again (nor re-placed by the HA manager)."""
    store = host_store(tmp_path, cluster)
    web = config("web")
    running(store, web)
    got = cluster.domain_kv(web.uuid)
    assert got is not None
    assert cluster.move_domain(web.uuid, got[1], {"state": "lost", "reason": "crash"})
    got = cluster.domain_kv(web.uuid)
    assert got is not None
    assert cluster.move_domain(web.uuid, got[1], {"state": "ha-failed"})
    got = cluster.domain_kv(web.uuid)
    assert got is not None
    with pytest.raises(IllegalTransition, match="ha-failed to lost"):
        cluster.move_domain(web.uuid, got[1], {"state": "lost"})
    with pytest.raises(IllegalTransition, match="ha-failed to held"):
        cluster.put_domain(web.uuid, {**got[0], "state": "running"})
    assert registry(cluster, web) == got[0]                  # nothing changed


def test_the_operator_starts_or_deletes_what_the_ha_manager_gave_up(
        tmp_path: Path, cluster: Cluster) -> None:
    store = host_store(tmp_path, cluster)
    web, db = config("web"), config("db")
    cluster.etcd.put_json(cluster.key("hosts", "h1"), {"name": "h1"})
    cluster.etcd.put_json(cluster.key("alive", "h1"), {"host": "h1"})
    cluster.etcd.put_json(cluster.key("capacity", "h1"), {"cpus": 2, "memory_mb": 1024})
    node = cast(ClusterNode, _Node(cluster))
    for cfg in (web, db):
        running(store, cfg)
        got = cluster.domain_kv(cfg.uuid)
        assert got is not None
        cluster.move_domain(cfg.uuid, got[1], {"state": "lost", "reason": "crash",
                                               "ha_restarts": [1.0, 2.0, 3.0]})
    with pytest.raises(Conflict, match="the HA manager restarts it"):
        restart_failed(node, web.uuid)                       # lost: not the operator's
    for cfg in (web, db):
        got = cluster.domain_kv(cfg.uuid)
        assert got is not None
        cluster.move_domain(cfg.uuid, got[1], {"state": "ha-failed"})
        store.local.delete(cfg.uuid)                         # it runs nowhere
    host, rec = restart_failed(node, web.uuid)
    assert host == "h1" and (rec["state"], rec["ha_restarts"]) == ("restarting", [])
    restart_failed_back(node, web.uuid, "no such image")     # the launch failed
    back = registry(cluster, web)
    assert back is not None and (back["state"], back["reason"]) == ("ha-failed",
                                                                    "no such image")
    assert forget_waiting(node, db.uuid)["state"] == "removed"
    assert registry(cluster, db) is None
    assert cluster.etcd.get(cluster.key("names", "db")) is None
    with pytest.raises(NotFound):
        forget_waiting(node, db.uuid)
