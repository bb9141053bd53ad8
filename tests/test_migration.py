"""Migration between the two hosts of a lab, with real guests (TCG): live back and forth under
a polling client, non-live, --copy-storage, save/restore across hosts, failure injection
(destination QEMU or gridvmd killed before the stream, during the copy, at the switch; the
source's gridvmd killed after the switch), refusals and bad input.

Failure moments are pinned with the daemons' test gates ($GRIDVM_MIGRATION_HOLD): while the
file `<dir>/<phase>` exists the source waits at that phase and touches `<phase>.reached`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from netlab import LabEnv, lab_env

from gridvm.api.client import Client
from gridvm.host import httpprobe, netns, procs
from gridvm.host.migration import HOLD_ENV
from gridvm.images.store import ImageInfo
from gridvm.paths import Home

pytestmark = pytest.mark.guest

API_PORT = 8002

_pool = ThreadPoolExecutor(max_workers=4)


@pytest.fixture(scope="module")
def lab(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    tmp = tmp_path_factory.mktemp("miglab")
    # The daemons' test gates: outside /tmp, which each lab machine has its own of.
    hold = Path(tempfile.mkdtemp(prefix="gvhold", dir="/var/tmp"))
    old = os.environ.get(HOLD_ENV)
    os.environ[HOLD_ENV] = str(hold)             # inherited by the lab's daemons
    try:
        with lab_env(tiny_image, tmp) as env:
            yield env
    finally:
        shutil.rmtree(hold, ignore_errors=True)
        if old is None:
            os.environ.pop(HOLD_ENV, None)
        else:
            os.environ[HOLD_ENV] = old


@pytest.fixture(autouse=True)
def clean_hosts(lab: LabEnv) -> Iterator[None]:
    """After each test both hosts run nothing, so one failure does not cascade."""
    yield
    for host in ("h1", "h2"):
        if not procs.pid_alive(lab.state.host(host).pid or 0):
            restart_daemon(lab, host)
        for view in views(lab, host):
            if view["domid"] is not None:
                lab.gridvm("destroy", view["uuid"], host=host, check=False)
            lab.gridvm("delete", view["uuid"], host=host, check=False)


# ----- helpers -------------------------------------------------------------------------------


def boot(lab: LabEnv, host: str, name: str, n: int, extra: str = "") -> str:
    ip = lab.guest_ip(n)
    lab.create(host, name, "bridge=xenbr0",
               f'ip = "{ip}"\nnetmask = "255.255.255.0"\n{extra}')
    assert lab.wait_http(ip) == name
    return ip


def client(lab: LabEnv, host: str) -> Client:
    return Client(Home(Path(lab.state.host(host).home)))


def views(lab: LabEnv, host: str) -> list[dict[str, Any]]:
    c = client(lab, host)
    try:
        found: list[dict[str, Any]] = c.get("/domains")
        return found
    finally:
        c.close()


def state(lab: LabEnv, host: str, name: str) -> str:
    c = client(lab, host)
    try:
        return str(c.get(f"/domains/{name}")["state"])
    finally:
        c.close()


def running_on(lab: LabEnv, name: str) -> list[str]:
    return [h for h in ("h1", "h2") for v in views(lab, h)
            if v["name"] == name and v["domid"] is not None]


def qemus(lab: LabEnv, host: str, name: str) -> list[int]:
    return lab.pids(host, f"gridvm:{name}")


def assert_one(lab: LabEnv, name: str, host: str, ip: str) -> None:
    """Exactly one running copy, on `host`, and the guest answers."""
    assert running_on(lab, name) == [host]
    assert len(qemus(lab, host, name)) == 1
    assert qemus(lab, "h2" if host == "h1" else "h1", name) == []
    assert lab.wait_http(ip, timeout=30) == name


def assert_nothing_left(lab: LabEnv, host: str, name: str) -> None:
    """No record, QEMU, tap or run directory of `name` on `host` (which runs nothing else)."""
    assert all(v["name"] != name for v in views(lab, host))
    assert qemus(lab, host, name) == []
    assert [n for n in lab.links(host) if n.startswith("vif")] == []
    run = Path(lab.state.host(host).home) / "run"
    assert list(run.iterdir()) == [] if run.exists() else True


def migrate(lab: LabEnv, name: str, src: str, dst: str, *opts: str,
            check: bool = True) -> Any:
    return lab.gridvm("migrate", *opts, name, f"{lab.name}/{dst}", host=src, check=check)


def migrate_bg(lab: LabEnv, name: str, src: str, dst: str, *opts: str) -> Future[Any]:
    return _pool.submit(migrate, lab, name, src, dst, *opts, check=False)


def failed(fut: Future[Any], *words: str) -> str:
    proc = fut.result(timeout=180)
    assert proc.returncode == 1, proc.stdout
    message: str = proc.stderr.strip()
    for word in words:
        assert word in message, message
    return message


def source_job(lab: LabEnv, host: str) -> dict[str, Any]:
    c = client(lab, host)
    try:
        jobs: list[dict[str, Any]] = c.get("/migrations")
        return jobs[-1] if jobs else {}
    finally:
        c.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def gate(phase: str) -> Iterator[Callable[[], None]]:
    """Hold migrations at `phase`; yields a function that waits until one got there."""
    root = Path(os.environ[HOLD_ENV])
    (root / f"{phase}.reached").unlink(missing_ok=True)
    (root / phase).touch()
    try:
        yield lambda: wait_for(f"a migration at {phase}",
                               (root / f"{phase}.reached").exists)
    finally:
        (root / phase).unlink(missing_ok=True)


def kill_daemon(lab: LabEnv, host: str) -> None:
    pid = lab.state.host(host).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for("gridvmd to die", lambda: not procs.pid_alive(pid))


def restart_daemon(lab: LabEnv, host: str) -> None:
    lab.gridvm("lab", "restart", "--name", lab.name, host)


class Poller:
    """A client on the LAN: GET / every 10 ms, each request allowed 3 tries of 2 s (as a
    browser retries); counts requests, retries and failed requests."""

    def __init__(self, lab: LabEnv, ip: str) -> None:
        self.lab, self.ip = lab, ip
        self.requests = self.retries = self.failures = 0
        self.worst = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: netns.call_in(lab.ns("client"),
                                                                    self._run), daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            for _ in range(3):
                try:
                    httpprobe.http_get(self.ip, "/", timeout=2.0)
                    break
                except OSError:
                    self.retries += 1
            else:
                self.failures += 1
            self.requests += 1
            self.worst = max(self.worst, time.monotonic() - t0)
            time.sleep(0.01)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


# ----- tests ---------------------------------------------------------------------------------


def test_live_migration_back_and_forth_under_a_polling_client(lab: LabEnv) -> None:
    ip = boot(lab, "h1", "live", 1)
    boot_id = lab.http(ip, "/bootid")
    uuid = views(lab, "h1")[0]["uuid"]
    mac = views(lab, "h1")[0]["vifs"][0]["mac"]
    hosts = ["h1", "h2"] * 3 + ["h1"]
    with Poller(lab, ip) as poller:
        for src, dst in zip(hosts, hosts[1:], strict=False):
            out = migrate(lab, "live", src, dst, "--live").stdout
            assert out.startswith(f"Migrated live to {lab.name}/{dst} (id=")
            assert "downtime" in out and "total" in out and "sent" in out
            assert_one(lab, "live", dst, ip)
            (view,) = views(lab, dst)
            assert (view["uuid"], view["vifs"][0]["mac"]) == (uuid, mac)
            assert state(lab, dst, "live") == "running"
            assert view["vifs"][0]["tap"] == f"vif{view['domid']}.0"
            assert lab.http(ip, "/bootid") == boot_id
            time.sleep(0.5)
    print(f"\n{poller.requests} requests, {poller.retries} retries, {poller.failures} failed, "
          f"slowest {poller.worst * 1000:.0f} ms")
    assert poller.requests > 100
    assert poller.failures == 0
    assert_nothing_left(lab, "h2", "live")
    lab.gridvm("destroy", "live", host="h1")


def test_non_live_migration_pauses_copies_and_resumes(lab: LabEnv) -> None:
    ip = lab.guest_ip(2)      # a managed domain (xm new + start): its definition moves too
    lab.gridvm("new", str(lab.write_cfg("cold", "bridge=xenbr0",
                                        f'ip = "{ip}"\nnetmask = "255.255.255.0"')), host="h1")
    lab.gridvm("start", "cold", host="h1")
    assert lab.wait_http(ip) == "cold"
    boot_id = lab.http(ip, "/bootid")
    migrate(lab, "cold", "h1", "h2")
    assert_one(lab, "cold", "h2", ip)
    assert state(lab, "h2", "cold") == "running"
    assert views(lab, "h1") == [] and views(lab, "h2")[0]["managed"]
    assert lab.http(ip, "/bootid") == boot_id
    # a domain paused by its user stays paused where it arrives
    lab.gridvm("pause", "cold", host="h2")
    migrate(lab, "cold", "h2", "h1", "--live")
    assert state(lab, "h1", "cold") == "paused"
    lab.gridvm("unpause", "cold", host="h1")
    assert lab.wait_http(ip) == "cold" and lab.http(ip, "/bootid") == boot_id
    lab.gridvm("destroy", "cold", host="h1")
    lab.gridvm("delete", "cold", host="h1")
    assert_nothing_left(lab, "h2", "cold")


def test_copy_storage_moves_the_data_disk(lab: LabEnv) -> None:
    storage = Path(lab.state.host("h1").home) / "disks"
    storage.mkdir(exist_ok=True)
    disk = storage / "data.img"
    procs.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "64M"])
    ip = boot(lab, "h1", "disky", 3, f"disk = [ 'file:{disk},xvdb,w' ]")
    assert lab.http(ip, "/fill?mb=16", timeout=60).startswith("filled 16 MB")
    before = lab.http(ip, "/sum?mb=16", timeout=60)
    # shared storage in the lab: both hosts see the same file, so copying it is refused
    shared = lab.shared / "shared.img"
    procs.run(["qemu-img", "create", "-q", "-f", "raw", str(shared), "8M"])
    boot(lab, "h1", "sharer", 4, f"disk = [ 'file:{shared},xvdb,w' ]")
    assert "is the same file on both hosts" in migrate(
        lab, "sharer", "h1", "h2", "--live", "--copy-storage", check=False).stderr
    lab.gridvm("destroy", "sharer", host="h1")

    out = migrate(lab, "disky", "h1", "h2", "--live", "--copy-storage").stdout
    assert "disks 64.0 MiB" in out
    moved = Path(lab.state.host("h2").home) / "disks" / "data.img"
    assert moved.exists() and not disk.exists()
    assert views(lab, "h2")[0]["disks"][0]["target"] == str(moved)
    assert_one(lab, "disky", "h2", ip)
    assert lab.http(ip, "/sum?mb=16", timeout=60) == before
    # and back, non-live
    migrate(lab, "disky", "h2", "h1", "--copy-storage")
    assert disk.exists() and not moved.exists()
    assert lab.http(ip, "/sum?mb=16", timeout=60) == before
    lab.gridvm("destroy", "disky", host="h1")
    disk.unlink()


def test_save_on_one_host_restore_on_the_other(lab: LabEnv) -> None:
    ip = boot(lab, "h1", "saved", 5)
    boot_id = lab.http(ip, "/bootid")
    save = lab.shared / "saved.save"
    lab.gridvm("save", "saved", str(save), host="h1")
    assert running_on(lab, "saved") == []
    out = lab.gridvm("restore", str(save), "--host", f"{lab.name}/h2").stdout
    assert out.startswith("Restored domain saved")
    assert_one(lab, "saved", "h2", ip)
    assert lab.http(ip, "/bootid") == boot_id
    lab.gridvm("destroy", "saved", host="h2")


def test_destination_qemu_killed_before_during_and_at_the_switch(lab: LabEnv) -> None:
    ip = boot(lab, "h1", "victim", 6)
    boot_id = lab.http(ip, "/bootid")

    def kill_dest_qemu() -> None:
        (pid,) = qemus(lab, "h2", "victim")
        os.kill(pid, signal.SIGKILL)

    # before the stream starts
    with gate("prepared") as reached:
        fut = migrate_bg(lab, "victim", "h1", "h2", "--live")
        reached()
        kill_dest_qemu()
    failed(fut, "migration of victim", "keeps running on this host")
    # during the copy (slowed down to 4 MiB/s)
    fut = migrate_bg(lab, "victim", "h1", "h2", "--live", "--bandwidth", "4")
    wait_for("the copy", lambda: source_job(lab, "h1").get("ram", {}).get("transferred", 0)
             > 8 * 2**20 and not source_job(lab, "h1")["finished"])
    kill_dest_qemu()
    failed(fut, "keeps running on this host")
    # at the switch: the guest is paused, its memory sent
    with gate("switchover") as reached:
        fut = migrate_bg(lab, "victim", "h1", "h2", "--live")
        reached()
        assert state(lab, "h1", "victim") == "migrating"
        assert source_job(lab, "h1")["status"] == "pre-switchover"   # QEMU paused the guest
        kill_dest_qemu()
    failed(fut, "keeps running on this host")
    for _ in range(3):
        assert_one(lab, "victim", "h1", ip)
        assert state(lab, "h1", "victim") == "running"
        wait_for("h2 to clean up", lambda: views(lab, "h2") == [])
        assert_nothing_left(lab, "h2", "victim")
    assert lab.http(ip, "/bootid") == boot_id
    lab.gridvm("destroy", "victim", host="h1")


def test_destination_gridvmd_killed_before_during_and_at_the_switch(lab: LabEnv) -> None:
    ip = boot(lab, "h1", "orphan", 7)
    boot_id = lab.http(ip, "/bootid")

    def settle() -> None:
        restart_daemon(lab, "h2")
        assert_one(lab, "orphan", "h1", ip)
        wait_for("h2 to clean up", lambda: qemus(lab, "h2", "orphan") == [])
        assert_nothing_left(lab, "h2", "orphan")

    with gate("prepared") as reached:
        fut = migrate_bg(lab, "orphan", "h1", "h2", "--live")
        reached()
        kill_daemon(lab, "h2")
    failed(fut, "the destination is gone", "keeps running on this host")
    settle()

    fut = migrate_bg(lab, "orphan", "h1", "h2", "--live", "--bandwidth", "4")
    wait_for("the copy", lambda: source_job(lab, "h1").get("ram", {}).get("transferred", 0)
             > 8 * 2**20 and not source_job(lab, "h1")["finished"])
    kill_daemon(lab, "h2")
    failed(fut, "unreachable", "keeps running on this host")
    settle()

    with gate("switchover") as reached:
        fut = migrate_bg(lab, "orphan", "h1", "h2", "--live")
        reached()
        kill_daemon(lab, "h2")
        time.sleep(2.5)          # the source notices while the guest waits at the switch
    failed(fut, "unreachable", "keeps running on this host")
    settle()
    assert lab.http(ip, "/bootid") == boot_id
    lab.gridvm("destroy", "orphan", host="h1")


def test_source_gridvmd_killed_after_the_switch_destination_owns_it(lab: LabEnv) -> None:
    ip = boot(lab, "h1", "owned", 8)
    boot_id = lab.http(ip, "/bootid")
    with gate("switched") as reached:
        fut = migrate_bg(lab, "owned", "h1", "h2", "--live")
        reached()                # h2 runs it; h1's QEMU waits in postmigrate
        assert lab.http(ip, "/bootid") == boot_id
        kill_daemon(lab, "h1")
    assert fut.result(timeout=60).returncode == 1     # its daemon died under the CLI
    restart_daemon(lab, "h1")     # settles the journalled migration: the copy here goes
    wait_for("h1 to retire its copy", lambda: qemus(lab, "h1", "owned") == [])
    assert_one(lab, "owned", "h2", ip)
    assert_nothing_left(lab, "h1", "owned")
    assert lab.http(ip, "/bootid") == boot_id
    lab.gridvm("destroy", "owned", host="h2")


def test_a_copy_that_cannot_converge_is_cancelled_or_auto_converges(lab: LabEnv) -> None:
    disk = lab.shared / "dirty.img"
    procs.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "64M"])
    ip = boot(lab, "h1", "dirty", 11, f"disk = [ 'file:{disk},xvdb,w' ]")
    stop = threading.Event()

    def dirty() -> None:       # ~30 MiB/s of page cache rewritten, over a 16 MiB/s link
        while not stop.is_set():
            with contextlib.suppress(OSError):
                httpprobe.http_get(ip, "/fill?mb=16", timeout=30)

    dirtier = threading.Thread(target=lambda: netns.call_in(lab.ns("client"), dirty),
                               daemon=True)
    dirtier.start()
    try:
        time.sleep(2)
        slow = ("--live", "--bandwidth", "16", "--downtime-ms", "20")
        t0 = time.monotonic()
        error = lab.fails("migrate", *slow, "dirty", f"{lab.name}/h2", host="h1")
        assert "it cannot converge" in error and "--auto-converge" in error
        assert "keeps running on this host" in error and time.monotonic() - t0 < 90
        assert_one(lab, "dirty", "h1", ip)
        wait_for("h2 to clean up", lambda: views(lab, "h2") == [])
        migrate(lab, "dirty", "h1", "h2", *slow, "--auto-converge")
        assert_one(lab, "dirty", "h2", ip)
    finally:
        stop.set()
        dirtier.join(timeout=60)
    lab.gridvm("destroy", "dirty", host="h2")


def test_second_migration_and_destroy_are_refused_during_a_migration(lab: LabEnv) -> None:
    ip = boot(lab, "h1", "busy", 9)
    fut = migrate_bg(lab, "busy", "h1", "h2", "--live", "--bandwidth", "2")
    wait_for("the copy", lambda: source_job(lab, "h1").get("phase") == "memory")
    for args in (("migrate", "--live", "busy", f"{lab.name}/h2"), ("destroy", "busy"),
                 ("save", "busy", str(lab.shared / "busy.save"))):
        assert "domain busy is migrating; try again when it is done" in lab.fails(
            *args, host="h1")
    assert lab.gridvm("migrate", "--cancel", "busy", host="h1").stdout.startswith(
        "migration of busy cancelled; it keeps running on this host")
    failed(fut, "migration of busy cancelled; it keeps running on this host")
    assert_one(lab, "busy", "h1", ip)
    wait_for("h2 to clean up", lambda: views(lab, "h2") == [])
    assert "is not being migrated" in lab.fails("migrate", "--cancel", "busy", host="h1")
    lab.gridvm("destroy", "busy", host="h1")


def test_bad_input_changes_nothing(lab: LabEnv) -> None:
    ip = boot(lab, "h1", "twin", 10)
    assert "is not in lab" in lab.fails("migrate", "twin", f"{lab.name}/h9", host="h1")
    assert "does not exist" in lab.fails("migrate", "nosuch", f"{lab.name}/h2", host="h1")
    assert "say where to" in lab.fails("migrate", "twin", host="h1")
    h2 = lab.addr("h2")
    assert "connection refused" in lab.fails("migrate", "twin", f"{h2}:9", host="h1")
    lab.create("h2", "twin", "bridge=xenbr0")              # the same name on the destination
    assert "domain name 'twin' is already in use" in \
        lab.fails("migrate", "--live", "twin", f"{lab.name}/h2", host="h1")
    lab.gridvm("destroy", "twin", host="h2")
    lab.create("h1", "nobridge", "bridge=xenbr9")          # a bridge only h1 has
    assert "bridge xenbr9 does not exist" in \
        lab.fails("migrate", "nobridge", f"{lab.name}/h2", host="h1")
    lab.gridvm("destroy", "nobridge", host="h1")
    assert_one(lab, "twin", "h1", ip)
    assert_nothing_left(lab, "h2", "twin")
    lab.gridvm("destroy", "twin", host="h1")


def test_the_tcp_api_takes_only_certificates_of_the_cluster(lab: LabEnv,
                                                            tmp_path: Path) -> None:
    """Over TCP the API is served to peers with a certificate of the lab's CA: no
    certificate, or one from another CA, and the TLS handshake refuses the peer before any
    handler runs; the enrolment port serves only the CA and enrolment."""
    import ssl

    import httpx

    from gridvm.cluster.pki import Ca, Identity
    from gridvm.lab import pki

    h2 = lab.addr("h2")
    stranger = Identity(tmp_path / "stranger")
    other = Ca.create("other")
    key, cert = other.issue("intruder", [])
    stranger.save(key, cert, pki.load_ca(Path(lab.state.root)).cert)   # trusts our CA

    def get(url: str, ctx: ssl.SSLContext | bool) -> tuple[int, Any] | str:
        def call() -> tuple[int, Any] | str:
            try:
                with httpx.Client(verify=ctx, timeout=5) as c:
                    r = c.get(url)
                    return r.status_code, r.json()
            except httpx.HTTPError as exc:
                return type(exc).__name__
        result: tuple[int, Any] | str = netns.call_in(lab.ns("client"), call)
        return result

    admin = pki.admin(Path(lab.state.root)).client_context()
    no_cert = ssl.create_default_context(cafile=str(pki.admin(Path(lab.state.root)).ca))
    api = f"https://{h2}:{API_PORT}"
    refused = {"ConnectError", "RemoteProtocolError", "ReadError"}   # TLS 1.3: after Finished
    assert get(f"{api}/v1/domains", no_cert) in refused
    assert get(f"{api}/v1/domains", stranger.client_context()) in refused
    assert get(f"{api}/v1/relocation/nosuch", admin)[0] == 404       # authorised; no job
    ok = get(f"{api}/v1/domains", admin)
    assert isinstance(ok, tuple) and ok[0] == 200
    enrol = f"https://{h2}:{API_PORT + 1}"
    ca = get(f"{enrol}/v1/pki/ca", False)
    assert isinstance(ca, tuple) and ca[0] == 200 and "BEGIN CERTIFICATE" in ca[1]["ca"]
    assert get(f"{enrol}/v1/domains", False)[0] == 404                 # nothing else there
    assert views(lab, "h2") == []


