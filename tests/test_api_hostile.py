"""gridvmd under hostile input and abrupt deaths (issue: local root through the socket,
option injection, event-loop freezes, leaks after a crash). Each test drives a real
gridvmd in its own network namespace."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostlab import HostEnv

from gridvm.host import links, netns, procs
from gridvm.host.resources import cgroup_parent
from gridvm.lab.agent import Agent
from gridvm.lifecycle import DomainState
from gridvm.store.sqlite import SqliteStore

pytestmark = pytest.mark.guest


def raw(host: HostEnv, method: str, path: str, body: Any = None, *,
        content: bytes | None = None, timeout: float = 30) -> httpx.Response:
    """A request straight to the socket, as any client could send it."""
    transport = httpx.HTTPTransport(uds=str(host.agent.home.api_socket))
    with httpx.Client(transport=transport, base_url="http://x", timeout=timeout) as c:
        return c.request(method, path, json=body if content is None else None,
                         content=content, headers={"content-type": "application/json"})


def pv(host: HostEnv, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kernel": str(host.image.kernel), "ramdisk": str(host.image.ramdisk),
            "memory": 96, **extra}


def state(host: HostEnv) -> tuple[list[str], list[str], list[str]]:
    """What a refused request must not change: domains, networks, taps."""
    doms = sorted(v["name"] for v in host.domains())
    nets = sorted(n["name"] for n in raw(host, "GET", "/v1/networks").json())
    return doms, nets, sorted(host.taps())


def test_socket_and_home_are_for_root_and_the_gridvm_group(host: HostEnv) -> None:
    sock = host.agent.home.api_socket
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0
    assert st.st_gid == grp.getgrnam("gridvm").gr_gid
    assert stat.S_IMODE(os.stat(host.home).st_mode) == 0o750


def test_an_unprivileged_user_is_refused_at_the_socket(host: HostEnv) -> None:
    """uid 65534 cannot even connect (it used to create a guest reading /etc/shadow); with
    the gridvm group it gets an answer (so the refusal is the socket's and home's doing)."""
    base = Path(tempfile.mkdtemp(prefix="gvperm"))
    os.chmod(base, 0o755)        # others may reach the home: only its own modes decide
    agent = Agent(base / "home", ns=host.ns, accel="tcg", images=host.agent.images)
    agent.start()
    try:
        script = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
                  "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('refused')\n"
                  "else:\n s.sendall(b'GET /v1/info HTTP/1.0\\r\\n\\r\\n')\n"
                  " print(s.recv(12).decode())\n")
        member = str(grp.getgrnam("gridvm").gr_gid)
        answers = {}
        for groups in ("--clear-groups", f"--groups={member}"):
            out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", groups,
                                  sys.executable, "-c", script, str(agent.home.api_socket)],
                                 capture_output=True, text=True, timeout=30)
            answers[groups] = out.stdout.strip()
        assert answers["--clear-groups"] == "refused"
        assert answers[f"--groups={member}"].startswith("HTTP/1.")   # a member gets in
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("config", [
    {"vifs": [{"model": "e1000,romfile=/etc/shadow", "bridge": "xenbr0"}]},
    {"disks": [{"target": "/etc/hostname", "vdev": "xvda,serial=INJECTED", "mode": "r"}]},
    {"vifs": [{"bridge": "br\u0000evil"}]},
    {"vifs": [{"vifname": "v\u0000x", "bridge": "xenbr0"}]},
    {"net": {"ip": "1.2.3.4 init=/bin/sh"}},
    {"name": "web\n"},
    {"vifs": [{"bridge": "xenbr0"}] * 9},
])
def test_injection_through_the_api_is_refused_and_changes_nothing(
        host: HostEnv, config: dict[str, Any]) -> None:
    before = state(host)
    cfg = pv(host, "inj", **{k: v for k, v in config.items() if k != "name"})
    cfg["name"] = config.get("name", "inj")
    r = raw(host, "POST", "/v1/domains", {"config": cfg})
    assert r.status_code == 422, r.text
    r = raw(host, "POST", "/v1/relocation/prepare", {"id": "m", "source": "x:/h",
                                                      "config": cfg})
    assert r.status_code in (403, 422), r.text
    assert state(host) == before
    assert host.qemu_pids() == []


def test_a_delete_cannot_climb_to_another_resource(host: HostEnv) -> None:
    host.gridvm("network", "create", "rpn1", "--mode", "bridge")
    try:
        proc = host.gridvm("delete", "../networks/rpn1", check=False)
        assert proc.returncode != 0 and "invalid name" in proc.stderr
        assert "rpn1" in state(host)[1]
        # Even a raw request with a quoted slash does not reach the network.
        r = raw(host, "DELETE", "/v1/domains/..%2Fnetworks%2Frpn1")
        assert r.status_code in (404, 422)
        assert "rpn1" in state(host)[1]
    finally:
        host.gridvm("network", "delete", "rpn1")


def test_restore_from_a_fifo_does_not_freeze_the_daemon(host: HostEnv, tmp_path: Path) -> None:
    fifo = tmp_path / "dom.save"
    os.mkfifo(fifo)
    answers: list[httpx.Response] = []
    t = threading.Thread(target=lambda: answers.append(
        raw(host, "POST", "/v1/restore", {"file": str(fifo)})), daemon=True)
    t.start()
    started = time.monotonic()
    assert raw(host, "GET", "/v1/info", timeout=5).status_code == 200
    t.join(10)
    assert answers and answers[0].status_code == 400 and "FIFO" in answers[0].text
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("body, status", [
    ({"file": ""}, 422),
    ({"file": "relative.save"}, 422),
    ({"file": "/tmp/a\u0000b"}, 422),
    ({"file": "/"}, 400),
])
def test_restore_bad_paths_are_client_errors(host: HostEnv, body: dict[str, Any],
                                             status: int) -> None:
    r = raw(host, "POST", "/v1/restore", body)
    assert r.status_code == status, r.text
    assert set(r.json()) >= {"error"} or "detail" in r.json()


def test_restore_of_a_deep_json_header_is_a_client_error(host: HostEnv, tmp_path: Path) -> None:
    from gridvm.host.savefile import _LEN, MAGIC

    deep = tmp_path / "deep.save"
    body = b'{"config":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep.write_bytes(MAGIC + _LEN.pack(len(body)) + body)
    r = raw(host, "POST", "/v1/restore", {"file": str(deep)})
    assert r.status_code == 400 and "damaged header" in r.json()["error"]


def test_cluster_join_with_a_control_character_is_a_client_error(host: HostEnv) -> None:
    r = raw(host, "POST", "/v1/cluster/join", {"etcd": "\u000e", "host": "h1"})
    assert r.status_code == 422
    assert raw(host, "GET", "/v1/cluster").json() == {"joined": False}


def test_request_bodies_are_limited(host: HostEnv) -> None:
    before = state(host)
    huge = pv(host, "big", extra="x" * 2000)
    payload = json.dumps({"config": huge, "managed": True, "start": False,
                          "pad": "y" * (2 << 20)}).encode()
    assert raw(host, "POST", "/v1/domains", content=payload).status_code == 413

    def chunks() -> Any:          # no content-length: the body streams in
        for _ in range(40):
            yield b" " * 65536

    transport = httpx.HTTPTransport(uds=str(host.agent.home.api_socket))
    with httpx.Client(transport=transport, base_url="http://x", timeout=30) as c:
        r = c.post("/v1/domains", content=chunks(), headers={"content-type":
                                                             "application/json"})
    assert r.status_code == 413
    assert state(host) == before


def test_sigterm_removes_the_socket(host: HostEnv) -> None:
    host.agent.stop()
    try:
        assert not host.agent.home.api_socket.exists()
    finally:
        host.agent.start()


def test_cli_gets_one_line_when_the_daemon_dies_mid_request(host: HostEnv) -> None:
    cfg, _ = host.write_cfg("hang1")
    host.gridvm("create", "-p", str(cfg))      # paused: it never answers the power button
    try:
        env = dict(os.environ, GRIDVM_HOME=str(host.home))
        cli = subprocess.Popen([sys.executable, "-m", "gridvm", "shutdown", "-w", "hang1",
                                "--timeout", "60"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        host.agent.stop(kill=True)
        _, err = cli.communicate(timeout=30)
        assert cli.returncode != 0
        assert "Traceback" not in err and err.strip().startswith("gridvm: error:"), err
        assert len(err.strip().splitlines()) == 1
    finally:
        host.agent.start()
        host.gridvm("destroy", "hang1", check=False)


def test_readoption_rebuilds_taps_and_cgroup_after_a_kill_just_after_qemu_started(
        host: HostEnv) -> None:
    """The state a gridvmd killed right after QEMU's start left: record without taps,
    state 'starting', QEMU outside its cgroup. The next gridvmd takes it all back."""
    cfg, ip = host.write_cfg("late1", extra="cap = 20")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    pid = host.qemu_pids()[0]
    host.agent.stop(kill=True)
    store = SqliteStore(host.home / "gridvm.db")
    rec = store.by_name("late1")
    assert rec is not None and rec.taps
    tap = rec.taps[0]
    rec.taps, rec.state = [], DomainState.STARTING
    store.put(rec)
    store.close()
    for ctl in ("cpu", "cpuacct"):           # back to the root group, as before apply()
        root = Path("/sys/fs/cgroup") / ctl / "cgroup.procs"
        if root.exists():
            root.write_text(str(pid))
    host.agent.start()
    try:
        v = next(d for d in host.domains() if d["name"] == "late1")
        assert v["state"] == "running" and v["vifs"][0]["tap"] == tap
        groups = Path(f"/proc/{pid}/cgroup").read_text()
        assert cgroup_parent(host.agent.home) in groups
        sched = host.gridvm("sched-credit", "-d", "late1", "--json").stdout
        assert json.loads(sched)[0]["cap"] == 20
        host.gridvm("destroy", "late1")
        assert tap not in host.taps()
    finally:
        host.gridvm("destroy", "late1", check=False)
    host.assert_clean()


def test_a_kill_while_taps_were_made_leaks_none(host: HostEnv) -> None:
    """What a gridvmd killed half-way through making taps left: a 'starting' record with its
    planned taps and no QEMU, and (from older versions) tagged taps no record names.
    Untagged interfaces with gridvm-like names belong to someone else and stay."""
    from gridvm.config.model import DomainConfig
    from gridvm.store.records import DomainRecord

    host.agent.stop(kill=True)
    tag = host.agent.home.tag
    store = SqliteStore(host.home / "gridvm.db")
    domid = store.next_domid()
    planned = [f"vif{domid}.{i}" for i in range(4)]
    cfg = DomainConfig.model_validate(pv(host, "half1", vifs=[{"bridge": "xenbr0"}] * 4))
    store.put(DomainRecord(config=cfg, domid=domid, taps=planned, state=DomainState.STARTING))
    store.close()

    def make() -> None:
        for tap in planned[:2] + ["vif999.0"]:
            links.create_tap(tap, "xenbr0", tag=tag)
        links.create_tap("vif998.0", "xenbr0")          # not ours: no tag

    netns.call_in(host.ns, make)
    host.agent.start()
    try:
        assert "half1" not in [d["name"] for d in host.domains()]
        assert host.taps() == ["vif998.0"]
    finally:
        netns.call_in(host.ns, lambda: links.delete_link("vif998.0"))
    host.assert_clean()


def test_commas_in_disk_names_reach_qemu_as_one_file(host: HostEnv, tmp_path: Path) -> None:
    odd = tmp_path / "tools,v2.img"
    procs.run(["truncate", "-s", "1M", str(odd)])
    snap = tmp_path / "c.img,snapshot=on"
    procs.run(["truncate", "-s", "1M", str(snap)])
    cfg, ip = host.write_cfg("comma1", extra=f"disk = [ 'vdev=xvdb, access=r, target={odd}', "
                                              f"'vdev=xvdc, target={snap}' ]")
    host.gridvm("create", str(cfg))
    try:
        host.wait_http(ip)
        pid = host.qemu_pids()[0]
        opened = {os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()
                  if Path(os.readlink(f)).is_absolute()}
        assert str(odd) in opened and str(snap) in opened
    finally:
        host.gridvm("destroy", "comma1", check=False)


@pytest.mark.parametrize("ref", ["\u00b9", "\u0663", "x" * 300, " ", "%00"])
def test_odd_domain_references_are_not_found(host: HostEnv, ref: str) -> None:
    r = raw(host, "GET", f"/v1/domains/{ref}")
    assert r.status_code == 404 and "does not exist" in r.json()["error"]
    r = raw(host, "POST", f"/v1/domains/{ref}/sched-credit", {"cap": 10})
    assert r.status_code == 404
