"""The main job of a single host: `gridvm demo` boots four guests and cleans up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TEST_IMAGES

pytestmark = pytest.mark.guest


def test_demo_runs_and_leaves_nothing(tiny_image: object) -> None:
    proc = subprocess.run([sys.executable, "-m", "gridvm", "demo", "--json"], text=True,
                          capture_output=True, timeout=300,
                          env=dict(os.environ, GRIDVM_IMAGES=str(TEST_IMAGES)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert [g["name"] for g in report["guests"]] == ["fg5x1", "fg5x2", "fg5x3", "fg5x4"]
    assert all(g["hostname"] == g["name"] and g["health"] == "ok" for g in report["guests"])
    assert {d["state"] for d in report["list"]} == {"running"}
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "gvdemo" not in after
    qemus = subprocess.run(["pgrep", "-f", "qemu-system.*gridvm-demo-"], capture_output=True)
    assert qemus.stdout == b"", "the demo left a QEMU running"


def test_image_list_json(tiny_image: object) -> None:
    proc = subprocess.run([sys.executable, "-m", "gridvm", "image", "list", "--json"],
                          text=True, capture_output=True, timeout=60,
                          env=dict(os.environ, GRIDVM_IMAGES=str(TEST_IMAGES)))
    assert proc.returncode == 0, proc.stderr
    images = {i["name"]: i for i in json.loads(proc.stdout)}
    tiny = images["tiny"]
    assert set(tiny) == {"name", "kernel", "ramdisk", "disk"}
    for key in ("kernel", "ramdisk", "disk"):
        assert tiny[key].startswith("/") and os.path.exists(tiny[key])
    # building again is idempotent and instant
    proc = subprocess.run([sys.executable, "-m", "gridvm", "image", "build", "tiny"],
                          text=True, capture_output=True, timeout=60,
                          env=dict(os.environ, GRIDVM_IMAGES=str(TEST_IMAGES)))
    assert proc.returncode == 0 and tiny["kernel"] in proc.stdout
