"""Monitoring: the daemon's sampler, /v1/stats, /metrics and `gridvm top`, on a real guest."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hostlab import HostEnv

from gridvm.api.routes_stats import render_prometheus
from gridvm.errors import NotFound
from gridvm.host import netns, procs
from gridvm.host.stats import Counters, derive

MIB = 1024 * 1024


# ----- pure logic ------------------------------------------------------------------------------

INFO = {"uuid": "u", "name": "d", "domid": 3, "state": "running", "memory": 128, "maxmem": 256,
        "vcpus": 2, "nets": 1, "vbds": 1}


def test_rates_over_the_last_interval_and_counter_resets() -> None:
    a = Counters(mono=10.0, cpu_seconds=5.0, net_rx=1000, net_tx=0, block_write=4096)
    b = Counters(mono=12.0, cpu_seconds=6.5, net_rx=3000, net_tx=0, block_write=4096 + 8 * MIB)
    s = derive(INFO, b, a, wall=100.0)
    assert s.cpu_percent == 75.0 and s.cpu_seconds == 6.5
    assert s.net_rx_rate == 1000.0 and s.block_write_rate == 4 * MIB
    first = derive(INFO, a, None, wall=100.0)
    assert first.cpu_percent == 0.0 and first.net_rx == 1000
    backwards = derive(INFO, a, b, wall=100.0)  # counters never produce negative rates
    assert backwards.cpu_percent == 0.0 and backwards.net_rx_rate == 0.0


def test_prometheus_labels_are_escaped() -> None:
    s = derive({**INFO, "name": 'we"ird\\'}, Counters(mono=1.0, cpu_seconds=2.5), None, 0.0)
    totals = {"running": 1, "nr_cpus": 2, "total_memory": 1024, "free_memory": 512}
    text = render_prometheus([s], totals)
    assert 'gridvm_domain_cpu_seconds_total{name="we\\"ird\\\\",domid="3",uuid="u"} 2.5' in text
    assert parse_prometheus(text)["gridvm_host_memory_bytes"][0][1] == 1024 * MIB


# ----- a Prometheus text-format reader (strict enough to catch format mistakes) ----------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
Families = dict[str, list[tuple[dict[str, str], float]]]


def parse_prometheus(text: str) -> Families:
    assert text.endswith("\n")
    families: Families = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert re.match(rf"^# HELP {NAME} \S", line), line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge"), line
            assert name not in types, f"TYPE given twice for {name}"
            types[name] = kind
            families[name] = []
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, raw_labels, value = m.groups()
            assert name in types, f"{name} has no TYPE line before it"
            if types[name] == "counter":
                assert name.endswith("_total"), name
            labels: dict[str, str] = {}
            if raw_labels:
                pos = 0
                while pos < len(raw_labels):
                    lm = LABEL.match(raw_labels, pos)
                    assert lm, f"bad labels in {line!r}"
                    labels[lm.group(1)] = lm.group(2)
                    pos = lm.end()
            families[name].append((labels, float(value)))
    return families


# ----- one real guest for the rest -------------------------------------------------------------

def stats(host: HostEnv) -> dict[str, Any]:
    c = host.agent.client()
    try:
        doc: dict[str, Any] = c.get("/stats")
        return doc
    finally:
        c.close()


def sample(host: HostEnv, name: str) -> dict[str, Any] | None:
    return next((d for d in stats(host)["domains"] if d["name"] == name), None)


def wait_sample(host: HostEnv, name: str, ok: Callable[[dict[str, Any]], bool],
                timeout: float = 20, what: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = sample(host, name)
        if last is not None and ok(last):
            return last
        time.sleep(0.3)
    raise AssertionError(f"{name}: {what or 'condition'} not met within {timeout:.0f}s: {last}")


def next_sample(host: HostEnv, name: str, after: float) -> dict[str, Any]:
    """The first sample taken after time `after` (the sampler's own clock)."""
    return wait_sample(host, name, lambda s: s["time"] > after, what="a fresh sample")


@pytest.fixture(scope="module")
def guest(host: HostEnv) -> Iterator[tuple[str, str]]:
    disk = host.tmp / "st1-data.img"
    procs.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "32M"])
    cfg, ip = host.write_cfg("st1", extra=f"disk = ['file:{disk},xvda,w']")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    yield "st1", ip
    host.gridvm("destroy", "st1", check=False)


