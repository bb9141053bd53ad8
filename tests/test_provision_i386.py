"""32-bit guests on a 64-bit host: an `--arch i386` image (Debian's 686-pae kernel) boots
as PV through pygrub and as HVM from the same template; `uname -m` says i686 in both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from provisionlab import TEST_IMAGES, ProvEnv, build_test_image, prov_env

from gridvm.images.store import ImageInfo

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

TEMPLATE = "gvtest-i386"


@pytest.fixture(scope="module")
def i386_image() -> ImageInfo:
    return build_test_image("i386")


@pytest.fixture(scope="module")
def prov32(tiny_image: ImageInfo, i386_image: ImageInfo,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvEnv]:
    with prov_env(tiny_image, tmp_path_factory.mktemp("prov32")) as env:
        env.gridvm("image", "template", TEMPLATE)
        try:
            env.gridvm("clone", TEMPLATE, "pv32", "--bridge", env.net, "--memory", "384",
                       "--start")
            env.gridvm("clone", TEMPLATE, "hv32", "--type", "hvm", "--bridge", env.net,
                       "--memory", "384", "--start")
            for name in ("pv32", "hv32"):
                env.wait_agent(name)
            yield env
        finally:
            env.host.agent.destroy_all()
            for path in env.host.home.joinpath("disks").glob("*"):
                path.unlink()
            env.gridvm("image", "template", "--undo", TEMPLATE, check=False)


def test_the_image_is_32_bit(i386_image: ImageInfo) -> None:
    assert i386_image.arch == "i386" and i386_image.kernel_version.endswith("-686-pae")
    head = i386_image.kernel.read_bytes()[:0x240]
    assert head[0x202:0x206] == b"HdrS", "a bzImage the PV direct boot can load"
    assert (TEST_IMAGES / TEMPLATE / "disk.qcow2").is_file()


def test_pv_and_hvm_run_i686_with_pae(prov32: ProvEnv) -> None:
    for name, disk in (("pv32", "vda"), ("hv32", "sda")):
        out = prov32.sh(name, "uname -m; uname -r; ls /sys/block; grep -cw pae /proc/cpuinfo; "
                        "getconf LONG_BIT; hostname")
        machine, release, *rest = out.split()
        assert machine == "i686" and release.endswith("-686-pae"), out
        assert disk in rest and rest[-1] == name and rest[-2] == "32"
        assert int(rest[-3]) >= 1, "the vCPU offers PAE"
    view = prov32.view("pv32")
    assert view["agent"] and view["vifs"][0]["ip_source"] == "agent"
