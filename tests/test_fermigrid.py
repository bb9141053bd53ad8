"""The main job: `gridvm demo fermigrid --json` end to end (two-host lab cluster, eight
guests, four virtual services, h1 powered off under client load, everything removed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gridvm.host import netns
from gridvm.images.store import ImageInfo

pytestmark = pytest.mark.guest


def test_demo_fermigrid_survives_a_host_power_off(tiny_image: ImageInfo,
                                                  tmp_path: Path) -> None:
    env = dict(os.environ, GRIDVM_HOME=str(tmp_path / "home"), GRIDVM_ACCEL="tcg",
               GRIDVM_IMAGES=str(tiny_image.kernel.parent.parent))
    proc = subprocess.run([sys.executable, "-m", "gridvm", "demo", "fermigrid", "--json"],
                          env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    print({k: r[k] for k in ("requests", "failed", "longest_gap_s", "ha_domains")})
    assert set(r["services"]) == {"voms", "gums", "saz", "squid"}
    assert set(r["ha_domains"]) == {"fg5x1", "fg5x2", "fg5x3", "fg5x4"}
    assert all(b["host"] == "h2" for b in r["ha_domains"].values())
    assert set(r["placement"].values()) == {"h2"} and len(r["placement"]) == 8
    assert all(owner == "h2" for owner in r["vip_owners"]["after"].values())
    for name, s in r["services"].items():
        n = {"voms": 1, "gums": 2, "saz": 3, "squid": 4}[name]
        assert set(s["answered_by"]) == {f"fg5x{n}", f"fg6x{n}"}
    assert r["failed"] < r["requests"] / 10
    assert not netns.exists(f"{r['lab']}-h1") and not netns.exists(f"{r['lab']}-client")
