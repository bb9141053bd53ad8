"""Rewrite a system tree's network configuration for a new identity.

Formats, each rewritten where the tree uses it: Debian's `/etc/network/interfaces`
(ifupdown), systemd-networkd (`/etc/systemd/network/*.network`), netplan
(`/etc/netplan/*.yaml`) and Red Hat / Scientific Linux (`ifcfg-eth0` with `HWADDR`, and
`/etc/sysconfig/network`). Old configuration of Ethernet devices (`eth*`, `en*`, matches by
MAC) is replaced by one for the first NIC, named `eth0` (gridvm boots guests with
`net.ifnames=0`) or matched by type where the format allows it; loopback, bridges, bonds and
other devices are kept. The hostname goes to `/etc/hostname`, `/etc/hosts` and
`/etc/sysconfig/network`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from gridvm.provision.tree import Tree

DEVICE = "eth0"
HEADER = "# written by gridvm for this guest's identity\n"
_ETHER_NAME = re.compile(r"^(eth\d+|en[a-z0-9]+|em\d+|p\d+p\d+)$")


@dataclass(frozen=True)
class NetIdentity:
    """What a guest is on the network: DHCP (no address) or a static IPv4 address."""

    hostname: str | None = None
    mac: str | None = None
    address: ipaddress.IPv4Interface | None = None
    gateway: str | None = None
    dns: tuple[str, ...] = field(default_factory=tuple)

    @property
    def dhcp(self) -> bool:
        return self.address is None


def formats(tree: Tree) -> list[str]:
    """The network configuration systems the tree has (in the order they are written)."""
    found = []
    if tree.is_file("/etc/network/interfaces"):
        found.append("ifupdown")
    if list(tree.files("/etc/systemd/network", "*.network")) or tree.exists(
            "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"):
        found.append("networkd")
    if list(tree.files("/etc/netplan", "*.yaml")):
        found.append("netplan")
    if tree.is_dir("/etc/sysconfig/network-scripts") or tree.is_file("/etc/sysconfig/network"):
        found.append("redhat")
    return found


def rewrite(tree: Tree, ident: NetIdentity) -> list[str]:
    """Write the identity in every format the tree uses; returns those formats."""
    found = formats(tree)
    if not found:
        found = ["networkd"] if tree.is_dir("/lib/systemd/system") else ["ifupdown"]
    writers = {"ifupdown": _ifupdown, "networkd": _networkd, "netplan": _netplan,
               "redhat": _redhat}
    for fmt in found:
        writers[fmt](tree, ident)
    if ident.hostname:
        _hostname(tree, ident.hostname, redhat="redhat" in found)
    return found


# ----- ifupdown ----------------------------------------------------------------------------


def _is_ether(name: str) -> bool:
    return bool(_ETHER_NAME.match(name))


def strip_ether_stanzas(text: str) -> str:
    """/etc/network/interfaces without the stanzas and auto lines of Ethernet devices."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        words = line.split()
        head = words[0] if words else ""
        if head in ("iface", "mapping"):
            skipping = len(words) > 1 and _is_ether(words[1].split(":")[0])
            if skipping:
                continue
        elif head == "auto" or head.startswith("allow-"):
            skipping = False
            kept = [w for w in words[1:] if not _is_ether(w.split(":")[0])]
            if kept:
                out.append(" ".join([head, *kept]))
            continue
        elif head in ("source", "source-directory"):
            skipping = False
        elif skipping and (not head or line[:1] in (" ", "\t") or head.startswith("#")):
            continue
        else:
            skipping = False
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + ("\n" if out else "")


def ifupdown_stanza(ident: NetIdentity) -> str:
    lines = [f"auto {DEVICE}", f"allow-hotplug {DEVICE}"]
    if ident.dhcp:
        lines.append(f"iface {DEVICE} inet dhcp")
    else:
        assert ident.address is not None
        lines += [f"iface {DEVICE} inet static", f"    address {ident.address.with_prefixlen}"]
        if ident.gateway:
            lines.append(f"    gateway {ident.gateway}")
        if ident.dns:
            lines.append(f"    dns-nameservers {' '.join(ident.dns)}")
    return "\n".join(lines) + "\n"


def _ifupdown(tree: Tree, ident: NetIdentity) -> None:
    text = tree.read_text("/etc/network/interfaces", default="")
    for path in tree.files("/etc/network/interfaces.d", "*"):
        inner = tree.read_text(path, default="")
        stripped = strip_ether_stanzas(inner)
        if stripped != inner:
            if stripped.strip():
                tree.write_text(path, stripped)
            else:
                tree.remove(path)
    base = strip_ether_stanzas(text)
    if "iface lo" not in base:
        base = "auto lo\niface lo inet loopback\n" + base
    tree.write_text("/etc/network/interfaces", f"{base}\n{HEADER}{ifupdown_stanza(ident)}")
    if not ident.dhcp and ident.dns:
        _resolv_conf(tree, ident)


# ----- systemd-networkd ----------------------------------------------------------------------


def networkd_unit(ident: NetIdentity) -> str:
    lines = [HEADER.rstrip(), "[Match]", "Type=ether", "", "[Network]"]
    if ident.dhcp:
        lines += ["DHCP=ipv4", "", "[DHCPv4]", "ClientIdentifier=mac"]
    else:
        assert ident.address is not None
        lines.append(f"Address={ident.address.with_prefixlen}")
        if ident.gateway:
            lines.append(f"Gateway={ident.gateway}")
        lines += [f"DNS={d}" for d in ident.dns]
    return "\n".join(lines) + "\n"