@pytest.mark.guest
def test_cpu_percent_idle_and_busy(host: HostEnv, guest: tuple[str, str]) -> None:
    name, ip = guest
    s = wait_sample(host, name, lambda s: s["cpu_seconds"] > 0, what="CPU time")
    assert s["state"] == "running" and s["vcpus"] == 1 and s["maxmem"] == 128
    assert 64 <= s["memory"] <= 128 and s["nets"] == 1 and s["vbds"] == 1
    time.sleep(2)  # let the boot's tail settle
    t = s["time"]
    idle = []
    for _ in range(4):
        s = next_sample(host, name, t)
        idle.append(s["cpu_percent"])
        t = s["time"]
    assert statistics.median(idle) < 20, f"an idle guest used {idle} % CPU"

    before = s["cpu_seconds"]
    host.http(ip, "/burn?seconds=6")
    busy = wait_sample(host, name, lambda s: s["cpu_percent"] > 50, timeout=6,
                       what="CPU% above 50 under /burn")
    assert busy["cpu_percent"] < 100 * 2 + 10   # at most the host's CPUs
    assert busy["cpu_seconds"] > before
    assert any(h["cpu_percent"] > 50 for h in history(host, name, limit=10))  # kept for graphs


@pytest.mark.guest
def test_block_write_counters(host: HostEnv, guest: tuple[str, str]) -> None:
    name, ip = guest
    s0 = next_sample(host, name, time.time())
    assert "wrote 8 MB" in host.http(ip, "/write?mb=8", timeout=60)
    s1 = wait_sample(host, name, lambda s: s["block_write"] >= s0["block_write"] + 8 * MIB,
                     what="8 MiB more written")
    assert s1["block_write_ops"] > s0["block_write_ops"]
    hist = history(host, name)
    assert any(h["block_write_rate"] > 0 for h in hist)


