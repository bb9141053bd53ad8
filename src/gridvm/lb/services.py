"""The virtual services of one gridvmd: validation, health checking, programming, VIPs.

Services are kept in the store (meta key `services`) and rebuilt when gridvmd starts; the
nft table and the VIPs outlive gridvmd, like guests do, so a daemon restart drops no
connection. Each service has one asyncio task that checks all its backends every
`interval` (fixed cadence, each probe bounded to 80% of the interval), feeds rise/fall
hysteresis, and reprograms the service's map in one nft transaction when the set of
backends that may take new connections changes.

Backends are domains: their addresses come from gridvm on every round (config `ip`, vif
`ip=`, NAT network lease), so a restarted domain stays a backend. A backend whose domain
is known not to run leaves rotation at once; otherwise the checks decide.

A sync task (every 0.25 s) keeps each VIP address on this host exactly while this host owns
it: always without a cluster; in a cluster (`Peers`, gridvm.cluster.vips) while it wins
the VIP's etcd election, and it also pulls the cluster's shared service specs, sends this
host's adverts and acts on peers that fell silent (their backends out, their VIPs deposed).

When a backend leaves rotation because it failed, its conntrack entries for the VIP are
deleted, so clients' retransmissions are balanced again rather than sent after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from typing import Any

from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound
from gridvm.host import netdevs
from gridvm.host.manager import HostManager
from gridvm.host.networks import RUN_ROOT, NetworkManager, host_tag
from gridvm.lb import conntrack, vip
from gridvm.lb.backends import BackendState, Peers, Resolver, Runtime, domain_address
from gridvm.lb.ctsync import ConnSync
from gridvm.lb.director import Director, Programmed, prepare_host
from gridvm.lb.health import Hysteresis, probe
from gridvm.lb.model import Backend, ServiceSpec, Target, check_weight
from gridvm.store.records import Store

log = logging.getLogger("gridvm.lb")

META_KEY = "services"
SYNC_S = 0.25
SPECS_EVERY = 4            # pull shared specs every 4th sync round
CTSYNC_CHECK_S = 5.0       # how often conntrackd is checked to be running


class ServiceManager:
    """All virtual services of one gridvmd."""

    def __init__(self, manager: HostManager, peers: Peers) -> None:
        self.manager = manager
        self.peers = peers
        self.resolver: Resolver = peers
        self.director = Director(host_tag(manager.home))
        self.ctsync = ConnSync(RUN_ROOT / "lb" / host_tag(manager.home))
        self._ctsync_at: tuple[float, tuple[str, str, tuple[str, ...]] | None] = (0.0, None)
        self.services: dict[str, Runtime] = {}
        self.vips: dict[str, str] = {}          # VIP address -> interface we added it to
        self.shared: set[str] = set()           # names seen in the cluster's specs
        self._owned: set[str] = set()           # VIPs our elections held at the last sync
        self._lock = asyncio.Lock()
        self._sync_task: asyncio.Task[None] | None = None

    @property
    def store(self) -> Store:
        return self.manager.store               # the cluster layer may swap it

    # ----- persistence and lifecycle ----------------------------------------------------------

    def _save(self) -> None:
        self.store.set_meta(META_KEY, json.dumps({
            "services": [rt.spec.model_dump(mode="json") for rt in self.services.values()],
            "vips": self.vips}))

    def _runtime(self, spec: ServiceSpec) -> Runtime:
        return Runtime(spec, {b.domain: BackendState(Hysteresis(spec.rise, spec.fall))
                              for b in spec.backends})

    async def start(self) -> None:
        """Rebuild the table from the stored services (after one round of checks)."""
        raw = self.store.get_meta(META_KEY)
        data: dict[str, Any] = json.loads(raw) if raw else {}
        async with self._lock:
            for item in data.get("services", []):
                spec = ServiceSpec.model_validate(item)
                self.services[spec.name] = self._runtime(spec)
            self.vips = dict(data.get("vips", {}))
            await asyncio.gather(*(self._round(rt, program=False)
                                   for rt in self.services.values()))
            try:
                programs = [self._programmed(rt) for rt in self.services.values()]
                await asyncio.to_thread(self.director.rebuild, programs)
                for rt, p in zip(self.services.values(), programs, strict=True):
                    rt.programmed = p
                if self.services:
                    await asyncio.to_thread(prepare_host)
            except GridvmError as exc:
                log.error("cannot rebuild virtual services: %s", exc)
        for rt in self.services.values():
            rt.task = asyncio.create_task(self._run(rt), name=f"lb-{rt.spec.name}")
        self._sync_task = asyncio.create_task(self._sync(), name="lb-sync")

    async def close(self) -> None:
        """Stop checking; the kernel keeps forwarding as programmed.

        In a cluster the VIPs are handed over (elections resigned, addresses removed): a
        standby director takes them at once rather than after a lease expires."""
        tasks = [rt.task for rt in self.services.values() if rt.task]
        if self._sync_task:
            tasks.append(self._sync_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.peers.active():
            for addr in list(self.vips):
                await self._release(addr)
        await self.peers.close()

    async def _sync(self) -> None:
        n = 0
        while True:
            try:
                if n % SPECS_EVERY == 0 and self.peers.active():
                    await self._pull()
                await self._own()
            except GridvmError as exc:
                log.error("virtual services sync: %s", exc)
            except Exception:
                log.exception("virtual services sync failed")
            n += 1
            with contextlib.suppress(TimeoutError):   # a VIP election changed: act now
                await asyncio.wait_for(self.peers.changed.wait(), SYNC_S)
            self.peers.changed.clear()

    async def _own(self) -> None:
        """Hold exactly the VIPs this host owns; act on peers that fell silent."""
        wanted = {rt.spec.vip for rt in self.services.values()}
        if self.peers.active():
            addrs = await asyncio.to_thread(netdevs.all_addresses)
            lans = vip.lan_interfaces(wanted, addrs)
            await self.peers.advertise(lans)
            await self._sync_connections(lans, wanted, addrs)
            for host in self.peers.take_silent():
                await self._sideline(host, "went silent")
        silent = self.peers.newly_silent()
        for addr in sorted(wanted):
            if not self.peers.owner(addr) and silent:
                await self.peers.depose(addr, silent)
            if self.peers.owner(addr):
                if addr not in self._owned:             # just elected
                    self._owned.add(addr)
                    try:
                        await self._suspect(addr)
                    except GridvmError as exc:
                        log.error("VIP %s: %s", addr, exc)
                await self._claim(addr)
            else:
                self._owned.discard(addr)
                if addr in self.vips:
                    await self._release(addr)
        for addr in self.peers.campaigning() - wanted:
            await self.peers.release(addr)

    async def _sync_connections(self, lans: set[str], vips: set[str],
                                addrs: list[tuple[str, ipaddress.IPv4Interface]]) -> None:
        """Keep conntrackd running on the first VIP LAN (checked every CTSYNC_CHECK_S, or at
        once when the LAN or this host's addresses change)."""
        if not lans:
            return
        ifname = sorted(lans)[0]
        own = tuple(sorted({str(a.ip) for _, a in addrs} - vips))
        mine = [str(a.ip) for n, a in addrs if n == ifname and a.network.prefixlen < 32
                and str(a.ip) not in vips]
        if not mine:
            return
        want = (ifname, mine[0], own)
        at, had = self._ctsync_at
        if want == had and time.monotonic() - at < CTSYNC_CHECK_S:
            return
        self._ctsync_at = (time.monotonic(), want)
        try:
            await self.ctsync.ensure(ifname, mine[0], list(own))
        except GridvmError as exc:
            log.error("connection sync: %s", exc)

    async def _pull(self) -> None:
        """Make this host's services the cluster's shared specs."""
        async with self._lock:
            specs = await self.peers.specs()     # under the lock: no verb is half-published
            if specs is None:
                return
            for name, rt in list(self.services.items()):
                if name not in specs:
                    if name in self.shared:            # deleted elsewhere
                        await self._drop(rt)
                        log.info("%s: deleted in the cluster", name)
                    else:                              # made before this host joined
                        await self.peers.publish(name, rt.spec)
                elif specs[name] != rt.spec:
                    rt.spec = specs[name]
                    for b in rt.spec.backends:
                        rt.states.setdefault(b.domain, BackendState(
                            Hysteresis(rt.spec.rise, rt.spec.fall)))
                    await self._program(rt)
                    self._save()
            for name, spec in specs.items():
                self.shared.add(name)
                if name not in self.services:
                    rt = self._runtime(spec)
                    await self._round(rt, program=False)
                    self.services[name] = rt
                    await asyncio.to_thread(prepare_host)
                    await self._program(rt, new=True)
                    self._save()
                    rt.task = asyncio.create_task(self._run(rt), name=f"lb-{name}")
                    log.info("%s: added from the cluster", name)

    async def _suspect(self, addr: str) -> None:
        """Taking `addr` over from another host: that host's backends whose last check
        failed leave rotation now (fall = 1) and return after `rise` passes."""
        host = self.peers.taken_from(addr)
        if host is not None:
            await self._sideline(host, "its host lost the VIP", addr=addr, failing_only=True)

    async def _sideline(self, host: str, why: str, *, addr: str | None = None,
                        failing_only: bool = False) -> None:
        """Take `host`'s backends out of rotation until they pass `rise` checks again (of
        the services on VIP `addr`, or of all) — unless that would leave a service with
        none."""
        async with self._lock:
            for rt in self.services.values():
                if addr is not None and rt.spec.vip != addr:
                    continue
                ups = [d for d, st in rt.states.items() if st.hyst.up]
                out = [d for d in ups if rt.states[d].host == host
                       and (rt.states[d].hyst.failures > 0 or not failing_only)]
                if not out or len(out) == len(ups):
                    continue
                for d in out:
                    st = rt.states[d]
                    st.hyst.force_down()
                    st.since, st.last = time.time(), f"{host} {why}"
                log.info("%s: backends %s out until they pass checks again (%s %s)",
                         rt.spec.name, ", ".join(out), host, why)
                await self._program(rt)

    async def _claim(self, addr: str) -> None:
        if await asyncio.to_thread(vip.present, addr) is None:
            if self.peers.active():   # connections open through the last owner go on here
                await self.ctsync.take_over()
            ifname = await asyncio.to_thread(vip.add, addr)
            if ifname:
                self.vips[addr] = ifname
                self._save()
                log.info("VIP %s added on %s", addr, ifname)

    async def _release(self, addr: str) -> None:
        ifname = self.vips.pop(addr, None)
        if ifname:
            await asyncio.to_thread(vip.remove, addr, ifname)
            log.info("VIP %s removed from %s", addr, ifname)

    # ----- checking -----------------------------------------------------------------------------

    async def _run(self, rt: Runtime) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += rt.spec.interval
            try:
                await self._round(rt)
            except GridvmError as exc:
                log.error("%s: %s", rt.spec.name, exc)
            except Exception:
                log.exception("%s: health round failed", rt.spec.name)
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    async def _round(self, rt: Runtime, *, program: bool = True,
                     only: str | None = None) -> None:
        """Check every backend (or only `only`) once; reprogram the service if its usable
        set changed."""
        spec = rt.spec
        results = await asyncio.gather(*(self._check(rt, b) for b in spec.backends
                                         if only is None or b.domain == only))
        if program and any(results):
            async with self._lock:
                if self.services.get(spec.name) is rt:
                    await self._program(rt)

    async def _check(self, rt: Runtime, b: Backend) -> bool:
        """One check of one backend, fed to its hysteresis; True if its state changed."""
        spec = rt.spec
        timeout = max(0.05, min(spec.interval * 0.8, 5.0))
        st = rt.states[b.domain]
        loc = await self.resolver.locate(b.domain)
        if loc is None or not loc.running or loc.ip is None:
            st.last = ("domain does not exist" if loc is None else
                       "domain is not running" if not loc.running else "no address known")
            st.ip = loc.ip if loc else st.ip
            changed = st.hyst.force_down()
        else:
            moved = (loc.ip, loc.host) != (st.ip, st.host)
            st.ip, st.host = loc.ip, loc.host
            why = await probe(spec.health, loc.ip, spec.target_port(b), timeout, spec.auth)
            st.checks += 1
            st.failed += why is not None
            st.last = why or "ok"
            changed = st.hyst.feed(why is None) or (moved and bool(st.hyst.up))
        if changed:
            st.since = time.time()
            log.info("%s: backend %s is %s (%s)", spec.name, b.domain,
                     "up" if st.hyst.up else "down", st.last)
        return changed

    def _programmed(self, rt: Runtime) -> Programmed:
        spec = rt.spec
        targets = tuple(Target(st.ip, spec.target_port(b), b.weight)
                        for b in spec.backends
                        if (st := rt.states[b.domain]).hyst.up and st.ip and not b.drained)
        return Programmed(spec.name, spec.vip, spec.port, spec.scheduler, targets)

    async def _program(self, rt: Runtime, *, new: bool = False) -> None:
        p = self._programmed(rt)
        if p != rt.programmed or new:
            await asyncio.to_thread(self.director.program, p, new=new)
            old, rt.programmed = rt.programmed, p
            if old is not None:
                await self._forget_failed(rt, old, p)

    async def _forget_failed(self, rt: Runtime, old: Programmed, new: Programmed) -> None:
        """Drop the conntrack entries of targets that left rotation because they failed
        (not drained): a client's retried SYN is then balanced again, not sent to them."""
        spec = rt.spec
        down = {(st.ip, spec.target_port(b)) for b in spec.backends
                if not b.drained and not (st := rt.states[b.domain]).hyst.up and st.ip}
        left = {(t.ip, t.port) for t in old.targets} - {(t.ip, t.port) for t in new.targets}
        if left & down:
            try:
                n = await asyncio.to_thread(conntrack.forget, spec.vip, spec.port, left & down)
            except OSError as exc:
                log.warning("%s: cannot clear conntrack entries: %s", spec.name, exc)
                return
            if n:
                log.info("%s: %d connection(s) to failed backends forgotten", spec.name, n)

    # ----- the API's verbs ----------------------------------------------------------------------

    def get(self, name: str) -> Runtime:
        rt = self.services.get(name)
        if rt is None:
            raise NotFound(f"virtual service {name!r} does not exist")
        return rt

    async def create(self, spec: ServiceSpec) -> dict[str, Any]:
        """Check, program and announce a new service; on failure nothing of it remains."""
        async with self._lock:
            await self._validate_new(spec)
            rt = self._runtime(spec)
            await self._round(rt, program=False)
            self.services[spec.name] = rt
            try:
                await asyncio.to_thread(prepare_host)
                await self._program(rt, new=True)
                await self.peers.publish(spec.name, spec)
                if self.peers.owner(spec.vip):
                    await self._claim(spec.vip)
            except BaseException:
                del self.services[spec.name]
                with contextlib.suppress(GridvmError):
                    await self._remove(rt)
                raise
            self._save()
            rt.task = asyncio.create_task(self._run(rt), name=f"lb-{spec.name}")
            log.info("%s: created %s %s over %s", spec.name, spec.address, spec.scheduler,
                     ", ".join(b.domain for b in spec.backends))
        return await self.view(spec.name)

    async def _validate_new(self, spec: ServiceSpec) -> None:
        if spec.name in self.services:
            raise Conflict(f"virtual service {spec.name!r} already exists")
        for rt in self.services.values():
            if (rt.spec.vip, rt.spec.port) == (spec.vip, spec.port):
                raise Conflict(f"VIP {spec.address} is already used by service {rt.spec.name}")
        for rec in self.store.all():
            nets = self.manager.net if isinstance(self.manager.net, NetworkManager) else None
            if domain_address(rec, nets) == spec.vip:
                raise Conflict(f"VIP {spec.vip} is the address of domain {rec.name}")
        for b in spec.backends:
            loc = await self.resolver.locate(b.domain)
            if loc is None:
                raise NotFound(f"backend domain {b.domain!r} does not exist")
            if loc.ip == spec.vip:
                raise Conflict(f"VIP {spec.vip} is the address of backend {b.domain}")

    async def _remove(self, rt: Runtime) -> None:
        """Take the service's rules, map elements and (if unshared) VIP away."""
        remaining = [r.programmed or self._programmed(r) for r in self.services.values()]
        await asyncio.to_thread(self.director.remove, self._programmed(rt),
                                remaining=remaining)
        if all(r.spec.vip != rt.spec.vip for r in self.services.values()):
            await self._release(rt.spec.vip)

    async def delete(self, name: str) -> None:
        async with self._lock:
            rt = self.get(name)
            await self.peers.publish(name, None)      # first: else the cluster brings it back
            await self._drop(rt)
            log.info("%s: deleted", name)

    async def _drop(self, rt: Runtime) -> None:
        if rt.task:
            rt.task.cancel()
            await asyncio.gather(rt.task, return_exceptions=True)
        del self.services[rt.spec.name]
        self.shared.discard(rt.spec.name)
        try:
            await self._remove(rt)
        finally:
            self._save()

    async def set_weight(self, name: str, domain: str, weight: int) -> dict[str, Any]:
        async with self._lock:
            rt = self.get(name)
            b = rt.spec.backend(domain)
            check_weight(weight)
            if rt.spec.scheduler == "rr" and weight > 1:
                raise ConfigError(f"service {name} is rr: weights are 0 (no new connections) "
                                  "or 1; use a wrr, sh or random service for weights")
            old, b.weight = b.weight, weight
            try:
                await self._program(rt)
                await self.peers.publish(name, rt.spec)
            except BaseException:
                b.weight = old
                raise
            self._save()
        return await self.view(name)

    async def drain(self, name: str, domain: str, *, undo: bool = False) -> dict[str, Any]:
        """Send no new connections to `domain` (open ones finish); `undo` takes it back."""
        async with self._lock:
            rt = self.get(name)
            b = rt.spec.backend(domain)
            old, b.drained = b.drained, not undo
            try:
                await self._program(rt)
                await self.peers.publish(name, rt.spec)
            except BaseException:
                b.drained = old
                raise
            self._save()
            log.info("%s: backend %s %s", name, domain, "back in rotation" if undo else
                     "draining")
        return await self.view(name)

    async def route_only(self, name: str, domain: str | None) -> None:
        """New connections go to `domain` alone (None: to no backend): every other backend is
        drained. That backend is checked at once, so a server that just took a role (a
        promoted database primary) is in rotation now rather than after an interval; the
        spec is shared with the cluster. For a service another layer steers (the database
        service's writer VIP)."""
        async with self._lock:
            rt = self.get(name)
            if domain is not None:
                rt.spec.backend(domain)
            old = {b.domain: b.drained for b in rt.spec.backends}
            for b in rt.spec.backends:
                b.drained = b.domain != domain
            try:
                if domain is not None:
                    await self._round(rt, program=False, only=domain)
                await self._program(rt)
                await self.peers.publish(name, rt.spec)
            except BaseException:
                for b in rt.spec.backends:
                    b.drained = old[b.domain]
                raise
            self._save()
            log.info("%s: new connections to %s only", name, domain or "no backend")

    # ----- views --------------------------------------------------------------------------------

    async def view(self, name: str) -> dict[str, Any]:
        rt = self.get(name)
        spec = rt.spec
        conns = await asyncio.to_thread(conntrack.counts, spec.vip, spec.port)
        backends = []
        for b in spec.backends:
            st = rt.states[b.domain]
            port = spec.target_port(b)
            active, inactive = conns.get((st.ip or "", port), (0, 0))
            if b.drained:
                state = "draining" if active else "drained"
            else:
                state = {True: "up", False: "down", None: "unknown"}[st.hyst.up]
            backends.append({
                "domain": b.domain, "ip": st.ip, "port": port, "host": st.host,
                "weight": b.weight, "state": state, "drained": b.drained,
                "in_rotation": any(t.ip == st.ip and t.port == port
                                   for t in (rt.programmed.targets if rt.programmed else ())),
                "last_check": st.last, "checks": st.checks, "failed": st.failed,
                "since": round(st.since, 3), "active": active, "inactive": inactive,
            })
        return {"name": spec.name, "vip": spec.vip, "port": spec.port,
                "address": spec.address, "scheduler": spec.scheduler, "check": spec.check,
                "interval": spec.interval, "rise": spec.rise, "fall": spec.fall,
                "vip_interface": self.vips.get(spec.vip), "table": self.director.table,
                "vip_owner": await asyncio.to_thread(self.peers.owner_name, spec.vip),
                "backends": backends}

    async def views(self) -> list[dict[str, Any]]:
        return [await self.view(n) for n in sorted(self.services)]
