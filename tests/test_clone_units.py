"""Templates and clones without booting: plans, configs, overlays, NoCloud seeds."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from gridvm.config.xmfile import parse_config
from gridvm.errors import ConfigError, Conflict
from gridvm.images.store import ImageInfo, get_image, template_of, write_manifest
from gridvm.paths import Home
from gridvm.provision import clone as clones
from gridvm.provision import nocloud


def fake_image(images: Path, name: str, *, cloud_init: bool = False) -> ImageInfo:
    d = images / name
    d.mkdir(parents=True)
    for f in ("vmlinuz", "initrd.img"):
        (d / f).write_bytes(b"x")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "64M"],
                   check=True)
    info = ImageInfo(name=name, kernel=d / "vmlinuz", ramdisk=d / "initrd.img",
                     disk=d / "disk.qcow2", kind="debian", disk_format="qcow2",
                     cloud_init=cloud_init, root="UUID=x")
    write_manifest(d, info)
    return get_image(images, name)


def test_plan_names_addresses_hostnames_macs() -> None:
    used = {"00:16:3e:00:00:01"}
    specs = clones.plan("web", count=3, ip="10.1.2.10/24", gateway="10.1.2.1",
                        hostname="www", guest_vars={"role": "db"}, used_macs=used)
    assert [s.name for s in specs] == ["web1", "web2", "web3"]
    assert [s.hostname for s in specs] == ["www1", "www2", "www3"]
    assert [str(s.address) for s in specs] == ["10.1.2.10/24", "10.1.2.11/24", "10.1.2.12/24"]
    macs = {s.mac for s in specs}
    assert len(macs) == 3 and not macs & used and all(m.startswith("00:16:3e:") for m in macs)
    assert [s.guest_vars for s in specs][1] == {"clone_index": "2", "role": "db"}
    one = clones.plan("db", ip="10.0.0.5")
    assert one[0].name == "db" and one[0].hostname == "db" and one[0].address is not None
    assert one[0].address.network == ipaddress.IPv4Network("10.0.0.0/24")
    for kwargs, message in ((dict(count=0), "--count"), (dict(count=2, ip="10.0.0.254/24"),
                            "leave"), (dict(gateway="x"), "--gateway"),
                            (dict(guest_vars={"a-b": "1"}), "guest variable"),
                            (dict(ip="10.0.0.300"), "--ip")):
        with pytest.raises(ConfigError, match=message):
            clones.plan("x", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid domain name"):
        clones.plan("-bad")


def test_configs_parse_as_xm_files(tmp_path: Path) -> None:
    template = fake_image(tmp_path / "images", "tpl")
    spec = clones.plan("c1", ip="10.9.0.7/24", gateway="10.9.0.1",
                       guest_vars={"server_id": "7"})[0]
    disk = tmp_path / "c1.qcow2"
    pv = parse_config(clones.config_text(spec, template, disk, clones.Machine()), "c1.cfg")
    cfg = pv.config
    assert pv.warnings == []
    assert (cfg.bootloader, cfg.type, cfg.memory) == ("pygrub", "pv", 512)
    assert [(d.target, d.vdev, d.format) for d in cfg.disks] == [(str(disk), "xvda", "qcow2")]
    assert cfg.vifs[0].mac == spec.mac and cfg.net.ip == "10.9.0.7"
    assert cfg.guest_vars == {"clone_index": "1", "server_id": "7"}
    seed = tmp_path / "c1-seed.iso"
    hvm = parse_config(clones.config_text(spec, template, disk,
                                          clones.Machine(type="hvm", memory=256), seed),
                       "c1.cfg").config
    assert hvm.type == "hvm" and hvm.vifs[0].model == "e1000"
    assert [(d.vdev, d.devtype, d.mode) for d in hvm.disks] == [("hda", "disk", "w"),
                                                               ("hdc", "cdrom", "r")]


def test_templates_overlays_and_rollback(tmp_path: Path) -> None:
    images = tmp_path / "images"
    home = Home(tmp_path / "home")
    template = fake_image(images, "tpl")
    spec = clones.plan("c1")[0]
    made = clones.Made()
    with pytest.raises(ConfigError, match="not a template"):
        clones.make_files(home, template, spec, clones.Machine(), made)
    assert made.paths == [] or not any(p.exists() for p in made.paths)
    template = clones.mark_template(images, "tpl")
    assert template.template and template_of(images, str(template.disk)) == "tpl"
    assert template.disk is not None and template.disk.stat().st_mode & 0o777 == 0o444
    cfg = clones.make_files(home, template, spec, clones.Machine(), made)
    overlay = home.disks / "c1.qcow2"
    assert clones.backing_file(overlay) == template.disk
    assert cfg == home.domain_configs / "c1.cfg" and cfg.is_file()
    with pytest.raises(Conflict, match="already exists"):
        clones.check_free(home, [spec])
    with pytest.raises(Conflict, match="has clones"):
        clones.unmark_template(images, "tpl", clones.clones_of(home, template))
    made.remove()
    assert not overlay.exists() and not cfg.exists()
    assert not clones.unmark_template(images, "tpl", clones.clones_of(home, template)).template
    (images / "tiny").mkdir()
    write_manifest(images / "tiny", ImageInfo(name="tiny", kernel=images / "tiny" / "k",
                                              ramdisk=images / "tiny" / "r", disk=None))
    with pytest.raises(ConfigError, match="no system disk"):
        clones.mark_template(images, "tiny")


def test_cloud_init_templates_get_a_nocloud_seed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    home = Home(tmp_path / "home")
    fake_image(images, "cloud", cloud_init=True)
    template = clones.mark_template(images, "cloud")
    spec = clones.plan("cc", ip="10.3.0.9/24", gateway="10.3.0.1",
                       guest_vars={"server_id": "3"})[0]
    cfg = clones.make_files(home, template, spec, clones.Machine(), clones.Made())
    seed = home.disks / "cc-seed.iso"
    assert f"'file:{seed},xvdb,r'" in cfg.read_text()
    blkid = subprocess.run(["blkid", "-p", "-o", "export", str(seed)], capture_output=True,
                           text=True, check=True).stdout
    assert "LABEL=cidata" in blkid and "TYPE=iso9660" in blkid
    out = tmp_path / "seed"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(seed), "-extract", "/", str(out)],
                   check=True, capture_output=True)
    meta = (out / "meta-data").read_text()
    assert meta.startswith("instance-id: cc-") and "local-hostname: cc\n" in meta
    net = (out / "network-config").read_text()
    assert f'macaddress: "{spec.mac}"' in net and "addresses: [10.3.0.9/24]" in net
    assert "via: 10.3.0.1" in net
    user = (out / "user-data").read_text()
    assert user.startswith("#cloud-config\nhostname: cc\n") and 'server_id="3"' in user
    assert nocloud.network_config(clones.plan("d")[0]).rstrip().endswith("dhcp4: true")
