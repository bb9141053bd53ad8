"""CgroupManager: real cgroups on this host (v1 or v2), plus fake trees for the other layouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gridvm.errors import ConfigError, NotFound
from gridvm.host import cgroups
from gridvm.host.cgroups import CgroupError, CgroupManager, CgroupMounts, write_control

BUSY = "while True: pass"
Spawn = Callable[..., "subprocess.Popen[bytes]"]


def _can_use_real_cgroups() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        CgroupManager()
    except CgroupError:
        return False
    return True


real = pytest.mark.skipif(not _can_use_real_cgroups(), reason="needs root and a cpu cgroup")


@pytest.fixture
def mgr() -> Iterator[CgroupManager]:
    manager = CgroupManager(f"gridvm/test-{uuid.uuid4().hex[:8]}")
    try:
        yield manager
    finally:
        manager.remove_parent()


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(code: str = BUSY) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", code])
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def cpu_share(mgr: CgroupManager, *names: str, seconds: float = 2.0) -> list[float]:
    """Fraction of one CPU each group used over `seconds`."""
    before = [mgr.cpu_usage_ns(n) for n in names]
    start = time.monotonic()
    time.sleep(seconds)
    after = [mgr.cpu_usage_ns(n) for n in names]
    wall = time.monotonic() - start
    return [(b - a) / (wall * 1e9) for a, b in zip(before, after, strict=True)]


def group_paths_of(tid_dir: Path) -> dict[str, str]:
    """cgroup path per relevant hierarchy ("0" for v2) of one thread."""
    paths = {}
    for line in (tid_dir / "cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else ["0"]:
            paths[c] = path
    return paths


# --- real cgroups ------------------------------------------------------------------------------


@real
def test_create_attach_moves_all_threads(mgr: CgroupManager, spawn: Spawn) -> None:
    code = (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "time.sleep(60)"
    )
    proc = spawn(code)
    tasks = Path(f"/proc/{proc.pid}/task")
    deadline = time.monotonic() + 10
    while len(list(tasks.iterdir())) < 4:
        assert time.monotonic() < deadline, "threads did not start"
        time.sleep(0.05)

    mgr.create("dom1")
    mgr.create("dom1")  # idempotent
    assert mgr.exists("dom1") and mgr.list() == ["dom1"]
    mgr.attach("dom1", proc.pid)
    assert mgr.pids("dom1") == [proc.pid]

    wanted = f"/{mgr.parent}/dom1"
    keys = ["0"] if mgr.version == 2 else ["cpu", "cpuacct", "cpuset"]
    for tid_dir in tasks.iterdir():
        paths = group_paths_of(tid_dir)
        for key in keys:
            assert paths[key].endswith(wanted), (tid_dir.name, key, paths)


@real
def test_cap_limits_cpu_share(mgr: CgroupManager, spawn: Spawn) -> None:
    mgr.create("capped")
    mgr.set_cap("capped", 25)
    mgr.attach("capped", spawn().pid)
    time.sleep(0.3)
    (share,) = cpu_share(mgr, "capped")
    print(f"\ncap 25: measured {share:.1%} of one CPU")
    assert 0.15 <= share <= 0.35
    mgr.set_cap("capped", 0)  # removing the cap is accepted
    mgr.set_cap("capped", 150)


@real
def test_weights_share_one_cpu(mgr: CgroupManager, spawn: Spawn) -> None:
    for name, weight in (("heavy", 512), ("light", 256)):
        mgr.create(name)
        mgr.set_cpus(name, frozenset({0}))
        mgr.set_weight(name, weight)
        mgr.attach(name, spawn().pid)
    time.sleep(0.3)
    heavy, light = cpu_share(mgr, "heavy", "light")
    print(f"\nweights 512/256 on CPU 0: {heavy:.1%} vs {light:.1%}, ratio {heavy / light:.2f}")
    assert heavy / light > 1.4


@real
def test_usage_grows_and_remove_cleans_every_hierarchy(mgr: CgroupManager, spawn: Spawn) -> None:
    mgr.create("dom2")
    proc = spawn()
    mgr.attach("dom2", proc.pid)
    first = mgr.cpu_usage_ns("dom2")
    time.sleep(0.3)
    assert mgr.cpu_usage_ns("dom2") > first

    mounts = CgroupMounts.detect()
    if mgr.version == 2:
        assert mounts.unified is not None
        dirs = [mounts.unified / mgr.parent / "dom2"]
    else:
        dirs = [mounts.v1[c] / mgr.parent / "dom2" for c in ("cpu", "cpuacct", "cpuset")]
    assert all(d.is_dir() for d in dirs)

    mgr.remove("dom2")  # the busy process is still in it
    assert not any(d.exists() for d in dirs)
    assert proc.poll() is None  # moved to the root group, not killed
    assert not mgr.exists("dom2") and mgr.list() == []
    mgr.remove("dom2")  # idempotent


HOG = """
import sys, time
blocks = []
for _ in range(int(sys.argv[1])):
    blocks.append(bytearray(1 << 20))
    time.sleep(0.005)
