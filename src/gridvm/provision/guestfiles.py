"""gridvm's own files inside a guest: the identity script, first-boot runner, GRUB writer.

They ship in the package's `provision/guest/` folder; `install` puts them into a tree
(built or imported) and enables them for systemd, or for SysV init on older systems.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from gridvm.provision.tree import Tree

SBIN = "/usr/local/sbin"
# (file in guest/, path in the guest, mode)
SCRIPTS = (
    ("gridvm-identity", f"{SBIN}/gridvm-identity", 0o755),
    ("gridvm-firstboot", f"{SBIN}/gridvm-firstboot", 0o755),
    ("gridvm-grub", f"{SBIN}/gridvm-grub", 0o755),
)
UNITS = (
    ("gridvm-identity.service", "sysinit.target.wants"),
    ("gridvm-firstboot.service", "multi-user.target.wants"),
)
KERNEL_HOOKS = ("/etc/kernel/postinst.d/zz-gridvm-grub", "/etc/kernel/postrm.d/zz-gridvm-grub")
ALL = [s[0] for s in SCRIPTS] + [u[0] for u in UNITS] + ["zz-gridvm-grub",
                                                         "gridvm-identity.init"]


def read(name: str) -> bytes:
    return resources.files("gridvm.provision").joinpath("guest", name).read_bytes()


def digest() -> str:
    """A hash of every guest file (part of the recipe hash)."""
    h = hashlib.sha256()
    for name in ALL:
        h.update(name.encode() + b"\0" + read(name))
    return h.hexdigest()


def uses_systemd(tree: Tree) -> bool:
    """Whether the guest boots with systemd (its /sbin/init is systemd, or systemd is there)."""
    try:
        if "systemd" in str(tree.resolve("/sbin/init").relative_to(tree.root)):
            return True
    except (OSError, ValueError):
        pass
    return any(tree.exists(p) for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd",
                                        "/lib/systemd/system", "/usr/lib/systemd/system"))


def install(tree: Tree, *, grub_hooks: bool = True) -> None:
    """Put the scripts in place and enable the identity (and first-boot) units."""
    for name, path, mode in SCRIPTS:
        tree.write_bytes(path, read(name), mode)
    if uses_systemd(tree):
        for unit, wants in UNITS:
            tree.write_bytes(f"/etc/systemd/system/{unit}", read(unit))
            tree.symlink(f"/etc/systemd/system/{wants}/{unit}", f"/etc/systemd/system/{unit}")
    else:
        init_d = "/etc/rc.d/init.d" if tree.is_dir("/etc/rc.d/init.d") else "/etc/init.d"
        tree.write_bytes(f"{init_d}/gridvm-identity", read("gridvm-identity.init"), 0o755)
        rc_base = "/etc/rc.d" if tree.is_dir("/etc/rc.d/rc3.d") else "/etc"
        for level in "2345":
            tree.symlink(f"{rc_base}/rc{level}.d/S09gridvm-identity",
                         "../init.d/gridvm-identity")
    if grub_hooks:
        for hook in KERNEL_HOOKS:
            tree.write_bytes(hook, read("zz-gridvm-grub"), 0o755)


def write_first_boot(tree: Tree, commands: list[str]) -> None:
    """The recipe's first-boot commands, run once by gridvm-firstboot (sh -e)."""
    if not commands:
        tree.remove("/etc/gridvm/first-boot.sh")
        return
    body = "# first-boot commands from the image recipe (run once, sh -e)\n"
    tree.write_text("/etc/gridvm/first-boot.sh", body + "\n".join(commands) + "\n", 0o755)
