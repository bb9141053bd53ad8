"""Real Debian guests: an image built from a recipe, made a template, cloned twice (one PV
through pygrub, one HVM from the same template disk), checked through the guest agent.

The image is built once per session and cached by recipe hash in $GRIDVM_TEST_IMAGES; the
two clones boot side by side and are shared by the tests of this module.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from provisionlab import TEST_IMAGES, TEST_KEY, ProvEnv, build_test_image, prov_env

from gridvm.errors import GridvmError
from gridvm.images.store import ImageInfo, get_image
from gridvm.provision import clone as clones

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

TEMPLATE = "gvtest-amd64"


@pytest.fixture(scope="module")
def prov(tiny_image: ImageInfo, debian_image: ImageInfo,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvEnv]:
    with prov_env(tiny_image, tmp_path_factory.mktemp("prov")) as env:
        env.gridvm("image", "template", TEMPLATE)
        try:
            yield env
        finally:
            env.host.agent.destroy_all()
            for path in env.host.home.joinpath("disks").glob("*"):
                path.unlink()
            env.gridvm("image", "template", "--undo", TEMPLATE, check=False)


@pytest.fixture(scope="module")
def clones2(prov: ProvEnv) -> dict[str, float]:
    """pv1 (PV through pygrub) and hv1 (HVM) cloned from the template and booted together;
    seconds from start to a working agent."""
    started = time.monotonic()
    prov.gridvm("clone", TEMPLATE, "pv1", "--bridge", prov.net, "--set", "server_id=7",
                "--start")
    prov.gridvm("clone", TEMPLATE, "hv1", "--type", "hvm", "--bridge", prov.net, "--start")
    ready = {}
    for name in ("pv1", "hv1"):
        prov.wait_agent(name)
        ready[name] = time.monotonic() - started
    for name in ("pv1", "hv1"):
        prov.wait_boot_done(name)
    return ready


def test_build_is_cached_atomic_and_complete(debian_image: ImageInfo) -> None:
    started = time.monotonic()
    again = build_test_image("amd64")
    assert time.monotonic() - started < 5, "the same recipe must come from the cache"
    assert again.recipe == debian_image.recipe and again.disk == debian_image.disk
    info = get_image(TEST_IMAGES, TEMPLATE)
    assert info.kind == "debian" and info.agent and info.disk_format == "qcow2"
    assert info.root.startswith("UUID=") and info.root[5:] in info.cmdline
    assert info.kernel.stat().st_size > 1 << 20 and info.ramdisk.stat().st_size > 1 << 20
    assert not list(TEST_IMAGES.glob(f".{TEMPLATE}.build-*")), "a build left its work dir"
    assert "bookworm" in info.os


def test_clones_have_distinct_identities(prov: ProvEnv, clones2: dict[str, float]) -> None:
    ids = {}
    for name in ("pv1", "hv1"):
        out = prov.sh(name, "hostname; cat /etc/machine-id; "
                      "cat /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2; "
                      "cat /sys/class/net/eth0/address; "
                      "ip -4 -o addr show dev eth0 | awk '{print $4}'")
        hostname, machine_id, hostkey, mac, addr = out.split()
        ids[name] = (hostname, machine_id, hostkey, mac, addr.split("/")[0])
        assert hostname == name
        assert len(machine_id) == 32
        view = prov.view(name)
        assert view["vifs"][0]["mac"] == mac, "eth0 (net.ifnames=0) carries the domain's MAC"
        assert view["agent"] is True and view["vifs"][0]["ip_source"] == "agent"
        assert view["vifs"][0]["ip"] == ids[name][4] and view["addresses"] == [ids[name][4]]
    for i, what in enumerate(("hostname", "machine-id", "SSH host key", "MAC", "address")):
        assert ids["pv1"][i] != ids["hv1"][i], f"clones share their {what}"
    leases = {le["mac"]: le["ip"] for le in
              json.loads(prov.gridvm("network", "show", prov.net, "--json").stdout)["leases"]}
    assert leases[ids["pv1"][3]] == ids["pv1"][4] and leases[ids["hv1"][3]] == ids["hv1"][4]
    # DHCP identity: each clone asks with its own client id (its MAC), so leases differ
    for name in ("pv1", "hv1"):
        assert "ClientIdentifier=mac" in prov.sh(name, "cat /etc/systemd/network/*.network")


def test_recipe_is_applied(prov: ProvEnv, clones2: dict[str, float]) -> None:
    out = prov.sh("pv1", "stat -c '%a %U' /etc/gridvm-test.conf; cat /etc/gridvm-test.conf; "
                  "cat /home/admin/.ssh/authorized_keys; stat -c '%U %a' /home/admin/.ssh; "
                  "id -nG admin; cat /run/gvtest-hello; cat /root/first-boot.out; "
                  "systemctl is-active qemu-guest-agent ssh")
    assert "600 root\nhello from the recipe\n" in out
    assert TEST_KEY in out and "admin 700" in out and "sudo" in out
    assert "server_id=7 clone_index=1 hello=missing" in out, \
        "first-boot commands run once, with the clone's variables, before recipe services"
    assert out.rstrip().endswith("active\nactive")
    assert prov.sh("hv1", "cat /root/first-boot.out").startswith("server_id=none clone_index=1")


def test_pv_via_pygrub_and_hvm_from_the_same_template(prov: ProvEnv,
                                                      clones2: dict[str, float]) -> None:
    pv = prov.sh("pv1", "cat /proc/cmdline; ls /sys/block; uname -m")
    hv = prov.sh("hv1", "cat /proc/cmdline; ls /sys/block; uname -m")
    assert "root=UUID=" in pv and "gridvm.hostname=pv1" in pv and "vda" in pv
    assert "BOOT_IMAGE=/boot/vmlinuz" in hv and "sda" in hv, "HVM boots through GRUB, IDE"
    assert pv.split()[-1] == hv.split()[-1] == "x86_64"
    home = prov.host.home
    template = get_image(TEST_IMAGES, TEMPLATE)
    for name in ("pv1", "hv1"):
        assert clones.backing_file(home / "disks" / f"{name}.qcow2") == template.disk
    cfg = json.loads(prov.gridvm("list", "pv1", "--json").stdout)[0]["config"]
    assert cfg["bootloader"] == "pygrub" and cfg["kernel"] is None


def test_guest_exec_cli(prov: ProvEnv, clones2: dict[str, float]) -> None:
    res = prov.gridvm("guest-exec", "pv1", "--", "sh", "-c", "echo out; echo err >&2; exit 3",
                      check=False)
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")
    res = prov.gridvm("guest-exec", "--stdin", "pv1", "--", "tr", "a-z", "A-Z", input="abc\n")
    assert res.stdout == "ABC\n"


def test_fsfreeze_and_thaw(prov: ProvEnv, clones2: dict[str, float]) -> None:
    assert prov.gridvm("guest-fsfreeze", "pv1", "status").stdout.strip() == "thawed"
    assert prov.gridvm("guest-fsfreeze", "pv1", "freeze").stdout.startswith("frozen")
    try:
        assert prov.gridvm("guest-fsfreeze", "pv1", "status").stdout.strip() == "frozen"
    finally:
        assert prov.gridvm("guest-fsfreeze", "pv1", "thaw").stdout.startswith("thawed")
    prov.sh("pv1", "touch /root/after-thaw")


def test_shutdown_through_the_agent_when_acpi_is_ignored(prov: ProvEnv,
                                                         clones2: dict[str, float]) -> None:
    prov.sh("hv1", "mkdir -p /etc/systemd/logind.conf.d && printf '[Login]\\n"
            "HandlePowerKey=ignore\\n' > /etc/systemd/logind.conf.d/ignore.conf && "
            "systemctl restart systemd-logind")
    started = time.monotonic()
    prov.gridvm("shutdown", "-w", "--timeout", "90", "hv1")
    took = time.monotonic() - started
    assert prov.view("hv1")["state"] == "shutoff"
    assert took > 25, "the guest ignored ACPI: only the agent could have stopped it"
    assert "shut down through its agent" in prov.gridvm("log", "-n", "50").stdout


def test_address_from_the_nat_lease_without_an_agent(prov: ProvEnv,
                                                     clones2: dict[str, float]) -> None:
    addr = prov.view("pv1")["vifs"][0]["ip"]
    # the agent stops itself: its answer to this very command may be lost
    with contextlib.suppress(GridvmError):
        prov.exec("pv1", "systemctl", "stop", "--no-block", "qemu-guest-agent")
    deadline = time.monotonic() + 120
    while (view := prov.view("pv1"))["agent"] and time.monotonic() < deadline:
        time.sleep(1)
    assert view["agent"] is False
    assert view["vifs"][0]["ip"] == addr and view["vifs"][0]["ip_source"] == "lease"


def test_clone_refusals_leave_nothing(prov: ProvEnv, clones2: dict[str, float],
                                      tmp_path: Path) -> None:
    home = prov.host.home
    before = sorted(p.name for p in (home / "disks").iterdir())
    res = prov.gridvm("clone", TEMPLATE, "pv1", check=False)
    assert res.returncode == 1 and "already in use" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = prov.gridvm("clone", "tiny", "x1", check=False)
    assert res.returncode == 1 and "not a template" in res.stderr
    res = prov.gridvm("clone", TEMPLATE, "bad", "--count", "2", "--ip", "10.9.9.254/24",
                      check=False)
    assert res.returncode == 1 and "leave" in res.stderr
    assert sorted(p.name for p in (home / "disks").iterdir()) == before
    assert {d["name"] for d in prov.host.domains()} == {"pv1", "hv1"}
    # the template's disk itself is never opened writable
    template = get_image(TEST_IMAGES, TEMPLATE)
    cfg = tmp_path / "direct.cfg"
    cfg.write_text(f"name = 'direct'\nbuilder = 'hvm'\nmemory = 256\n"
                   f"disk = [ 'tap:qcow2:{template.disk},hda,w' ]\n")
    res = prov.gridvm("create", str(cfg), check=False)
    assert res.returncode == 1 and "read-only template" in res.stderr


def test_pygrub_refuses_an_unbootable_disk(prov: ProvEnv, tmp_path: Path) -> None:
    blank = tmp_path / "blank.qcow2"
    prov.gridvm("image", "list")  # the CLI works in this env
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "1G"], check=True)
    cfg = tmp_path / "nogrub.cfg"
    cfg.write_text(f"name = 'nogrub'\nmemory = 256\nbootloader = '/usr/bin/pygrub'\n"
                   f"disk = [ 'tap:qcow2:{blank},xvda,w' ]\n")
    res = prov.gridvm("create", str(cfg), check=False)
    assert res.returncode == 1
    assert "pygrub" in res.stderr and "no GRUB configuration" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "nogrub" not in {d["name"] for d in prov.host.domains()}
    run = prov.host.home / "run"
    assert not [p for p in run.iterdir()
                if not any(str(p) == str(run / str(d["domid"])) for d in prov.host.domains())]


def test_import_a_directory_tree_and_boot_it(prov: ProvEnv, clones2: dict[str, float],
                                             tmp_path: Path) -> None:
    """"The hard way": a copy of an installed system (here the template's root filesystem,
    copied out without mounting, then dirtied like a running system) imported with a new
    identity, booted, and checked through its agent."""
    import subprocess

    from gridvm.provision import diskread

    template = get_image(TEST_IMAGES, TEMPLATE)
    assert template.disk is not None
    tree = tmp_path / "rsync-of-a-running-system"
    with diskread.DiskViews(template.disk) as views:
        reader = views.reader(views.partitions()[0])
        assert reader is not None
        reader.copy_tree(tree)
    (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (tree / "etc/ssh/ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAAold old@host\n")
    (tree / "etc/ssh/ssh_host_ed25519_key").write_text("old private key\n")
    (tree / "root/.bash_history").write_text("secret command\n")
    addr = f"{prov.subnet}.77"
    prov.gridvm("image", "import", str(tree), "imp1", "--hostname", "imp1", "--ip",
                f"{addr}/24", "--gateway", f"{prov.subnet}.1")
    imported = get_image(TEST_IMAGES, "imp1")
    try:
        overlay = tmp_path / "imp1.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(imported.disk), str(overlay)], check=True)
        cfg = tmp_path / "imp1.cfg"
        cfg.write_text(f"name = 'imp1'\nmemory = 512\nbootloader = 'pygrub'\n"
                       f"disk = [ 'tap:qcow2:{overlay},xvda,w' ]\n"
                       f"vif = [ 'bridge={prov.net}' ]\n")
        prov.gridvm("create", str(cfg))
        prov.wait_agent("imp1")
        prov.wait_boot_done("imp1")
        out = prov.sh("imp1", "hostname; cat /etc/machine-id; "
                      "cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub; "
                      "ls /root; ip -4 -o addr show dev eth0 | awk '{print $4}'")
        hostname, machine_id, hostkey, *rest = out.split()
        assert hostname == "imp1", "the import's identity, with nothing from gridvm"
        assert len(machine_id) == 32 and machine_id != "0123456789abcdef0123456789abcdef"
        assert hostkey != "AAAAold"
        assert ".bash_history" not in rest and f"{addr}/24" in rest
        prov.gridvm("destroy", "imp1")
    finally:
        import shutil

        shutil.rmtree(TEST_IMAGES / "imp1", ignore_errors=True)
