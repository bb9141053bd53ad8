"""gridvm image import on small synthetic systems in each network-config format (Debian
ifupdown, systemd-networkd, netplan, Scientific Linux 5), from a directory, a tarball and a
partitioned disk image; the result is read back from the built disk without mounting it."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gridvm.errors import Conflict, NotFound
from gridvm.images.store import ImageInfo
from gridvm.provision import diskread, netconfig
from gridvm.provision.importer import SourceError, import_system
from gridvm.provision.pygrub import extract
from gridvm.provision.tree import Tree

MAC = "00:16:3e:12:34:56"
STATIC = netconfig.NetIdentity(hostname="web7.example.org", mac=MAC,
                               address=ipaddress.IPv4Interface("10.20.30.7/24"),
                               gateway="10.20.30.1", dns=("10.20.30.2",))
DHCP = netconfig.NetIdentity(hostname="dyn1", mac=MAC)


def put(root: Path, path: str, text: str = "", mode: int = 0o644) -> None:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)


def base_system(root: Path, release: str, kernel: str, initrd: str) -> None:
    """What any system has, and the state a running one leaves behind."""
    put(root, "/sbin/init", "#!/bin/sh\n", 0o755)
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/dash", root / "bin" / "sh")
    put(root, release.split("=", 1)[0], release.split("=", 1)[1])
    put(root, f"/boot/{kernel}", "KERNEL" * 1000)
    put(root, f"/boot/{initrd}", "INITRD" * 1000)
    put(root, "/etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    put(root, "/etc/ssh/ssh_host_rsa_key", "PRIVATE", 0o600)
    put(root, "/etc/ssh/ssh_host_rsa_key.pub", "ssh-rsa AAAA old")
    put(root, "/etc/ssh/sshd_config", "PermitRootLogin no\n")
    put(root, "/etc/udev/rules.d/70-persistent-net.rules",
        'SUBSYSTEM=="net", ATTR{address}=="52:54:00:aa:bb:cc", NAME="eth0"\n')
    put(root, "/var/log/messages", "old log\n")
    put(root, "/var/log/wtmp", "logins")
    put(root, "/root/.bash_history", "rm -rf /\n")
    put(root, "/home/alice/.bash_history", "ls\n")
    put(root, "/tmp/leftover", "x")
    put(root, "/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\told-name\n")
    put(root, "/etc/fstab", "/dev/sda1 / ext4 defaults 0 1\nUUID=abcd /boot ext4 defaults 0 2\n"
        "proc /proc proc defaults 0 0\n")


def debian_tree(root: Path) -> None:
    base_system(root, "/etc/os-release=PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
                "vmlinuz-6.1.0-9-amd64", "initrd.img-6.1.0-9-amd64")
    put(root, "/lib/systemd/systemd", "", 0o755)
    put(root, "/etc/hostname", "old-name\n")
    put(root, "/etc/network/interfaces",
        "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n"
        "allow-hotplug ens3\niface ens3 inet static\n    address 192.168.1.5/24\n"
        "    gateway 192.168.1.1\n\nauto br0\niface br0 inet manual\n    bridge_ports none\n")
    put(root, "/etc/network/interfaces.d/eth1", "auto eth1\niface eth1 inet dhcp\n")
    put(root, "/var/lib/dhcp/dhclient.ens3.leases", "lease {}\n")
    put(root, "/etc/kernel/postinst.d/initramfs-tools", "#!/bin/sh\n", 0o755)


def networkd_tree(root: Path) -> None:
    debian_tree(root)
    (root / "etc/network/interfaces").unlink()
    shutil.rmtree(root / "etc/network/interfaces.d")
    put(root, "/etc/systemd/network/20-wired.network",
        "[Match]\nMACAddress=52:54:00:aa:bb:cc\n\n[Network]\nAddress=192.168.1.5/24\n")
    put(root, "/etc/systemd/network/30-br0.netdev", "[NetDev]\nName=br0\nKind=bridge\n")
    put(root, "/etc/systemd/network/30-br0.network", "[Match]\nName=br0\n\n[Network]\n")


def netplan_tree(root: Path) -> None:
    base_system(root, "/etc/os-release=PRETTY_NAME=\"Ubuntu 22.04.4 LTS\"\n",
                "vmlinuz-5.15.0-100-generic", "initrd.img-5.15.0-100-generic")
    put(root, "/lib/systemd/systemd", "", 0o755)
    put(root, "/etc/hostname", "old-name\n")
    put(root, "/etc/netplan/50-cloud-init.yaml",
        "network:\n  version: 2\n  ethernets:\n    ens3:\n      match:\n"
        "        macaddress: 52:54:00:aa:bb:cc\n      dhcp4: true\n      set-name: ens3\n")
    put(root, "/etc/netplan/60-vlan.yaml", "network:\n  version: 2\n  vlans: {}\n")


def sl5_tree(root: Path) -> None:
    base_system(root, "/etc/redhat-release=Scientific Linux SL release 5.4 (Boron)\n",
                "vmlinuz-2.6.18-164.el5", "initrd-2.6.18-164.el5.img")
    scripts = "/etc/sysconfig/network-scripts"
    put(root, f"{scripts}/ifcfg-eth0", "DEVICE=eth0\nBOOTPROTO=static\nHWADDR=00:30:48:AA:BB:CC\n"
        "IPADDR=131.225.1.5\nNETMASK=255.255.255.0\nONBOOT=yes\n")
    put(root, f"{scripts}/ifcfg-lo", "DEVICE=lo\nIPADDR=127.0.0.1\nONBOOT=yes\n")
    put(root, f"{scripts}/ifup", "#!/bin/bash\n", 0o755)
    put(root, "/etc/sysconfig/network", "NETWORKING=yes\nNETWORKING_IPV6=no\n"
        "HOSTNAME=fg5x1.fnal.gov\nGATEWAY=131.225.1.1\n")
    put(root, "/var/lib/dhclient/dhclient-eth0.leases", "lease {}\n")
    (root / "etc/rc.d/init.d").mkdir(parents=True)
    (root / "etc/rc.d/rc3.d").mkdir(parents=True)
    put(root, "/etc/rc.d/init.d/network", "#!/bin/bash\n", 0o755)


class Built:
    """An imported image, read back from its disk without mounting it."""

    def __init__(self, info: ImageInfo) -> None:
        assert info.disk is not None
        self.info = info
        self.views = diskread.DiskViews(info.disk)
        part = self.views.partitions()[0]
        reader = self.views.reader(part)
        assert reader is not None
        self.reader = reader

    def __enter__(self) -> Built:
        return self

    def __exit__(self, *exc: object) -> None:
        self.views.__exit__()

    def text(self, path: str) -> str:
        return self.reader.read(path).decode()

    def exists(self, path: str) -> bool:
        return self.reader.exists(path)

    def names(self, path: str) -> list[str]:
        return sorted(self.reader.listdir(path))


def do_import(tmp: Path, make: object, ident: netconfig.NetIdentity, name: str) -> Built:
    src = tmp / f"src-{name}"
    make(src)  # type: ignore[operator]
    before = subprocess.run(["find", str(src), "-printf", "%p %s %m\n"], capture_output=True,
                            text=True, check=True).stdout
    info = import_system(tmp / "images", src, name, ident, size="64M")
    after = subprocess.run(["find", str(src), "-printf", "%p %s %m\n"], capture_output=True,
                           text=True, check=True).stdout
    assert before == after, "import changed its source"
    return Built(info)


def check_reset(b: Built) -> None:
    assert b.text("/etc/machine-id") == ""
    assert not [n for n in b.names("/etc/ssh") if n.startswith("ssh_host_")]
    assert b.exists("/etc/ssh/sshd_config")
    assert not b.exists("/etc/udev/rules.d/70-persistent-net.rules")
    assert not b.exists("/var/log/messages") and b.text("/var/log/wtmp") == ""
    assert not b.exists("/root/.bash_history") and not b.exists("/home/alice/.bash_history")
    assert b.names("/tmp") == []
    fstab = b.text("/etc/fstab")
    assert fstab.startswith(f"{b.info.root}\t/\t") and "# UUID=abcd /boot" in fstab
    assert "\nproc /proc proc defaults 0 0\n" in fstab
    assert b.exists("/usr/local/sbin/gridvm-identity")


def test_debian_ifupdown(tmp_path: Path) -> None:
    with do_import(tmp_path, debian_tree, STATIC, "deb") as b:
        check_reset(b)
        assert not b.exists("/var/lib/dhcp/dhclient.ens3.leases")
        interfaces = b.text("/etc/network/interfaces")
        assert "ens3" not in interfaces and "192.168.1.5" not in interfaces
        assert "iface lo inet loopback" in interfaces and "iface br0 inet manual" in interfaces
        assert ("auto eth0\nallow-hotplug eth0\niface eth0 inet static\n"
                "    address 10.20.30.7/24\n    gateway 10.20.30.1\n"
                "    dns-nameservers 10.20.30.2\n") in interfaces
        assert not b.exists("/etc/network/interfaces.d/eth1")
        assert b.text("/etc/hostname") == "web7\n"
        assert "127.0.1.1\tweb7" in b.text("/etc/hosts") and "old-name" not in b.text(
            "/etc/hosts")
        assert b.exists("/etc/systemd/system/sysinit.target.wants/gridvm-identity.service")
        assert b.exists("/etc/kernel/postinst.d/zz-gridvm-grub")
        info = b.info
        assert (info.kind, info.arch, info.os) == ("import", "amd64",
                                                    "Debian GNU/Linux 12 (bookworm)")
        assert "net.ifnames=0" in info.cmdline and info.kernel.read_text() == "KERNEL" * 1000
        assert info.disk is not None
        booted = extract(info.disk, tmp_path / "boot")
        assert booted.kernel.read_text() == "KERNEL" * 1000
        assert booted.args == f"root={info.root} ro console=tty0 console=ttyS0,115200 " \
                              "no_timer_check net.ifnames=0"


def test_systemd_networkd(tmp_path: Path) -> None:
    with do_import(tmp_path, networkd_tree, DHCP, "nd") as b:
        check_reset(b)
        assert b.names("/etc/systemd/network") == ["10-gridvm.network", "30-br0.netdev",
                                                   "30-br0.network"]
        unit = b.text("/etc/systemd/network/10-gridvm.network")
        assert "[Match]\nType=ether\n" in unit and "DHCP=ipv4" in unit
        assert "ClientIdentifier=mac" in unit and "192.168.1.5" not in unit


def test_netplan(tmp_path: Path) -> None:
    with do_import(tmp_path, netplan_tree, STATIC, "np") as b:
        check_reset(b)
        assert b.names("/etc/netplan") == ["50-gridvm.yaml", "60-vlan.yaml"]
        plan = b.text("/etc/netplan/50-gridvm.yaml")
        assert 'name: "e*"' in plan and "addresses: [10.20.30.7/24]" in plan
        assert "via: 10.20.30.1" in plan and "addresses: [10.20.30.2]" in plan
        assert "Ubuntu" in b.info.os


def test_scientific_linux_5(tmp_path: Path) -> None:
    with do_import(tmp_path, sl5_tree, STATIC, "sl5") as b:
        check_reset(b)
        assert not b.exists("/var/lib/dhclient/dhclient-eth0.leases")
        scripts = "/etc/sysconfig/network-scripts"
        assert b.text(f"{scripts}/ifcfg-eth0").splitlines()[1:] == [
            "DEVICE=eth0", "TYPE=Ethernet", "ONBOOT=yes", "HWADDR=00:16:3E:12:34:56",
            "BOOTPROTO=none", "IPADDR=10.20.30.7", "NETMASK=255.255.255.0",
            "GATEWAY=10.20.30.1", "DNS1=10.20.30.2"]
        assert b.text(f"{scripts}/ifcfg-lo").startswith("DEVICE=lo")
        assert b.text("/etc/sysconfig/network") == ("NETWORKING=yes\nNETWORKING_IPV6=no\n"
                                                    "HOSTNAME=web7.example.org\n")
        assert b.text("/etc/resolv.conf") == "nameserver 10.20.30.2\n"
        assert not b.exists("/etc/hostname"), "Red Hat 5 keeps its hostname in sysconfig"
        # SysV init: gridvm-identity runs before the network service (S10)
        assert b.exists("/etc/rc.d/init.d/gridvm-identity")
        assert "S09gridvm-identity" in b.names("/etc/rc.d/rc3.d")
        assert b.text("/etc/fstab").split("\t")[2] == "ext3", "SL5's kernel predates ext4"
        assert b.info.os == "Scientific Linux SL release 5.4 (Boron)"
        assert "net.ifnames=0" not in b.info.cmdline
        assert "initrd-2.6.18-164.el5.img" in b.text("/boot/grub/grub.cfg")


def test_tarball_and_partitioned_disk_sources(tmp_path: Path) -> None:
    src = tmp_path / "tree"
    debian_tree(src)
    tarball = tmp_path / "system.tar.gz"
    subprocess.run(["tar", "-C", str(src), "--numeric-owner", "-czf", str(tarball), "."],
                   check=True)
    with Built(import_system(tmp_path / "images", tarball, "fromtar", DHCP, size="64M")) as b:
        check_reset(b)
        assert "iface eth0 inet dhcp" in b.text("/etc/network/interfaces")
    # an SL5-shaped disk: /boot on partition 1 (ext2), / on partition 2 (ext3)
    sl5 = tmp_path / "sl5"
    sl5_tree(sl5)
    os.chmod(sl5 / "tmp", 0o1777)
    boot = tmp_path / "bootfs"
    boot.mkdir()
    for f in (sl5 / "boot").iterdir():
        shutil.move(str(f), boot / f.name)
    image = tmp_path / "sl5.img"
    with image.open("wb") as f:
        f.truncate(80 << 20)
    subprocess.run(["sfdisk", "-q", str(image)], input=b"label: dos\nstart=2048, size=32768, "
                   b"type=83, bootable\nstart=34816, type=83\n", check=True)
    for part_dir, start, size, fs in ((boot, 2048, 32768, "ext2"),
                                      (sl5, 34816, 163840 - 34816, "ext3")):
        subprocess.run([f"mkfs.{fs}", "-q", "-F", "-d", str(part_dir), "-E",
                        f"offset={start * 512}", str(image), f"{size // 2}k"], check=True)
    with Built(import_system(tmp_path / "images", image, "fromdisk", STATIC, size="96M")) as b:
        check_reset(b)
        assert "HWADDR=00:16:3E:12:34:56" in b.text(
            "/etc/sysconfig/network-scripts/ifcfg-eth0")
        assert b.exists("/boot/vmlinuz-2.6.18-164.el5"), "the /boot partition was merged"
        assert "1777" in b.reader._stat_mode("/tmp"), "special mode bits survive debugfs"


def test_bad_sources_leave_nothing(tmp_path: Path) -> None:
    images = tmp_path / "images"
    junk = tmp_path / "junk"
    put(junk, "/README", "not a system\n")
    with pytest.raises(SourceError, match="is not a system: no /etc/os-release"):
        import_system(images, junk, "junk", DHCP)
    nokernel = tmp_path / "nokernel"
    debian_tree(nokernel)
    shutil.rmtree(nokernel / "boot")
    with pytest.raises(SourceError, match="no kernel in /boot"):
        import_system(images, nokernel, "nok", DHCP)
    blank = tmp_path / "blank.img"
    with blank.open("wb") as f:
        f.truncate(8 << 20)
    with pytest.raises(SourceError, match="no partition holds a Linux system"):
        import_system(images, blank, "blank", DHCP)
    with pytest.raises(NotFound):
        import_system(images, tmp_path / "missing", "missing", DHCP)
    assert [p.name for p in images.iterdir() if not p.name.endswith(".lock")] == []
    good = tmp_path / "good"
    debian_tree(good)
    import_system(images, good, "good", DHCP, size="64M")
    with pytest.raises(Conflict, match="already exists"):
        import_system(images, good, "good", DHCP, size="64M")


def test_symlinks_in_an_imported_tree_stay_inside_it(tmp_path: Path) -> None:
    src = tmp_path / "evil"
    debian_tree(src)
    canary = tmp_path / "host-canary"
    (src / "etc/network/interfaces").unlink()
    (src / "etc/network/interfaces").symlink_to(str(canary))
    (src / "etc/hostname").unlink()
    (src / "etc/hostname").symlink_to("../../../../../../../../" + str(canary))
    tree = Tree(src)
    assert tree.resolve("/etc/network/interfaces") == src / str(canary).lstrip("/")
    with Built(import_system(tmp_path / "images", src, "evil", DHCP, size="64M")) as b:
        assert "iface eth0 inet dhcp" in b.text("/etc/network/interfaces")
    assert not canary.exists(), "a write followed a symlink out of the tree"
