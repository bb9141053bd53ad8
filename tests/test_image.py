"""The tiny guest image: store API, atomic build, and real PV/HVM boots under TCG.

Every QEMU here talks to the test only through 127.0.0.1 (slirp hostfwd) and a QMP
socket; the guest reaches the test's HTTP server as 10.0.2.2 (slirp's host alias).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import http.client
import http.server
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from gridvm.errors import NotFound, ResourceError
from gridvm.images import tiny
from gridvm.images.store import ImageError, ImageInfo, get_image, list_images
from gridvm.images.tiny import build_tiny, run

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0
HTTP_TIMEOUT = 30.0
READY = re.compile(r"gridvm-guest: ready hostname=(\S*) ip=(\S*) uptime=([0-9.]+)")


# --- helpers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def md5_head(path: Path, mb: int) -> str:
    with path.open("rb") as f:
        return hashlib.md5(f.read(mb * 2**20)).hexdigest()


def raw_disk(path: Path, mb: int) -> Path:
    with path.open("wb") as f:
        f.truncate(mb * 2**20)
    return path


class Guest:
    """One QEMU process with serial log, QMP socket and HTTP forwarded to 127.0.0.1."""

    def __init__(self, workdir: Path, name: str, args: list[str], guest_ip: str = "") -> None:
        self.name = name
        self.port = free_port()
        self.serial = workdir / f"{name}.serial"
        self.stderr = workdir / f"{name}.stderr"
        self.qmp_sock = Path(tempfile.mkdtemp(prefix="gvt-")) / "qmp.sock"
        fwd = f"hostfwd=tcp:127.0.0.1:{self.port}-{guest_ip}:80"
        self.argv = [
            QEMU, "-accel", "tcg", "-m", "128", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-netdev", f"user,id=n0,{fwd}", *args,
        ]
        self.started = time.monotonic()
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        out = self.serial.read_text(errors="replace") if self.serial.exists() else ""
        err = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"--- {self.name} serial (tail) ---\n{out[-3000:]}\n--- stderr ---\n{err[-1000:]}"

    def get(self, path: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, str, dict[str, str]]:
        """GET path; (status, body, headers). Only ever to 127.0.0.1."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            assert resp.version == 10, f"{path}: not HTTP/1.0"
            headers = {k.lower(): v for k, v in resp.getheaders()}
            assert headers.get("connection") == "close", headers
            assert int(headers["content-length"]) == len(body.encode()), headers
            return resp.status, body, headers
        finally:
            conn.close()

    def text(self, path: str, timeout: float = HTTP_TIMEOUT) -> str:
        status, body, _ = self.get(path, timeout)
        assert status == 200, f"GET {path} -> {status} {body!r}"
        return body

    def wait_http(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds from QEMU start until /health answers ok."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited with {self.proc.returncode} during boot\n{self.log()}")
            with contextlib.suppress(OSError, http.client.HTTPException, AssertionError):
                # short tries: slirp holds a connection made before the guest's
                # network is up until its SYN retransmit, which would skew the time
                if self.get("/health", timeout=0.5)[1] == "ok":
                    return time.monotonic() - self.started
            time.sleep(0.1)
        pytest.fail(f"{self.name}: no HTTP within {timeout:.0f} s\n{self.log()}")

    def ready_uptime(self) -> float:
        """Guest kernel uptime when init printed its ready line."""
        self.ready_line()
        m = READY.search(self.serial.read_text(errors="replace"))
        return float(m.group(3)) if m else -1.0

    def ready_line(self, timeout: float = 10.0) -> tuple[str, str]:
        """(hostname, ip) from the serial ready line (printed just after HTTP is up)."""
        deadline = time.monotonic() + timeout
        while not (m := READY.search(self.serial.read_text(errors="replace"))):
            assert time.monotonic() < deadline, f"no ready line\n{self.log()}"
            time.sleep(0.1)
        return m.group(1), m.group(2)

    def qmp(self, fn: Callable[[QMPClient], Any], timeout: float = 45.0) -> Any:
        """Run `await fn(client)` on a fresh QMP connection."""

        async def session() -> Any:
            client = QMPClient(f"test-{self.name}")
            for _ in range(100):
                if self.qmp_sock.exists():
                    break
                await asyncio.sleep(0.05)
            await client.connect(str(self.qmp_sock))
            try:
                return await asyncio.wait_for(fn(client), timeout)
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()

        return asyncio.run(session())

    def powerdown(self) -> dict[str, Any]:
        """ACPI power button; returns the SHUTDOWN event once QEMU has exited."""

        async def press(client: QMPClient) -> dict[str, Any]:
            with client.listener("SHUTDOWN") as listener:
                await client.execute("system_powerdown")
                return dict(await listener.get())

        event: dict[str, Any] = self.qmp(press, timeout=30)
        self.proc.wait(timeout=30)
        return event

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        shutil.rmtree(self.qmp_sock.parent, ignore_errors=True)


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    """Factory for guests; every QEMU started is killed at teardown."""
    started: list[Guest] = []

    def start(name: str, args: list[str], guest_ip: str = "") -> Guest:
        g = Guest(tmp_path, name, args, guest_ip)
        started.append(g)
        return g

    yield start
    for g in started:
        g.kill()