def _networkd_is_ether(text: str) -> bool:
    match = re.search(r"^\[Match\](.*?)(?=^\[|\Z)", text, re.M | re.S)
    if match is None:
        return True  # no [Match]: applies to every link
    body = match.group(1)
    if re.search(r"^\s*(MACAddress|PermanentMACAddress)\s*=", body, re.M):
        return True
    if re.search(r"^\s*Type\s*=\s*ether\b", body, re.M):
        return True
    names = re.search(r"^\s*Name\s*=\s*(.+)$", body, re.M)
    return bool(names and any(n.startswith(("e", "en", "eth")) for n in names.group(1).split()))


def _networkd(tree: Tree, ident: NetIdentity) -> None:
    for path in tree.files("/etc/systemd/network", "*.network"):
        if _networkd_is_ether(tree.read_text(path, default="")):
            tree.remove(path)
    tree.write_text("/etc/systemd/network/10-gridvm.network", networkd_unit(ident))


# ----- netplan -----------------------------------------------------------------------------


def netplan_yaml(ident: NetIdentity) -> str:
    lines = [HEADER.rstrip(), "network:", "  version: 2", "  ethernets:", f"    {DEVICE}:",
             "      match:", '        name: "e*"']
    if ident.dhcp:
        lines += ["      dhcp4: true", "      dhcp-identifier: mac"]
    else:
        assert ident.address is not None
        lines += ["      dhcp4: false", f"      addresses: [{ident.address.with_prefixlen}]"]
        if ident.gateway:
            lines += ["      routes:", "        - to: 0.0.0.0/0", f"          via: {ident.gateway}"]
        if ident.dns:
            lines += ["      nameservers:", f"        addresses: [{', '.join(ident.dns)}]"]
    return "\n".join(lines) + "\n"


def _netplan(tree: Tree, ident: NetIdentity) -> None:
    for path in tree.files("/etc/netplan", "*.yaml"):
        if re.search(r"^\s*ethernets\s*:", tree.read_text(path, default=""), re.M):
            tree.remove(path)
    tree.write_text("/etc/netplan/50-gridvm.yaml", netplan_yaml(ident), 0o600)


# ----- Red Hat / Scientific Linux ----------------------------------------------------------------


def ifcfg(ident: NetIdentity) -> str:
    lines = [HEADER.rstrip(), f"DEVICE={DEVICE}", "TYPE=Ethernet", "ONBOOT=yes"]
    if ident.mac:
        lines.append(f"HWADDR={ident.mac.upper()}")
    if ident.dhcp:
        lines.append("BOOTPROTO=dhcp")
    else:
        assert ident.address is not None
        lines += ["BOOTPROTO=none", f"IPADDR={ident.address.ip}",
                  f"NETMASK={ident.address.netmask}"]
        if ident.gateway:
            lines.append(f"GATEWAY={ident.gateway}")
        lines += [f"DNS{i}={d}" for i, d in enumerate(ident.dns, start=1)]
    return "\n".join(lines) + "\n"


def sysconfig_network(old: str, ident: NetIdentity) -> str:
    """/etc/sysconfig/network with NETWORKING=yes and the new HOSTNAME (GATEWAY moves to
    ifcfg-eth0)."""
    kept = [line for line in old.splitlines()
            if not re.match(r"\s*(NETWORKING|HOSTNAME|GATEWAY|GATEWAYDEV)\s*=", line)]
    lines = ["NETWORKING=yes", *kept]
    if ident.hostname:
        lines.append(f"HOSTNAME={ident.hostname}")
    return "\n".join(lines) + "\n"


def _redhat(tree: Tree, ident: NetIdentity) -> None:
    scripts = "/etc/sysconfig/network-scripts"
    for path in tree.files(scripts, "ifcfg-*"):
        name = path.rsplit("ifcfg-", 1)[-1]
        if _is_ether(name.split(":")[0]):
            tree.remove(path)
    tree.write_text(f"{scripts}/ifcfg-{DEVICE}", ifcfg(ident))
    old = tree.read_text("/etc/sysconfig/network", default="")
    tree.write_text("/etc/sysconfig/network", sysconfig_network(old, ident))
    if not ident.dhcp and ident.dns:
        _resolv_conf(tree, ident)


# ----- hostname and resolver -------------------------------------------------------------------


def _hostname(tree: Tree, hostname: str, *, redhat: bool) -> None:
    short = hostname.split(".")[0]
    if tree.exists("/etc/hostname") or not redhat:
        tree.write_text("/etc/hostname", short + "\n")
    hosts = tree.read_text("/etc/hosts", default="127.0.0.1\tlocalhost\n")
    lines = [line for line in hosts.splitlines() if not line.startswith("127.0.1.1")]
    if not redhat:
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("127.0.0.1")), 0)
        lines.insert(at, f"127.0.1.1\t{short}")
    tree.write_text("/etc/hosts", "\n".join(lines) + "\n")


def _resolv_conf(tree: Tree, ident: NetIdentity) -> None:
    host = tree.resolve("/etc/resolv.conf", follow_last=False)
    if host.is_symlink():
        return  # managed by resolved/resolvconf: the DNS settings above reach it
    tree.write_text("/etc/resolv.conf", "".join(f"nameserver {d}\n" for d in ident.dns))
