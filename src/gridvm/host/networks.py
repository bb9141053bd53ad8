"""gridvm networks: bridged (Xen's xenbr0, optionally with an uplink) and NAT (libvirt style).

A network's Linux bridge has the network's name, so a vif's `bridge=NAME` (Xen habit) names
either a gridvm network or a plain bridge. A NAT network puts its gateway (.1) on the bridge,
serves DHCP and DNS with dnsmasq (a static lease per domain MAC), masquerades outgoing
traffic and accepts incoming traffic only through port forwards (nftables, in this host's
`gridvm_<tag>` table). Networks are kept in the store and rebuilt when gridvmd starts;
whatever a crashed gridvmd left behind (taps without a QEMU, dnsmasq of deleted networks,
nft rules) is reconciled then.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from gridvm.config.model import VifSpec
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound
from gridvm.host import netdevs, nft
from gridvm.host.dnsmasq import DhcpHost, Dnsmasq, stop_others
from gridvm.paths import Home
from gridvm.store.records import DomainRecord, Store

log = logging.getLogger("gridvm.networks")

META_KEY = "networks"
RUN_ROOT = Path("/run/gridvm")
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,14}")

Mode = Literal["bridge", "nat"]
Proto = Literal["tcp", "udp"]


class Forward(BaseModel):
    """A port forward: HOST_PORT on every host address → DOMAIN:PORT."""

    proto: Proto = "tcp"
    host_port: int = Field(ge=1, le=65535)
    domain: str
    port: int = Field(ge=1, le=65535)


class Network(BaseModel):
    """One gridvm network as the store keeps it."""

    name: str
    mode: Mode
    uplink: str | None = None
    subnet: str | None = None
    forwards: list[Forward] = Field(default_factory=list)
    leases: dict[str, str] = Field(default_factory=dict)   # MAC -> address gridvm allocated
    moved_addresses: list[str] = Field(default_factory=list)   # from the uplink to the bridge
    moved_routes: list[tuple[str, str]] = Field(default_factory=list)  # (dst, gateway)
    deleting: bool = False

    @property
    def bridge(self) -> str:
        return self.name

    @property
    def net(self) -> ipaddress.IPv4Network:
        assert self.subnet is not None
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.net.network_address + 1}/{self.net.prefixlen}")

    def static_pool(self) -> range:
        """Integer addresses gridvm allocates static leases from: the lower half."""
        base = int(self.net.network_address)
        return range(base + 2, base + self.net.num_addresses // 2)

    def dynamic_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """dnsmasq's pool for unknown MACs: the upper half."""
        base = int(self.net.network_address)
        return (ipaddress.IPv4Address(base + self.net.num_addresses // 2),
                self.net.broadcast_address - 1)


def host_tag(home: Home) -> str:
    """A short id of this gridvmd home: names its nft table and dnsmasq directory."""
    return hashlib.sha256(str(home.root).encode()).hexdigest()[:10]


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"invalid subnet {text!r}: {exc} (example: 10.88.1.0/24)") from None
    if not 8 <= net.prefixlen <= 29:
        raise ConfigError(f"subnet {text} must be between /8 and /29")
    if not net.is_private:
        raise ConfigError(f"subnet {text} is not a private address range")
    return net


def vif_ip(rec: DomainRecord, index: int, vif: VifSpec) -> str | None:
    """The address a domain asked for on a vif: vif `ip=`, or the `ip` key for the first."""
    return vif.ip or (rec.config.net.ip if index == 0 else None)