class _HostHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        found = self.path == "/hello"
        body = b"hello from host\n" if found else b"nothing here\n"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def host_http() -> Iterator[int]:
    """A tiny HTTP server on 127.0.0.1 (the guest sees it as 10.0.2.2); yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n[tiny image] {line}")


def pv_args(img: ImageInfo, cmdline: str, *extra: str) -> list[str]:
    return [
        "-kernel", str(img.kernel), "-initrd", str(img.ramdisk),
        "-append", f"console=ttyS0 quiet {cmdline}",
        "-device", "virtio-net-pci,netdev=n0", *extra,
    ]


def check_common(g: Guest, host_port: int) -> None:
    """Endpoints every guest answers the same way."""
    assert g.text("/health") == "ok"
    assert float(g.text("/uptime")) > 0
    uuid.UUID(g.text("/bootid"))
    status, body, _ = g.get("/no/such/page")
    assert (status, body) == (404, "not found")
    assert g.text(f"/fetch?url=http%3A%2F%2F10.0.2.2%3A{host_port}%2Fhello") == (
        "status 200\nhello from host\n"
    )
    assert g.text(f"/fetch?url=http://10.0.2.2:{host_port}/missing").startswith("status 404")
    t0 = time.monotonic()
    assert g.text("/burn?seconds=3") == "burning 3"
    assert time.monotonic() - t0 < 2.5, "/burn must answer at once"
    status, body, _ = g.get("/burn?seconds=x")
    assert (status, body) == (400, "bad seconds")


def check_disk(g: Guest, disk: Path) -> None:
    """/write, /fill, /sum against the raw file on the host."""
    m = re.fullmatch(r"wrote 8 MB in ([0-9.]+) s = ([0-9.]+) MB/s", g.text("/write?mb=8"))
    assert m, "bad /write answer"
    assert float(m.group(2)) > 0
    assert re.fullmatch(r"filled 4 MB in [0-9.]+ s", g.text("/fill?mb=4"))
    guest_sum = g.text("/sum?mb=4")
    assert re.fullmatch(r"[0-9a-f]{32}", guest_sum)
    assert guest_sum == md5_head(disk, 4)
    assert guest_sum != hashlib.md5(bytes(4 * 2**20)).hexdigest()
    status, body, _ = g.get("/write?mb=100000")
    assert (status, body) == (400, "disk too small")


# --- store and build ----------------------------------------------------------------


def images_dir(img: ImageInfo) -> Path:
    return img.kernel.parent.parent


def test_image_store(tiny_image: ImageInfo, tmp_path: Path) -> None:
    store = images_dir(tiny_image)
    t0 = time.monotonic()
    assert build_tiny(store) == tiny_image
    assert time.monotonic() - t0 < 5, "a built image must be returned from the cache"

    j = tiny_image.to_json()
    assert set(j) == {"name", "kernel", "ramdisk", "disk"}
    assert j["name"] == "tiny"
    for key in ("kernel", "ramdisk", "disk"):
        value = j[key]
        assert value is not None and Path(value).is_absolute() and Path(value).is_file()
    assert tiny_image.hvm_kernel is not None and tiny_image.hvm_kernel.is_file()

    assert get_image(store, "tiny") == tiny_image
    assert tiny_image in list_images(store)
    with pytest.raises(NotFound):
        get_image(store, "no-such-image")
    with pytest.raises(NotFound):
        get_image(store, "../tiny")
    assert list_images(tmp_path) == []

    assert tiny_image.disk is not None
    boot = tiny_image.disk.read_bytes()[:512]
    assert boot[510:] == b"\x55\xaa" and b"GRIDVMBOOT" in boot
    cpio = gzip.decompress(tiny_image.ramdisk.read_bytes())
    for member in (b"init", b"bin/busybox", b"lib/modules/virtio_net.ko", b"etc/gridvm/http.sh"):
        assert member + b"\0" in cpio


def test_module_order(tiny_image: ImageInfo) -> None:
    mods = (tiny_image.kernel.parent / "modules.json").read_text()
    pv = re.findall(r'"(\w+)"', mods.split('"hvm"')[0])
    for before, after in (
        ("virtio", "virtio_pci"), ("failover", "net_failover"),
        ("net_failover", "virtio_net"), ("virtio_ring", "virtio_blk"),
    ):
        assert pv.index(before) < pv.index(after), pv
    assert "button" in pv and "e1000" not in pv
    hvm = re.findall(r'"(\w+)"', mods.split('"hvm"')[1])
    for before, after in (("scsi_mod", "libata"), ("libata", "ata_piix"), ("scsi_mod", "sd_mod")):
        assert hvm.index(before) < hvm.index(after), hvm
    assert "e1000" in hvm


def test_run_helper() -> None:
    assert run(["sh", "-c", "echo out"]) == "out\n"
    with pytest.raises(ImageError, match="boom"):
        run(["sh", "-c", "echo boom >&2; exit 3"])
    with pytest.raises(ImageError, match="timed out"):
        run(["sleep", "5"], timeout=0.2)
    with pytest.raises(ResourceError, match="not found"):
        run(["gridvm-no-such-tool"])


def test_build_atomic_cached_and_rebuilt_on_recipe_change(
    tiny_image: ImageInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / ".cache"
    cache.mkdir()
    for deb in (images_dir(tiny_image) / ".cache").glob("*.deb"):
        (cache / deb.name).symlink_to(deb)

    # A build that fails late leaves neither the image nor its scratch directory.
    def boom(*_args: object, **_kw: object) -> None:
        raise ImageError("simulated failure")

    with monkeypatch.context() as m:
        m.setattr(tiny, "make_boot_disk", boom)
        with pytest.raises(ImageError, match="simulated"):
            build_tiny(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".tiny.lock") == [".cache"]
    with pytest.raises(NotFound):
        get_image(tmp_path, "tiny")

    # A real build from the cached .debs; then cached; then rebuilt when the recipe changes.
    logs: list[str] = []
    first = build_tiny(tmp_path, log=logs.append)
    assert first.recipe == tiny_image.recipe and any("built" in line for line in logs)
    assert build_tiny(tmp_path) == first
    monkeypatch.setattr(tiny, "RECIPE_VERSION", tiny.RECIPE_VERSION + 1000)
    logs.clear()
    second = build_tiny(tmp_path, log=logs.append)
    assert second.recipe != first.recipe
    assert "image recipe changed: rebuilding" in logs
    assert [i.name for i in list_images(tmp_path)] == ["tiny"]
    assert not list(tmp_path.glob(".tiny.*-*")), "scratch or old directories left behind"


# --- real guests --------------------------------------------------------------------


@pytest.mark.guest
def test_pv_static_ip(
    tiny_image: ImageInfo, guests: Callable[..., Guest], host_http: int, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    disk = raw_disk(tmp_path / "data.raw", 64)
    ip = "ip=10.0.2.77::10.0.2.2:255.255.255.0:pv-static:eth0:off"
    g = guests(
        "pv-static",
        pv_args(tiny_image, ip, "-drive", f"file={disk},format=raw,if=virtio"),
        guest_ip="10.0.2.77",  # hostfwd reaches the guest only if it took the static address
    )
    boot = g.wait_http()
    report(capsys, f"PV (static ip): HTTP up {boot:.2f} s after QEMU start, "
                   f"guest uptime at ready {g.ready_uptime():.2f} s")
    assert g.text("/") == "pv-static"
    assert g.ready_line() == ("pv-static", "10.0.2.77")
    check_common(g, host_http)
    check_disk(g, disk)

    event = g.powerdown()
    assert event["data"]["guest"] is True, event
    assert g.proc.returncode == 0
    assert "powering off" in g.serial.read_text()


@pytest.mark.guest
def test_pv_dhcp_reset_and_crash(
    tiny_image: ImageInfo, guests: Callable[..., Guest], capsys: pytest.CaptureFixture[str]
) -> None:
    g = guests(
        "pv-dhcp",
        pv_args(tiny_image, "gridvm.hostname=pv-dhcp", "-device", "pvpanic",
                "-action", "panic=shutdown"),
    )
    boot = g.wait_http()
    report(capsys, f"PV (dhcp): HTTP up {boot:.2f} s after QEMU start, "
                   f"guest uptime at ready {g.ready_uptime():.2f} s")
    assert g.text("/") == "pv-dhcp"
    assert g.ready_line() == ("pv-dhcp", "10.0.2.15")
    status, body, _ = g.get("/write?mb=1")
    assert (status, body) == (503, "no disk")
    first_boot = g.text("/bootid")

    async def reset(client: QMPClient) -> None:
        await client.execute("system_reset")

    g.qmp(reset)
    time.sleep(0.5)
    g.started = time.monotonic()
    g.wait_http()
    assert g.text("/bootid") != first_boot
    assert float(g.text("/uptime")) < 60

    async def crash(client: QMPClient) -> dict[str, Any]:
        with client.listener("GUEST_PANICKED") as listener:
            assert await asyncio.to_thread(g.text, "/crash") == "crashing"
            return dict(await listener.get())

    event = g.qmp(crash, timeout=30)
    assert event["event"] == "GUEST_PANICKED"
    g.proc.wait(timeout=30)


@pytest.mark.guest
def test_hvm_disk_boot(
    tiny_image: ImageInfo, guests: Callable[..., Guest], host_http: int, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert tiny_image.disk is not None
    boot_disk = tmp_path / "boot.img"
    shutil.copyfile(tiny_image.disk, boot_disk)
    data = raw_disk(tmp_path / "data.raw", 32)
    g = guests(
        "hvm",
        [
            "-drive", f"file={boot_disk},format=raw,if=ide,index=0",
            "-drive", f"file={data},format=raw,if=ide,index=1",
            "-device", "e1000,netdev=n0",
            "-smbios", "type=11,value=gridvm:hostname=hvm-oem",
            "-smbios", "type=11,value=gridvm:ip=10.0.2.88::10.0.2.2:255.255.255.0::eth0:off",
            "-smbios", "type=11,value=unrelated:hostname=wrong",
        ],
        guest_ip="10.0.2.88",
    )
    boot = g.wait_http()
    report(capsys, f"HVM (SeaBIOS, syslinux, IDE, e1000): HTTP up {boot:.2f} s after QEMU "
                   f"start, guest uptime at ready {g.ready_uptime():.2f} s")
    assert g.text("/") == "hvm-oem"
    assert g.ready_line() == ("hvm-oem", "10.0.2.88")
    check_common(g, host_http)
    check_disk(g, data)

    event = g.powerdown()
    assert event["data"]["guest"] is True, event
    assert g.proc.returncode == 0
    assert boot_disk.read_bytes() == tiny_image.disk.read_bytes(), "boot disk was written"
