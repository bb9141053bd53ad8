"""Choose KVM or TCG: KVM only if a probe guest really boots under it.

`/dev/kvm` existing proves nothing (nested, paravirtual hosts have one that cannot boot a
guest), so the probe boots the tiny image with a short timeout and waits for its ready line.
The verdict is cached per host in /run (cleared at reboot) keyed by kernel and QEMU build.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

READY = b"gridvm-guest: ready"
CACHE = Path(os.environ.get("GRIDVM_ACCEL_CACHE", "/run/gridvm/accel.json"))


@dataclass(frozen=True)
class Verdict:
    accel: str          # "kvm" or "tcg"
    reason: str
    probed_at: float
    key: str


def _key(binary: str) -> str:
    try:
        st = os.stat(binary)
        build = f"{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        build = "missing"
    return f"{platform.release()}|{binary}|{build}"


def probe_kvm(binary: str, kernel: Path, ramdisk: Path, timeout: float = 10.0) -> tuple[bool, str]:
    """Boot the probe guest under KVM; True only if it reaches its ready line in time."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        return False, f"/dev/kvm unusable: {exc.strerror}"
    argv = [binary, "-machine", "pc,accel=kvm", "-cpu", "host", "-m", "128M", "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(ramdisk),
            "-append", "console=ttyS0 panic=-1 gridvm.probe=1"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    try:
        while time.monotonic() - start < timeout:
            chunk = proc.stdout.read(65536) or b""
            seen = (seen + chunk)[-8192:]
            if READY in seen:
                return True, f"probe guest booted under KVM in {time.monotonic() - start:.1f}s"
            if proc.poll() is not None:
                tail = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                return False, f"probe guest exited under KVM: {tail[0][:120]}"
            time.sleep(0.05)
        return False, f"probe guest did not boot under KVM within {timeout:.0f}s"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def choose(mode: str, binary: str, kernel: Path | None, ramdisk: Path | None,
           cache: Path = CACHE) -> Verdict:
    """The accelerator for `mode` ("auto", "kvm", "tcg"); auto probes once per host."""
    key = _key(binary)
    if mode in ("kvm", "tcg"):
        return Verdict(mode, f"forced by configuration (accel={mode})", time.time(), key)
    try:
        cached = Verdict(**json.loads(cache.read_text()))
        if cached.key == key:
            return cached
    except (OSError, ValueError, TypeError):
        pass
    if kernel is None or ramdisk is None:
        return Verdict("tcg", "no probe image yet (gridvm image build tiny); using TCG",
                       time.time(), key)
    ok, why = probe_kvm(binary, kernel, ramdisk)
    verdict = Verdict("kvm" if ok else "tcg", why if ok else f"{why}; using TCG",
                      time.time(), key)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(verdict)))
        tmp.replace(cache)
    except OSError:
        pass
    return verdict
