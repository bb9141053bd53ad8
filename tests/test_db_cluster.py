"""The replicated database in a three-host lab cluster (etcd in its own namespace), real
MariaDB members in real Debian guests, one per host, driven like an administrator would.

One module-scoped lab and one database carry the scenarios in order: bad input leaves
nothing; create (GTID + semi-sync, writer and reader VIPs); a switchover under load; the
primary's host powered off mid-stream (every acknowledged number present exactly once, the
old primary back as a replica); the primary's MariaDB killed on a live host with a commit
in flight that no replica received (its domain is killed, and on return it is re-cloned:
errant transaction); a replica's host lost (writes go on while a replica acknowledges;
they wait, and status says so, when none does).
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from dblab import APP_PASSWORD, APP_USER, Writer, count_rows, mariadb_image, member, verify
from dblab import connect as db_connect
from dblab import status as db_status
from netlab import LabEnv, lab_env, wait_for

from gridvm.host import netns
from gridvm.images.store import ImageInfo

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

TTL = 2
DB = "sales"


@pytest.fixture(scope="module")
def lab(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    mariadb_image(tiny_image.kernel.parent.parent)
    with lab_env(tiny_image, tmp_path_factory.mktemp("dblab"), 3, "--cluster", "--ttl",
                 str(TTL), "--margin", "0.5") as env:
        yield env


@pytest.fixture(scope="module")
def db(lab: LabEnv) -> dict[str, str]:
    """The database: three members, writer and reader VIPs, an application account."""
    ip, vip, rvip = lab.guest_ip(50), lab.guest_ip(90), lab.guest_ip(91)
    t0 = time.monotonic()
    lab.gridvm("db", "create", DB, "--members", "3", "--ip", f"{ip}/24", "--vip",
               f"{vip}:3306", "--read-vip", f"{rvip}:3306", "--memory", "448", host="h1",
               timeout=900)
    print(f"db create took {time.monotonic() - t0:.0f}s")
    lab.gridvm("db", "user", DB, APP_USER, "--password", APP_PASSWORD, "--database", "app",
               host="h2")
    run_sql(lab, vip, "CREATE TABLE seq (id INT AUTO_INCREMENT PRIMARY KEY, n INT NOT NULL, "
            "at TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6))")
    return {"vip": vip, "rvip": rvip}


def run_sql(lab: LabEnv, host: str, statement: str, *, port: int = 3306) -> list[Any]:
    def go() -> list[Any]:
        conn = db_connect(host, port=port, timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                rows = list(cur.fetchall())
            conn.commit()
            return rows
        finally:
            conn.close()
    result: list[Any] = netns.call_in(lab.ns("client"), go)
    return result


def st(lab: LabEnv, host: str = "h2") -> dict[str, Any]:
    return db_status(lambda *a: lab.gridvm(*a, host=host), DB)


def primary(lab: LabEnv) -> str:
    return str(st(lab)["primary"])


def host_of(view: dict[str, Any], name: str) -> str:
    return str(member(view, name)["host"])


def converged(lab: LabEnv, view_host: str = "h2") -> dict[str, Any] | None:
    """The status once every member is a replica or the primary, answering, at the
    primary's GTID position (None until then)."""
    v = st(lab, view_host)
    p = member(v, v["primary"])
    ok = all(m["answers"] and m["role"] in ("primary", "replica") and m["gtid"] == p["gtid"]
             for m in v["members"])
    return v if ok else None


_firsts = iter(range(100_000, 10**9, 100_000))


def writer(lab: LabEnv, vip: str) -> Writer:
    """A client writing numbers no earlier client of the module wrote."""
    return Writer(lab.ns("client"), vip, first=next(_firsts))


def events(v: dict[str, Any], since: float) -> str:
    return "\n".join(f"  {e['at'] - since:+7.2f}s {e['member']}: "
                     + (f"{e['from']} → {e['to']}: " if e.get("to") else "") + e["why"]
                     for e in v.get("events", []) if e["at"] >= since - 5)


def wait_converged(lab: LabEnv, what: str, timeout: float) -> dict[str, Any]:
    """`converged`, or the database's status and the hosts' database log lines."""
    try:
        v: dict[str, Any] = wait_for(what, lambda: converged(lab), timeout)
        return v
    except AssertionError:
        for h in ("h1", "h2", "h3"):
            with contextlib.suppress(Exception):
                print(lab.gridvm("db", "status", DB, host=h).stdout)
                break
        for h in ("h1", "h2", "h3"):
            log = Path(lab.state.host(h).home) / "logs" / "gridvmd.log"
            with contextlib.suppress(OSError):
                lines = [x for x in log.read_text().splitlines()
                         if "gridvm.db" in x or "sales" in x][-25:]
                print(f"--- {h}\n" + "\n".join(lines))
        raise