print("survived", flush=True)
time.sleep(30)
"""


@real
def test_memory_limit_is_a_hard_ceiling(mgr: CgroupManager) -> None:
    """A process charged to a group with a limit is killed when it needs more (no swap)."""
    mgr.create("mem1")
    mgr.set_memory_limit("mem1", 96 << 20)
    limit_file = "memory.limit_in_bytes" if mgr.version == 1 else "memory.max"
    assert read_back(mgr, "mem1", limit_file) == str(96 << 20)
    procs = []
    for mib in (40, 300):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)\n" + HOG,
                                 str(mib)], stdout=subprocess.PIPE, text=True)
        mgr.attach("mem1", proc.pid)
        procs.append(proc)
        line = proc.stdout.readline() if proc.stdout else ""
        if mib == 40:
            assert line == "survived\n"
            assert 35 << 20 < mgr.memory_bytes("mem1") <= 96 << 20
            proc.kill()
            proc.wait(timeout=10)
    hog = procs[1]
    assert hog.wait(timeout=30) == -9, "a 300 MiB process survived a 96 MiB limit"
    mgr.set_memory_limit("mem1", None)
    assert int(read_back(mgr, "mem1", limit_file).replace("max", str(1 << 62))) > 1 << 40
    with pytest.raises(ConfigError, match="invalid memory limit"):
        mgr.set_memory_limit("mem1", 4096)


def read_back(mgr: CgroupManager, name: str, control: str) -> str:
    found = [p for p in Path("/sys/fs/cgroup").glob(f"**/{mgr.parent}/{name}/{control}")]
    assert found, f"no {control} for {name}"
    return found[0].read_text().strip()


@real
def test_invalid_inputs(mgr: CgroupManager, spawn: Spawn) -> None:
    mgr.create("dom3")
    for weight in (0, 65536, -1, True):
        with pytest.raises(ConfigError, match="invalid weight"):
            mgr.set_weight("dom3", weight)
    with pytest.raises(ConfigError, match="invalid cap"):
        mgr.set_cap("dom3", -1)
    with pytest.raises(ConfigError, match="empty set of CPUs"):
        mgr.set_cpus("dom3", frozenset())
    with pytest.raises(CgroupError, match=r"cannot write '99' to .*cpuset\.cpus: "):
        mgr.set_cpus("dom3", frozenset({99}))
    for call in (
        lambda: mgr.set_weight("nosuch", 256),
        lambda: mgr.set_cap("nosuch", 10),
        lambda: mgr.attach("nosuch", os.getpid()),
        lambda: mgr.cpu_usage_ns("nosuch"),
        lambda: mgr.pids("nosuch"),
    ):
        with pytest.raises(NotFound, match="no cgroup 'nosuch'"):
            call()
    proc = spawn()
    proc.kill()
    proc.wait()
    with pytest.raises(NotFound, match=f"no process {proc.pid}"):
        mgr.attach("dom3", proc.pid)
    for name in ("", "../etc", "a/b", ".hidden"):
        with pytest.raises(ConfigError, match="invalid cgroup name"):
            mgr.create(name)
    with pytest.raises(ConfigError, match="invalid cgroup parent"):
        CgroupManager("gridvm/../x")


def test_write_control_names_file_and_value(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match=r"cannot write '7' to .*/cpu\.weight: No such file"):
        write_control(tmp_path / "cpu.weight", "7")


# --- fake trees: the layouts this host does not have -------------------------------------------


def _fake_kernel(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    """Make mkdir/rmdir under tmp_path behave like cgroupfs: interface files come and go."""
    real_mkdir = cgroups._mkdir

    def mkdir(path: Path) -> bool:
        created = real_mkdir(path)
        if created:
            sub = path.parent / "cgroup.subtree_control"
            enabled = sub.read_text().replace("+", "").split() if sub.exists() else []
            for fname, content in files.items():
                controller = fname.split(".")[0]
                if controller in ("cgroup", "tasks") or controller in enabled or not sub.exists():
                    (path / fname).write_text(content)
            if sub.exists():
                (path / "cgroup.controllers").write_text(" ".join(enabled))
        return created

    def rmdir(path: Path) -> None:
        if path.is_dir():
            if any(p.is_dir() for p in path.iterdir()):
                raise CgroupError(f"cannot remove cgroup {path}: busy", errno=16)
            shutil.rmtree(path)

    monkeypatch.setattr(cgroups, "_mkdir", mkdir)
    monkeypatch.setattr(cgroups, "_rmdir", rmdir)


V2_FILES = {
    "cgroup.procs": "",
    "cgroup.subtree_control": "",
    "cpu.weight": "100\n",
    "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n",
    "cpuset.cpus": "",
    "memory.max": "max\n",
    "memory.current": "4096\n",
}


def _v2_root(tmp_path: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    (root / "cgroup.procs").write_text("1\n")
    return root


def test_v2_fake_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kernel(monkeypatch, V2_FILES)
    root = _v2_root(tmp_path)
    mgr = CgroupManager("gridvm/abc123", mounts=CgroupMounts(unified=root, v1={}))
    assert mgr.version == 2

    mgr.create("dom1")
    group = root / "gridvm/abc123/dom1"
    for level in (root, root / "gridvm", root / "gridvm/abc123"):
        assert (level / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory"
    assert (group / "cgroup.controllers").read_text() == "cpu cpuset memory"
    assert mgr.exists("dom1") and mgr.list() == ["dom1"]

    for weight, expected in ((256, "100"), (512, "200"), (1, "1"), (65535, "10000")):
        mgr.set_weight("dom1", weight)
        assert (group / "cpu.weight").read_text() == expected
    mgr.set_cap("dom1", 25)
    assert (group / "cpu.max").read_text() == "25000 100000"
    mgr.set_cap("dom1", 150)
    assert (group / "cpu.max").read_text() == "150000 100000"
    mgr.set_cap("dom1", 0)
    assert (group / "cpu.max").read_text() == "max 100000"
    mgr.set_cpus("dom1", frozenset({0, 1, 3}))
    assert (group / "cpuset.cpus").read_text() == "0-1,3"
    mgr.attach("dom1", 4242)
    assert (group / "cgroup.procs").read_text() == "4242"
    assert mgr.pids("dom1") == [4242]
    assert mgr.cpu_usage_ns("dom1") == 1_234_000
    mgr.set_memory_limit("dom1", 300 << 20)
    assert (group / "memory.max").read_text() == str(300 << 20)
    mgr.set_memory_limit("dom1", None)
    assert (group / "memory.max").read_text() == "max"
    assert mgr.memory_bytes("dom1") == 4096

    mgr.remove("dom1")
    assert not group.exists()
    assert (root / "cgroup.procs").read_text() == "4242"  # leftover task moved to the root
    mgr.remove_parent()
    assert not (root / "gridvm/abc123").exists()


def test_v2_controllers_already_enabled_and_no_cpuset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_kernel(monkeypatch, V2_FILES)
    root = _v2_root(tmp_path, controllers="cpu io memory")
    (root / "cgroup.subtree_control").write_text("cpu memory\n")
    mgr = CgroupManager("gridvm", mounts=CgroupMounts(unified=root, v1={}))
    mgr.create("dom1")
    assert (root / "cgroup.subtree_control").read_text() == "cpu memory\n"  # untouched
    with pytest.raises(CgroupError, match="cpuset controller is not available"):
        mgr.set_cpus("dom1", frozenset({0}))


def test_v2_without_cpu_falls_back_to_v1(tmp_path: Path) -> None:
    root = _v2_root(tmp_path, controllers="hugetlb")
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    mgr = CgroupManager(mounts=CgroupMounts(unified=root, v1={"cpu": cpu}))
    assert mgr.version == 1
    with pytest.raises(CgroupError, match="no cgroup hierarchy with the cpu controller"):
        CgroupManager(mounts=CgroupMounts(unified=root, v1={"memory": cpu}))


def test_v1_fake_tree_with_cpu_and_cpuacct_mounted_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        "tasks": "",
        "cgroup.procs": "",
        "cpu.shares": "1024\n",
        "cpu.cfs_period_us": "100000\n",
        "cpu.cfs_quota_us": "-1\n",
        "cpuacct.usage": "5000\n",
        "cpuset.cpus": "\n",
        "cpuset.mems": "\n",
    }
    _fake_kernel(monkeypatch, files)
    both, cpuset = tmp_path / "cpu,cpuacct", tmp_path / "cpuset"
    for root in (both, cpuset):
        root.mkdir()
        (root / "tasks").write_text("1\n")
    (cpuset / "cpuset.cpus").write_text("0-3\n")
    (cpuset / "cpuset.mems").write_text("0\n")
    mounts = CgroupMounts(v1={"cpu": both, "cpuacct": both, "cpuset": cpuset, "memory": tmp_path})
    mgr = CgroupManager("gridvm/h1", mounts=mounts)
    assert mgr.version == 1

    mgr.create("dom1")
    made = sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.glob("*/gridvm/h1/dom1"))
    assert made == ["cpu,cpuacct", "cpuset"]
    assert (cpuset / "gridvm/h1/dom1/cpuset.cpus").read_text() == "0-3"
    assert (cpuset / "gridvm/h1/dom1/cpuset.mems").read_text() == "0"
    group = both / "gridvm/h1/dom1"
    mgr.set_weight("dom1", 256)
    assert (group / "cpu.shares").read_text() == "1024"
    mgr.set_weight("dom1", 65535)
    assert (group / "cpu.shares").read_text() == "262140"
    mgr.set_cap("dom1", 25)
    assert (group / "cpu.cfs_quota_us").read_text() == "25000"
    assert (group / "cpu.cfs_period_us").read_text() == "100000"
    mgr.set_cap("dom1", 0)
    assert (group / "cpu.cfs_quota_us").read_text() == "-1"
    mgr.set_cpus("dom1", frozenset({2, 3}))
    assert (cpuset / "gridvm/h1/dom1/cpuset.cpus").read_text() == "2-3"
    assert mgr.cpu_usage_ns("dom1") == 5000
    mgr.attach("dom1", 77)
    assert (group / "cgroup.procs").read_text() == "77"
    assert (cpuset / "gridvm/h1/dom1/cgroup.procs").read_text() == "77"

    (group / "tasks").write_text("77\n78\n")
    mgr.remove("dom1")
    assert not list(tmp_path.glob("*/gridvm/h1/dom1"))
    assert (both / "tasks").read_text() == "78"  # each leftover thread written to the root


def test_failed_create_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kernel(monkeypatch, {"tasks": "", "cgroup.procs": "", "cpu.shares": ""})
    cpu, cpuset = tmp_path / "cpu", tmp_path / "cpuset"
    cpu.mkdir()
    cpuset.mkdir()  # no cpuset.cpus at its root: creating the child group fails there
    mgr = CgroupManager("gridvm", mounts=CgroupMounts(v1={"cpu": cpu, "cpuset": cpuset}))
    with pytest.raises(CgroupError, match="cpuset.cpus"):
        mgr.create("dom1")
    assert not mgr.exists("dom1")


def test_detect_parses_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 25 0:26 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw shared:11 - cgroup cgroup rw,cpu,cpuacct\n"
        "32 25 0:28 / /sys/fs/cgroup/cpu\\040set rw shared:12 - cgroup cgroup rw,cpuset\n"
        "33 25 0:29 / /proc rw shared:13 - proc proc rw\n"
    )
    mounts = CgroupMounts.detect(str(info))
    assert mounts.unified == Path("/sys/fs/cgroup/unified")
    assert mounts.v1["cpu"] == mounts.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert mounts.v1["cpuset"] == Path("/sys/fs/cgroup/cpu set")
