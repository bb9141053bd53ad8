"""Reset a system tree's identity, as virt-sysprep does, so every copy boots as itself.

Operations (virt-sysprep's names): machine-id, ssh-hostkeys, udev-persistent-net,
dhcp-client-state, logfiles, bash-history, tmp-files, random-seed, package-manager-cache
(apt/yum lists only). Everything is a file operation inside the tree (`Tree`): nothing in
the guest is executed. The guest regenerates what it needs on its next boot: systemd
writes a new machine-id, gridvm-identity (or Red Hat's sshd init script) new SSH host keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gridvm.provision.tree import Tree

UDEV_RULES = (
    "/etc/udev/rules.d/70-persistent-net.rules",
    "/etc/udev/rules.d/70-persistent-cd.rules",
    "/lib/udev/rules.d/75-persistent-net-generator.rules.disabled",
)
DHCP_STATE_DIRS = (
    "/var/lib/dhcp", "/var/lib/dhclient", "/var/lib/dhcpcd", "/var/lib/dhcp3",
    "/var/lib/NetworkManager", "/var/lib/systemd/network",
)
LOG_KEEP_EMPTY = ("/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog")
HISTORY_FILES = (".bash_history", ".history", ".sh_history", ".zsh_history", ".ash_history",
                 ".lesshst", ".mysql_history", ".psql_history", ".python_history",
                 ".viminfo")
RANDOM_SEEDS = ("/var/lib/systemd/random-seed", "/var/lib/random-seed",
                "/var/lib/urandom/random-seed")


@dataclass
class Report:
    """What a reset did, by operation (for messages and tests)."""

    done: dict[str, list[str]] = field(default_factory=dict)

    def add(self, op: str, path: str) -> None:
        self.done.setdefault(op, []).append(path)

    def count(self, op: str) -> int:
        return len(self.done.get(op, []))


def reset(tree: Tree) -> Report:
    """Apply every operation to `tree`; returns what was removed or emptied."""
    rep = Report()
    _machine_id(tree, rep)
    for path in tree.files("/etc/ssh", "ssh_host_*"):
        tree.remove(path)
        rep.add("ssh-hostkeys", path)
    for path in UDEV_RULES:
        if tree.remove(path):
            rep.add("udev-persistent-net", path)
    for d in DHCP_STATE_DIRS:
        for path in tree.files(d, "*"):
            if path.endswith((".leases", ".lease", ".lease6", ".leases6", ".duid")) or \
                    "/dhclient" in path or d.endswith("systemd/network"):
                tree.remove(path)
                rep.add("dhcp-client-state", path)
    _logs(tree, rep)
    homes = ["/root"] + [f"/home/{h.rsplit('/', 1)[-1]}" for h in _home_dirs(tree)]
    for home in homes:
        for name in HISTORY_FILES:
            if tree.remove(f"{home}/{name}"):
                rep.add("bash-history", f"{home}/{name}")
    for d in ("/tmp", "/var/tmp"):
        for path in tree.walk_files(d):
            tree.remove(path)
            rep.add("tmp-files", path)
    for path in RANDOM_SEEDS:
        if tree.remove(path):
            rep.add("random-seed", path)
    for path in tree.files("/var/lib/apt/lists", "*_*"):
        tree.remove(path)
        rep.add("package-manager-cache", path)
    return rep


def _machine_id(tree: Tree, rep: Report) -> None:
    """An empty /etc/machine-id: systemd makes a new one at boot (a missing one is not
    the same: systemd would then treat /etc as read-only and not keep the new id)."""
    if tree.exists("/etc/machine-id") or tree.is_dir("/etc/systemd"):
        tree.write_text("/etc/machine-id", "", 0o444)
        rep.add("machine-id", "/etc/machine-id")
    dbus = tree.resolve("/var/lib/dbus/machine-id", follow_last=False)
    if dbus.is_symlink():
        return  # Debian: a link to /etc/machine-id
    if tree.remove("/var/lib/dbus/machine-id"):
        rep.add("machine-id", "/var/lib/dbus/machine-id")


def _logs(tree: Tree, rep: Report) -> None:
    for path in tree.walk_files("/var/log"):
        if path in LOG_KEEP_EMPTY:
            tree.write_text(path, "", 0o664 if path != "/var/log/btmp" else 0o600,
                            owner=_owner_of(tree, path))
        else:
            tree.remove(path)
        rep.add("logfiles", path)


def _owner_of(tree: Tree, path: str) -> tuple[int, int]:
    try:
        st = tree.resolve(path, follow_last=False).lstat()
    except OSError:
        return (0, 0)
    return (st.st_uid, st.st_gid)


def _home_dirs(tree: Tree) -> list[str]:
    try:
        host = tree.resolve("/home")
    except OSError:
        return []
    if not host.is_dir():
        return []
    return [str(p) for p in sorted(host.iterdir()) if p.is_dir() and not p.is_symlink()]