def wait_writes(w: Writer, n: int, timeout: float = 60) -> None:
    start = len(w.acked)
    wait_for(f"{n} more acknowledged writes", lambda: len(w.acked) >= start + n, timeout)


def test_bad_input_leaves_nothing(lab: LabEnv) -> None:
    ip, vip = lab.guest_ip(60), lab.guest_ip(95)
    err = lab.fails("db", "create", "bad", "--recipe", "nosuch", "--ip", f"{ip}/24",
                    "--vip", vip, host="h1")
    assert "unknown recipe image 'nosuch'" in err
    err = lab.fails("db", "create", "bad", "--hosts", "h1,h1", "--ip", f"{ip}/24",
                    "--vip", vip, host="h1")
    assert "two members on host h1" in err
    err = lab.fails("db", "create", "bad", "--members", "4", "--ip", f"{ip}/24",
                    "--vip", vip, host="h1")
    assert "4 members need 4 hosts" in err
    err = lab.fails("db", "create", "bad", "--ip", f"{ip}/24", "--vip", f"{ip + '1'}",
                    host="h1")
    assert "bad VIP address" in err or "a member's address" in err
    assert lab.gridvm("db", "list", "--json", host="h2").stdout.strip() == "[]"
    assert "bad1" not in lab.gridvm("list", host="h2").stdout


def test_create_replicates_with_semisync(lab: LabEnv, db: dict[str, str]) -> None:
    v = wait_converged(lab, "every member converged", 60)
    roles = sorted(m["role"] for m in v["members"])
    assert roles == ["primary", "replica", "replica"]
    assert sorted(m["host"] for m in v["members"]) == ["h1", "h2", "h3"]
    p = member(v, v["primary"])
    assert p["read_only"] is False and p["semisync"]["on"] and p["semisync"]["replicas"] == 2
    assert "acknowledged by a replica" in v["writes"]
    for m in v["members"]:
        if m["role"] == "replica":
            assert m["read_only"] is True and m["replicates_from"] == p["ip"]
    # the writer VIP reaches the primary; the reader VIP a replica, which refuses writes
    assert run_sql(lab, db["vip"], "SELECT @@read_only")[0][0] == 0
    wait_for("the reader VIP serving", lambda: run_sql(lab, db["rvip"], "SELECT @@read_only"),
             30)
    assert run_sql(lab, db["rvip"], "SELECT @@read_only")[0][0] == 1
    with pytest.raises(pymysql.MySQLError, match="read-only|READ-ONLY|read_only"):
        run_sql(lab, db["rvip"], "INSERT INTO seq (n) VALUES (-1)")
    # the same VIP cannot be used twice
    err = lab.fails("db", "create", "other", "--ip", f"{lab.guest_ip(70)}/24", "--vip",
                    db["vip"], host="h3")
    assert "in use" in err
    assert len(lab.gridvm("db", "list", "--json", host="h3").stdout.split('"name"')) == 2


def test_switchover_under_load(lab: LabEnv, db: dict[str, str]) -> None:
    old = primary(lab)
    w = writer(lab, db["vip"])
    w.start()
    try:
        wait_writes(w, 20)
        t0 = time.monotonic()
        out = lab.gridvm("db", "switchover", DB, "--json", host="h3").stdout
        wait_writes(w, 20)
    finally:
        w.halt()
    new = primary(lab)
    gap, _ = w.longest_gap(t0 - 1)
    print(f"switchover {old} → {new}: {out.strip()}; longest client gap {gap:.2f}s")
    assert new != old
    v = wait_converged(lab, "converged after the switchover", 60)
    assert member(v, old)["role"] == "replica"
    res = verify(w.acked, count_rows(lab.ns("client"), db["vip"]))
    assert res["lost"] == [] and res["duplicated"] == [], res


def test_maintenance_of_the_primarys_host_switches_over(lab: LabEnv,
                                                        db: dict[str, str]) -> None:
    v = st(lab)
    old = v["primary"]
    host = host_of(v, old)
    lab.gridvm("host", "maintenance", host, "on", host="h1")
    try:
        wait_for("the primary role off the host in maintenance",
                 lambda: primary(lab) != old, 60)
        new = primary(lab)
        assert host_of(st(lab), new) != host
        assert member(st(lab), old)["role"] == "replica"
    finally:
        lab.gridvm("host", "maintenance", host, "off", host="h1")
    wait_converged(lab, "converged", 60)


