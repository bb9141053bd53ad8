"""The accelerator probe: KVM only if a guest really boots under it; never hangs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gridvm.host.hostinfo import qemu_binary
from gridvm.images.store import ImageInfo
from gridvm.qemu import accel


def test_auto_probes_once_and_caches(tiny_image: ImageInfo, tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    start = time.monotonic()
    verdict = accel.choose("auto", qemu_binary(), tiny_image.kernel, tiny_image.ramdisk,
                           cache=cache)
    first = time.monotonic() - start
    assert verdict.accel in ("kvm", "tcg") and verdict.reason
    assert first < 30, "the probe must give up on a broken /dev/kvm"
    if verdict.accel == "tcg":
        assert "using TCG" in verdict.reason
    assert json.loads(cache.read_text())["accel"] == verdict.accel
    start = time.monotonic()
    again = accel.choose("auto", qemu_binary(), tiny_image.kernel, tiny_image.ramdisk,
                         cache=cache)
    assert again == verdict and time.monotonic() - start < 1.0


def test_forced_modes_and_missing_image(tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    assert accel.choose("tcg", qemu_binary(), None, None, cache=cache).accel == "tcg"
    assert "forced" in accel.choose("kvm", qemu_binary(), None, None, cache=cache).reason
    v = accel.choose("auto", qemu_binary(), None, None, cache=cache)
    assert v.accel == "tcg" and "no probe image" in v.reason
    assert not cache.exists()