def _udp_blast(ip: str, count: int, size: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        payload = b"x" * size
        for i in range(count):
            sock.sendto(payload, (ip, 9))    # discard port: nothing listens in the guest
            if i % 50 == 49:
                time.sleep(0.01)             # let QEMU keep up (TCG): count what arrives


@pytest.mark.guest
def test_net_counters_are_the_guests_view(host: HostEnv, guest: tuple[str, str]) -> None:
    name, ip = guest
    s0 = next_sample(host, name, time.time())
    for _ in range(5):
        host.http(ip, "/health")
    s1 = wait_sample(host, name, lambda s: s["net_rx"] > s0["net_rx"]
                     and s["net_tx"] > s0["net_tx"], what="traffic both ways")
    # Only into the guest: rx must grow by far more than tx (a few ICMP errors at most).
    netns.call_in(host.ns, lambda: _udp_blast(ip, 1000, 1400))
    s2 = wait_sample(host, name, lambda s: s["net_rx"] - s1["net_rx"] > 500_000,
                     what="received UDP counted as rx")
    assert s2["net_tx"] - s1["net_tx"] < (s2["net_rx"] - s1["net_rx"]) / 10


def history(host: HostEnv, name: str, **params: Any) -> list[dict[str, Any]]:
    c = host.agent.client()
    try:
        samples: list[dict[str, Any]] = c.get(f"/stats/{name}/history", params=params)["samples"]
        return samples
    finally:
        c.close()


@pytest.mark.guest
def test_history_is_kept_per_domain(host: HostEnv, guest: tuple[str, str]) -> None:
    name, _ = guest
    deadline = time.monotonic() + 20
    while len(hist := history(host, name)) < 5 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(hist) >= 5
    times = [h["time"] for h in hist]
    assert times == sorted(times) and 0.5 < (times[-1] - times[0]) / (len(times) - 1) < 2.5
    cpu = [h["cpu_seconds"] for h in hist]
    assert cpu == sorted(cpu) and {h["name"] for h in hist} == {name}
    assert len(history(host, name, limit=3)) == 3
    domid = str(sample(host, name)["domid"])  # type: ignore[index]
    assert history(host, domid, limit=1)[0]["name"] == name


@pytest.mark.guest
def test_metrics_in_prometheus_text_format(host: HostEnv, guest: tuple[str, str]) -> None:
    name, _ = guest
    s = wait_sample(host, name, lambda s: s["cpu_seconds"] > 0, what="CPU time")
    transport = httpx.HTTPTransport(uds=str(host.agent.home.api_socket))
    with httpx.Client(transport=transport, base_url="http://gridvmd") as http:
        resp = http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    fam = parse_prometheus(resp.text)

    def value(metric: str) -> float:
        rows = [v for labels, v in fam[metric] if labels.get("name") == name]
        assert len(rows) == 1, f"{metric}: {fam[metric]}"
        labels = next(lb for lb, _ in fam[metric] if lb.get("name") == name)
        assert labels == {"name": name, "domid": str(s["domid"]), "uuid": s["uuid"]}
        return rows[0]

    assert value("gridvm_domain_cpu_seconds_total") >= s["cpu_seconds"] > 0
    assert value("gridvm_domain_memory_bytes") == pytest.approx(s["memory"] * MIB, rel=0.5)
    assert value("gridvm_domain_memory_max_bytes") == 128 * MIB
    assert value("gridvm_domain_vcpus") == 1
    # Counters only grow: /metrics (served later) shows at least the earlier sample's values.
    for metric, key in (("net_rx_bytes_total", "net_rx"), ("net_tx_bytes_total", "net_tx"),
                        ("block_read_bytes_total", "block_read"),
                        ("block_write_bytes_total", "block_write"),
                        ("block_read_ops_total", "block_read_ops"),
                        ("block_write_ops_total", "block_write_ops")):
        assert value(f"gridvm_domain_{metric}") >= s[key]
    assert value("gridvm_domain_net_rx_bytes_total") > 0   # at least the test's HTTP requests
    assert fam["gridvm_domains_running"] == [({}, 1.0)]
    info = [lb for lb, _ in fam["gridvm_domain_info"] if lb["name"] == name]
    assert info and info[0]["state"] == "running"


@pytest.mark.guest
def test_top_batch_and_json(host: HostEnv, guest: tuple[str, str]) -> None:
    name, _ = guest
    out = host.gridvm("top", "-b", "-i", "2", "-d", "1").stdout.splitlines()
    headers = [ln for ln in out if ln.split()[:2] == ["NAME", "STATE"]]
    assert len(headers) == 2, out
    for col in ("CPU(sec)", "CPU(%)", "MEM(k)", "MAXMEM(k)", "VCPUS", "NETTX(k)", "NETRX(k)",
                "VBD_RD", "VBD_WR"):
        assert col in headers[0].split()
    rows = [ln.split() for ln in out if ln.split()[:1] == [name]]
    assert len(rows) == 2, out
    cols = headers[0].split()
    row = dict(zip(cols, rows[1], strict=True))
    assert row["STATE"] == "r-----" and row["MAXMEM(k)"] == str(128 * 1024)
    assert row["VCPUS"] == "1" and row["VBDS"] == "1" and float(row["CPU(%)"]) >= 0
    assert all(row[c].isdigit() for c in ("NETTX(k)", "NETRX(k)", "VBD_RD", "VBD_WR"))

    lines = host.gridvm("top", "--json", "-i", "2", "-d", "1").stdout.splitlines()
    docs = [json.loads(ln) for ln in lines]
    assert len(docs) == 2
    assert all(name in [d["name"] for d in doc["domains"]] for doc in docs)
    assert docs[0]["host"]["running"] == 1 and docs[0]["host"]["nr_cpus"] >= 1
    single = json.loads(host.gridvm("top", "--json").stdout)   # default: one document
    assert single["domains"][0]["name"] == name

    bad = host.gridvm("top", "-b", "-d", "0", check=False)
    assert bad.returncode != 0 and "invalid delay" in bad.stderr


@pytest.mark.guest
def test_top_live_view_on_a_terminal(host: HostEnv, guest: tuple[str, str]) -> None:
    """Without -b on a terminal, `top` draws a refreshing table (run under script(1))."""
    if shutil.which("script") is None:
        pytest.skip("script(1) is not installed")
    name, _ = guest
    env = dict(os.environ, GRIDVM_HOME=str(host.home), COLUMNS="160", LINES="20")
    cmd = f"{shlex.quote(sys.executable)} -m gridvm top -i 2 -d 1"
    proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], env=env, capture_output=True,
                          timeout=60, check=False)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", proc.stdout.decode(errors="replace"))
    assert proc.returncode == 0, text[-500:]
    assert text.count("gridvm top - ") == 2 and "1 domain: 1 running" in text
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] == [name]]
    assert len(rows) == 2 and rows[0][1] == "r-----"


@pytest.mark.guest
def test_stats_forget_a_destroyed_domain(host: HostEnv, guest: tuple[str, str]) -> None:
    name, _ = guest
    host.gridvm("destroy", name)
    assert sample(host, name) is None
    assert stats(host)["host"]["running"] == 0
    assert json.loads(host.gridvm("top", "--json").stdout)["domains"] == []
    with pytest.raises(NotFound):
        history(host, name)