def test_primary_host_powered_off_mid_stream(lab: LabEnv, db: dict[str, str]) -> None:
    v = st(lab)
    old = v["primary"]
    victim = host_of(v, old)
    w = writer(lab, db["vip"])
    w.start()
    try:
        wait_writes(w, 30)
        wall_off = time.time()
        lab.gridvm("lab", "poweroff", victim, "--name", lab.name)
        t_off = time.monotonic()
        survivor = next(h for h in ("h1", "h2", "h3") if h != victim)
        wait_for("a new primary", lambda: st(lab, survivor)["primary"] != old, 60)
        wait_writes(w, 30)
    finally:
        w.halt()
    gap, at = w.longest_gap(t_off - 1)
    new = st(lab, survivor)["primary"]
    print(f"{victim} powered off: {old} → {new}; write gap {gap:.2f}s (from "
          f"{at - t_off:+.2f}s); {len(w.acked)} acknowledged, {len(w.failed)} failed\n"
          + events(st(lab, survivor), wall_off))
    res = verify(w.acked, count_rows(lab.ns("client"), db["vip"]))
    assert res["lost"] == [] and res["duplicated"] == [], res
    assert gap < 30
    lab.gridvm("lab", "poweron", victim, "--name", lab.name)
    v = wait_converged(lab, "the old primary back as a replica, converged", 420)
    m = member(v, old)
    assert m["role"] == "replica" and m["rejoined"]["how"] in ("rejoin", "reclone")
    print(f"{old} rejoined: {m['rejoined']['how']}: {m['rejoined']['why']}")


def test_primary_mariadb_killed_with_an_unreplicated_commit(lab: LabEnv,
                                                            db: dict[str, str]) -> None:
    """No replica receives while one commit waits on the primary (in its binary log, not
    acknowledged); then the primary's MariaDB dies with its host alive. gridvm kills the
    domain before promoting; the commit was never acknowledged and may be lost. The old
    primary comes back with it — an errant transaction — and is re-cloned."""
    v = st(lab)
    old = v["primary"]
    replicas = [m["name"] for m in v["members"] if m["role"] == "replica"]
    for r in replicas:
        lab.gridvm("guest-exec", r, "--", "mariadb", "-e", "STOP SLAVE IO_THREAD",
                   host=host_of(v, r))
    result: dict[str, Any] = {}

    def stuck() -> None:
        try:
            run_sql(lab, db["vip"], "INSERT INTO seq (n) VALUES (-7)")
            result["ok"] = True
        except (pymysql.MySQLError, OSError) as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=stuck, daemon=True)
    t.start()
    time.sleep(3)
    assert not result, f"the commit did not wait for an acknowledgement: {result}"
    assert "WRITES WAIT" in st(lab)["writes"] or "waiting" in st(lab)["writes"]
    lab.gridvm("guest-exec", old, "--", "systemctl", "kill", "-s", "KILL", "mariadb",
               host=host_of(v, old))
    wait_for("a new primary", lambda: primary(lab) != old, 60)
    t.join(timeout=30)
    assert "ok" not in result, "an unacknowledged commit was reported committed"
    v = wait_converged(lab, "the old primary re-cloned and converged", 420)
    m = member(v, old)
    print(f"{old}: {m['rejoined']}")
    assert m["rejoined"]["how"] == "reclone" and "errant" in m["rejoined"]["why"]
    assert -7 not in count_rows(lab.ns("client"), db["vip"])


def test_replica_lost_writes_go_on_then_wait(lab: LabEnv, db: dict[str, str]) -> None:
    v = st(lab)
    p = v["primary"]
    r1, r2 = sorted(m["name"] for m in v["members"] if m["name"] != p)
    victim = host_of(v, r1)
    w = writer(lab, db["vip"])
    w.start()
    try:
        wait_writes(w, 10)
        lab.gridvm("lab", "poweroff", victim, "--name", lab.name)
        wait_writes(w, 30)                      # r2 still acknowledges
        other = host_of(v, p)
        lab.gridvm("guest-exec", r2, "--", "mariadb", "-e", "STOP SLAVE", host=host_of(v, r2))
        time.sleep(3)
        before = len(w.acked)
        time.sleep(3)
        assert len(w.acked) == before, "commits went on without any replica"
        words = st(lab, other)["writes"]
        assert "WRITES WAIT" in words, words
        lab.gridvm("guest-exec", r2, "--", "mariadb", "-e", "START SLAVE", host=host_of(v, r2))
        wait_writes(w, 10)
    finally:
        w.halt()
        lab.gridvm("lab", "poweron", victim, "--name", lab.name)
    res = verify(w.acked, count_rows(lab.ns("client"), db["vip"]))
    assert res["lost"] == [] and res["duplicated"] == [], res
    wait_converged(lab, "the lost replica back", 420)


def test_delete_removes_everything(lab: LabEnv, db: dict[str, str]) -> None:
    lab.gridvm("db", "delete", DB, host="h3")
    assert lab.gridvm("db", "list", "--json", host="h1").stdout.strip() == "[]"
    assert "sales" not in lab.gridvm("list", host="h1").stdout
    assert "sales" not in lab.gridvm("service", "list", host="h2").stdout
    for h in ("h1", "h2", "h3"):
        assert subprocess.run(["ls", f"{lab.state.host(h).home}/disks"], text=True,
                              capture_output=True).stdout.strip() == ""