class NetworkManager:
    """The networks of one gridvmd; implements the host manager's NetPlug."""

    def __init__(self, home: Home, store: Store, *, run_root: Path = RUN_ROOT) -> None:
        self.home = home
        self.store = store
        self.tag = host_tag(home)
        self.table = f"gridvm_{self.tag}"
        self.rundir = run_root / "net" / self.tag
        self.nets: dict[str, Network] = {}
        self._lock = asyncio.Lock()

    # ----- persistence -------------------------------------------------------------------

    def _load(self) -> None:
        raw = self.store.get_meta(META_KEY)
        data: dict[str, Any] = json.loads(raw) if raw else {}
        self.nets = {k: Network.model_validate(v) for k, v in data.items()}

    def _save(self) -> None:
        self.store.set_meta(META_KEY, json.dumps(
            {k: v.model_dump(mode="json") for k, v in sorted(self.nets.items())}))

    def get(self, name: str) -> Network:
        net = self.nets.get(name)
        if net is None or net.deleting:
            raise NotFound(f"network {name!r} does not exist")
        return net

    def _dnsmasq(self, net: Network) -> Dnsmasq:
        return Dnsmasq(self.rundir, net.name, net.bridge, net.gateway, net.dynamic_range())

    # ----- startup: rebuild and reconcile -------------------------------------------------

    async def start(self) -> None:
        """Re-create every network and remove what a crashed gridvmd left behind."""
        async with self._lock:
            self._load()
            for net in list(self.nets.values()):
                if net.deleting:
                    log.info("%s: finishing an interrupted delete", net.name)
                    await self._teardown(net)
                    del self.nets[net.name]
                    self._save()
                    continue
                try:
                    await asyncio.to_thread(self._reconcile_links, net)
                    if net.mode == "nat":
                        await self._dnsmasq(net).ensure(self._dhcp_hosts(net))
                except GridvmError as exc:
                    log.error("%s: cannot rebuild network: %s", net.name, exc)
            self._save()
            try:
                await stop_others(self.rundir, set(self.nets))
                await asyncio.to_thread(self._render)
            except GridvmError as exc:
                log.error("cannot reconcile networks: %s", exc)

    def _reconcile_links(self, net: Network) -> None:
        br = netdevs.get_link(net.bridge)
        if br is None:
            log.info("%s: re-creating bridge", net.name)
            self._make_bridge(net)
            br = netdevs.get_link(net.bridge)
            assert br is not None
        elif br.kind != "bridge":
            raise GridvmError(f"{net.bridge} exists and is not a bridge")
        else:
            netdevs.set_up(net.bridge)
        if net.mode == "nat":
            netdevs.add_address(net.bridge, net.gateway)
            netdevs.enable_forwarding()
        elif net.uplink:
            up = netdevs.get_link(net.uplink)
            if up is None:
                log.warning("%s: uplink %s is missing", net.name, net.uplink)
            elif up.master != br.index:
                self._attach_uplink(net)
            for addr in net.moved_addresses:
                netdevs.add_address(net.bridge, ipaddress.IPv4Interface(addr))
            for dst, gw in net.moved_routes:
                netdevs.add_route(net.bridge, netdevs.Route(dst, gw))
        for port in netdevs.ports(net.bridge):
            if port.kind == "tun" and not port.carrier:
                log.info("%s: removing stale tap %s (no QEMU holds it)", net.name, port.name)
                netdevs.delete(port.name)

    # ----- building and removing one network ---------------------------------------------

    def _make_bridge(self, net: Network) -> None:
        """The bridge, with a fixed MAC (the uplink's, else one derived from the name).

        A bridge's own MAC otherwise follows its lowest port, changing as taps come and go,
        and guests' ARP entries for the gateway go stale.
        """
        up = netdevs.get_link(net.uplink) if net.uplink else None
        digest = hashlib.sha256(f"{self.tag}/{net.name}".encode()).digest()
        mac = up.mac if up else "02:" + ":".join(f"{b:02x}" for b in digest[:5])
        netdevs.create_bridge(net.bridge, mac=mac)

    def _attach_uplink(self, net: Network) -> None:
        """Xen's network-bridge: enslave the uplink and move its addresses and routes."""
        assert net.uplink is not None
        addrs = netdevs.addresses(net.uplink)
        routes = netdevs.gateway_routes(net.uplink)
        if addrs:
            net.moved_addresses = [str(a) for a in addrs]
            net.moved_routes = [(r.dst, r.gateway) for r in routes]
            self._save()  # before moving, so a crash cannot lose them
        netdevs.set_master(net.uplink, net.bridge)
        for a in addrs:
            netdevs.add_address(net.bridge, a)
            netdevs.del_address(net.uplink, a)
        for r in routes:
            netdevs.add_route(net.bridge, r)

    def _release_links(self, net: Network) -> None:
        """Give the uplink its addresses back and delete the bridge (idempotent)."""
        up = netdevs.get_link(net.uplink) if net.uplink else None
        if up is not None and net.uplink is not None:
            netdevs.set_master(net.uplink, None)
            for addr in net.moved_addresses:
                netdevs.add_address(net.uplink, ipaddress.IPv4Interface(addr))
            for dst, gw in net.moved_routes:
                try:
                    netdevs.add_route(net.uplink, netdevs.Route(dst, gw))
                except GridvmError as exc:
                    log.warning("%s: %s", net.name, exc)
        for port in netdevs.ports(net.bridge):
            if port.kind == "tun" and not port.carrier:
                netdevs.delete(port.name)
        br = netdevs.get_link(net.bridge)
        if br is not None and br.kind == "bridge":
            netdevs.delete(net.bridge)

    def _build(self, net: Network) -> None:
        self._make_bridge(net)
        if net.mode == "nat":
            netdevs.add_address(net.bridge, net.gateway)
            netdevs.enable_forwarding()
        elif net.uplink:
            self._attach_uplink(net)

    async def _teardown(self, net: Network) -> None:
        if net.mode == "nat":
            await self._dnsmasq(net).stop()
        await asyncio.to_thread(self._release_links, net)

    # ----- the API's verbs ----------------------------------------------------------------

    async def create(self, name: str, mode: Mode, *, uplink: str | None = None,
                     subnet: str | None = None) -> Network:
        """Create a network; on any failure nothing of it remains."""
        async with self._lock:
            net = await self._validate_new(name, mode, uplink, subnet)
            self.nets[name] = net
            self._save()
            try:
                await asyncio.to_thread(self._build, net)
                if mode == "nat":
                    await self._dnsmasq(net).ensure([])
                await asyncio.to_thread(self._render)
            except BaseException:
                del self.nets[name]
                self._save()
                try:
                    await self._teardown(net)
                    await asyncio.to_thread(self._render)
                except GridvmError as exc:
                    log.error("%s: cleanup after a failed create: %s", name, exc)
                raise
            log.info("%s: created %s network", name, mode)
            return net

    async def _validate_new(self, name: str, mode: Mode, uplink: str | None,
                            subnet: str | None) -> Network:
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"invalid network name {name!r}: it names the bridge, so use "
                              "a letter then up to 14 letters, digits, '_' or '-'")
        if name in self.nets:
            raise Conflict(f"network {name!r} already exists")
        links = {lk.name: lk for lk in await asyncio.to_thread(netdevs.links)}
        if name in links:
            raise Conflict(f"a network interface named {name} already exists on this host "
                           "(not a gridvm network); choose another name")
        if mode == "bridge":
            if subnet:
                raise ConfigError("a bridge network takes no --subnet: its guests use the "
                                  "addresses of the LAN it bridges to")
            if uplink:
                self._check_uplink(uplink, links)
            return Network(name=name, mode=mode, uplink=uplink)
        if uplink:
            raise ConfigError("a NAT network takes no --uplink: it routes through the host")
        if not subnet:
            raise ConfigError("a NAT network needs --subnet, e.g. --subnet 10.88.1.0/24")
        net = parse_subnet(subnet)
        for other in self.nets.values():
            if other.subnet and other.net.overlaps(net):
                raise Conflict(f"subnet {net} overlaps network {other.name} ({other.subnet})")
        for ifname, addr in await asyncio.to_thread(netdevs.all_addresses):
            if addr.network.overlaps(net) and not addr.ip.is_loopback:
                raise Conflict(f"subnet {net} overlaps {addr} on {ifname}")
        for ifname, dst in await asyncio.to_thread(netdevs.routed_networks):
            if dst.overlaps(net):
                raise Conflict(f"subnet {net} overlaps the route to {dst} via {ifname}")
        return Network(name=name, mode=mode, subnet=str(net))

    def _check_uplink(self, uplink: str, links: dict[str, netdevs.Link]) -> None:
        lk = links.get(uplink)
        if lk is None:
            raise NotFound(f"uplink {uplink} does not exist on this host")
        if lk.loopback or lk.kind in ("bridge", "tun"):
            raise ConfigError(f"uplink {uplink} cannot be bridged (it is "
                              f"{'the loopback' if lk.loopback else 'a ' + lk.kind})")
        if lk.master is not None:
            owner = next((x.name for x in links.values() if x.index == lk.master), "?")
            raise Conflict(f"uplink {uplink} is already a port of {owner}")
        for other in self.nets.values():
            if other.uplink == uplink:
                raise Conflict(f"uplink {uplink} is already used by network {other.name}")

    async def delete(self, name: str) -> None:
        """Delete a network no running domain is attached to."""
        async with self._lock:
            net = self.get(name)
            users = self._attached(net)
            if users:
                raise Conflict(f"network {name} is in use by running domain(s) "
                               f"{', '.join(users)}; shut them down or destroy them first")
            net.deleting = True
            self._save()
            await self._teardown(net)
            del self.nets[name]
            self._save()
            await asyncio.to_thread(self._render)
            log.info("%s: deleted", name)

    async def add_forward(self, name: str, fwd: Forward) -> Network:
        """Forward HOST_PORT to a domain on a NAT network."""
        async with self._lock:
            net = self.get(name)
            if net.mode != "nat":
                raise ConfigError(f"network {name} is a bridge network: port forwards need "
                                  "a NAT network")
            for other in self.nets.values():
                for f in other.forwards:
                    if (f.proto, f.host_port) == (fwd.proto, fwd.host_port):
                        raise Conflict(f"host port {fwd.host_port}/{fwd.proto} is already "
                                       f"forwarded to {f.domain}:{f.port} (network {other.name})")
            rec = self.store.by_name(fwd.domain)
            if rec is None:
                raise NotFound(f"domain {fwd.domain!r} does not exist on this host")
            if not any(v.bridge == net.name for v in rec.config.vifs):
                raise Conflict(f"domain {fwd.domain} has no interface on network {name}")
            net.forwards.append(fwd)
            self._assign(net, rec)
            self._save()
            await self._dnsmasq(net).reload(self._dhcp_hosts(net))
            try:
                await asyncio.to_thread(self._render)
            except BaseException:
                net.forwards.remove(fwd)
                self._save()
                raise
            return net

    async def remove_forward(self, name: str, host_port: int, proto: Proto = "tcp") -> Network:
        async with self._lock:
            net = self.get(name)
            kept = [f for f in net.forwards if (f.proto, f.host_port) != (proto, host_port)]
            if len(kept) == len(net.forwards):
                raise NotFound(f"network {name} has no forward of port {host_port}/{proto}")
            net.forwards = kept
            self._save()
            await asyncio.to_thread(self._render)
            return net

    # ----- domains on networks (the NetPlug protocol) -------------------------------------

    async def bridge_for(self, vif: VifSpec) -> str | None:
        net = self.nets.get(vif.bridge or "")
        if net is None:
            return vif.bridge
        if net.deleting:
            raise Conflict(f"network {net.name} is being deleted")
        if await asyncio.to_thread(netdevs.get_link, net.bridge) is None:
            raise GridvmError(f"the bridge of network {net.name} is missing; restart gridvmd "
                              "to rebuild it")
        if net.mode == "nat" and vif.ip and ipaddress.IPv4Address(vif.ip) not in net.net:
            raise ConfigError(f"vif ip {vif.ip} is outside network {net.name} ({net.subnet})")
        return net.bridge

    async def domain_started(self, rec: DomainRecord) -> None:
        """Give the domain its static leases and bring its port forwards up to date."""
        await self._domain_changed(rec, forget=False)

    async def domain_stopped(self, rec: DomainRecord) -> None:
        """A domain that will not come back (not managed) gives its addresses back."""
        await self._domain_changed(rec, forget=not rec.managed)

    async def leases(self, rec: DomainRecord) -> dict[str, str]:
        """MAC -> address of the leases dnsmasq handed the domain's vifs (NAT networks)."""
        macs = {v.mac for v in rec.config.vifs if v.mac}
        out: dict[str, str] = {}
        for net in self._nats_of(rec):
            for lease in self._dnsmasq(net).leases():
                if lease.mac.lower() in macs:
                    out[lease.mac.lower()] = lease.ip
        return out

    async def _domain_changed(self, rec: DomainRecord, *, forget: bool) -> None:
        async with self._lock:
            nats = self._nats_of(rec)
            if not nats and not any(f.domain == rec.name for n in self.nets.values()
                                    for f in n.forwards):
                return
            try:
                for net in nats:
                    if forget:
                        for v in rec.config.vifs:
                            if v.mac:
                                net.leases.pop(v.mac, None)
                    else:
                        self._assign(net, rec)
                    self._save()
                    await self._dnsmasq(net).reload(self._dhcp_hosts(net, skip=rec if forget
                                                                     else None))
                await asyncio.to_thread(self._render)
            except (GridvmError, OSError) as exc:
                log.error("%s: network update failed: %s", rec.name, exc)

    def _nats_of(self, rec: DomainRecord) -> list[Network]:
        names = {v.bridge for v in rec.config.vifs}
        return [n for n in self.nets.values() if n.mode == "nat" and n.name in names
                and not n.deleting]

    def _attached(self, net: Network) -> list[str]:
        return [r.name for r in self.store.all() if r.domid is not None
                and any(v.bridge == net.name for v in r.config.vifs)]

    def _assign(self, net: Network, rec: DomainRecord) -> None:
        """Allocate a static lease for each of the domain's MACs on `net` lacking an address."""
        for i, v in enumerate(rec.config.vifs):
            if v.bridge != net.name or not v.mac:
                continue
            wanted = vif_ip(rec, i, v)
            if wanted:
                net.leases[v.mac] = wanted
            elif v.mac not in net.leases:
                net.leases[v.mac] = self._free_address(net)

    def _free_address(self, net: Network) -> str:
        macs = {v.mac for r in self.store.all() for v in r.config.vifs if v.mac}
        for mac in [m for m in net.leases if m not in macs]:
            del net.leases[mac]  # its domain is gone
        used = set(net.leases.values()) | {le.ip for le in self._dnsmasq(net).leases()}
        for n in net.static_pool():
            addr = str(ipaddress.IPv4Address(n))
            if addr not in used:
                return addr
        raise Conflict(f"network {net.name} has no free address left")

    def _dhcp_hosts(self, net: Network, skip: DomainRecord | None = None) -> list[DhcpHost]:
        owners = {v.mac: r.name for r in self.store.all()
                  if skip is None or r.uuid != skip.uuid for v in r.config.vifs}
        return [DhcpHost(mac, ip, owners[mac]) for mac, ip in sorted(net.leases.items())
                if mac in owners]

    def _target(self, net: Network, domain: str) -> ipaddress.IPv4Address | None:
        rec = self.store.by_name(domain)
        if rec is None:
            return None
        for v in rec.config.vifs:
            if v.bridge == net.name and v.mac and v.mac in net.leases:
                return ipaddress.IPv4Address(net.leases[v.mac])
        return None

    def _render(self) -> None:
        """Write this host's nft table from the networks (or remove it if none needs it)."""
        nats = [n for n in self.nets.values() if n.mode == "nat" and not n.deleting]
        if not nats:
            nft.delete_table(self.table)
            return
        forwards = []
        for n in nats:
            for f in n.forwards:
                dest = self._target(n, f.domain)
                if dest is None:
                    log.warning("%s: forward %s/%s: domain %s has no address yet", n.name,
                                f.host_port, f.proto, f.domain)
                    continue
                forwards.append(nft.PortForward(f.proto, f.host_port, n.bridge, dest, f.port))
        nft.replace_table(self.table, nft.network_rules(
            [nft.NatNet(n.bridge, n.net) for n in nats], forwards))

    # ----- views --------------------------------------------------------------------------

    def view(self, net: Network) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": net.name, "mode": net.mode, "bridge": net.bridge, "uplink": net.uplink,
            "subnet": net.subnet, "domains": self._attached(net),
            "addresses": net.moved_addresses,
        }
        if net.mode == "nat":
            dm = self._dnsmasq(net)
            lo, hi = net.dynamic_range()
            out.update(
                gateway=str(net.gateway.ip), dhcp_range=f"{lo}-{hi}", dnsmasq_pid=dm.pid(),
                table=self.table,
                hosts=[{"domain": h.name, "mac": h.mac, "ip": h.ip}
                       for h in self._dhcp_hosts(net)],
                leases=[{"mac": le.mac, "ip": le.ip, "hostname": le.hostname}
                        for le in dm.leases()],
                forwards=[f.model_dump() for f in net.forwards],
            )
        return out

    def views(self) -> list[dict[str, Any]]:
        return [self.view(n) for n in sorted(self.nets.values(), key=lambda n: n.name)
                if not n.deleting]
