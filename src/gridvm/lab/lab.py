"""A lab: several gridvm hosts on one machine, as network namespaces on one LAN.

    <lab>-lan      bridge `lan`; one veth per host (and one for the client)
    <lab>-hN       host N: `eth0` on the LAN, enslaved to its bridge network `xenbr0`
                   (which carries the host's LAN address), and its own gridvmd and home
    <lab>-client   a plain namespace on the LAN, for users, tests and benchmarks

The lab's description (namespaces, addresses, homes, daemon pids) is kept in
/run/gridvm/labs/<lab>.json, written before anything is made, so `lab down` also removes a
lab whose `lab up` failed half-way; `gridvm --host hN` finds a host's daemon there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gridvm.api.client import Client, q
from gridvm.api.hostpeer import API_PORT
from gridvm.cluster.settings import Files
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound
from gridvm.host import netdevs, netns, procs
from gridvm.host.networks import RUN_ROOT, host_tag
from gridvm.host.resources import remove_home_groups
from gridvm.lab import machine, pki
from gridvm.lab.agent import Agent
from gridvm.paths import Home

LABS_DIR = RUN_ROOT / "labs"
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,11}")
DEFAULT_SUBNET = "10.77.0.0/24"
LAN_BRIDGE = "lan"
HOST_IFACE = "eth0"
HOST_NETWORK = "xenbr0"
MAX_HOSTS = 50
WEB_PORT = 8006                # gridvmd --web's default port (Proxmox's)


class LabHost(BaseModel):
    name: str              # h1, h2, …
    ns: str
    address: str           # LAN address with prefix, e.g. 10.77.0.11/24
    network: str = HOST_NETWORK
    home: str
    pid: int | None = None


class LabClient(BaseModel):
    ns: str
    address: str


class LabState(BaseModel):
    name: str
    subnet: str
    lan_ns: str
    root: str               # the directory holding the hosts' homes
    images: str
    accel: str
    client: LabClient
    hosts: list[LabHost]
    ready: bool = False
    etcd: LabClient | None = None   # with --cluster: etcd's namespace and LAN address
    ttl: int = 5                    # the hosts' lease TTL in a cluster
    margin: float = 1.0             # how long HA waits after a lease expired
    web: bool = False               # hosts serve the web console on their LAN address

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise NotFound(f"lab {self.name} has no host {name!r} "
                       f"(hosts: {', '.join(h.name for h in self.hosts)})")

    def namespaces(self) -> list[str]:
        return [self.lan_ns, self.client.ns, *(h.ns for h in self.hosts),
                *([self.etcd.ns] if self.etcd else [])]


def state_path(name: str) -> Path:
    return LABS_DIR / f"{name}.json"


def save(state: LabState) -> None:
    LABS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = state_path(state.name).with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2) + "\n")
    tmp.replace(state_path(state.name))


def load(name: str) -> LabState:
    try:
        return LabState.model_validate_json(state_path(name).read_text())
    except FileNotFoundError:
        raise NotFound(f"no lab named {name!r} is up") from None


def all_labs() -> list[LabState]:
    if not LABS_DIR.is_dir():
        return []
    return [load(p.stem) for p in sorted(LABS_DIR.glob("*.json"))]


def pick(name: str | None) -> LabState:
    """The lab called `name`, or the only lab that is up."""
    if name:
        return load(name)
    labs = all_labs()
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise NotFound("no lab is up (gridvm lab up --hosts 2)")
    raise Conflict(f"several labs are up ({', '.join(s.name for s in labs)}); "
                   "say which with --name")


def find_host(ref: str) -> tuple[LabState, LabHost]:
    """A lab host by `HOST` (unique among running labs) or `LAB/HOST`."""
    lab_name, _, host_name = ref.rpartition("/")
    labs = [load(lab_name)] if lab_name else all_labs()
    found = [(lab, h) for lab in labs for h in lab.hosts if h.name == host_name]
    if not found:
        where = f"lab {lab_name}" if lab_name else "any running lab"
        raise NotFound(f"host {host_name!r} is not in {where} (gridvm lab status)")
    if len(found) > 1:
        raise Conflict(f"host {host_name} is in several labs; say which: "
                       f"{', '.join(f'{lab.name}/{host_name}' for lab, _ in found)}")
    return found[0]


def plan(name: str, hosts: int, *, root: Path, images: Path, accel: str,
         subnet: str = DEFAULT_SUBNET, cluster: bool = False, ttl: int = 5,
         margin: float = 1.0,
         web: bool = False) -> LabState:
    """What `up` will make; validates the request."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid lab name {name!r}: a lowercase letter then up to 11 "
                          "lowercase letters or digits")
    if not 1 <= hosts <= MAX_HOSTS:
        raise ConfigError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts}")
    try:
        net = ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        raise ConfigError(f"invalid LAN subnet {subnet!r}: {exc}") from None
    if net.num_addresses < 256:
        raise ConfigError(f"the LAN subnet {subnet} is too small (use a /24 or larger)")

    def addr(n: int) -> str:
        return f"{net.network_address + n}/{net.prefixlen}"

    return LabState(
        name=name, subnet=str(net), lan_ns=f"{name}-lan", root=str(root.absolute()),
        images=str(images.absolute()), accel=accel,
        client=LabClient(ns=f"{name}-client", address=addr(2)),
        hosts=[LabHost(name=f"h{i}", ns=f"{name}-h{i}", address=addr(10 + i),
                       home=str(root.absolute() / f"h{i}")) for i in range(1, hosts + 1)],
        etcd=LabClient(ns=f"{name}-etcd", address=addr(3)) if cluster else None, ttl=ttl,
        margin=margin,
        web=web,
    )


# ----- up -----------------------------------------------------------------------------------


def up(state: LabState) -> LabState:
    """Make the lab; if any step fails, everything made so far is removed."""
    if state_path(state.name).exists():
        raise Conflict(f"lab {state.name} is already up (gridvm lab down --name {state.name})")
    taken = [ns for ns in state.namespaces() if netns.exists(ns)]
    if taken:
        raise Conflict(f"network namespace {taken[0]} already exists")
    if Path(state.root).exists():
        raise Conflict(f"lab directory {state.root} already exists")
    save(state)
    try:
        _make_lan(state)
        Path(state.root).mkdir(parents=True, exist_ok=True)
        shared_dir(state).mkdir(exist_ok=True)
        pki.make_ca(Path(state.root), state.name)         # the lab holds the cluster CA
        with ThreadPoolExecutor(max_workers=len(state.hosts)) as pool:
            pids = list(pool.map(lambda h: _start_host(state, h, network=True), state.hosts))
        for h, pid in zip(state.hosts, pids, strict=True):
            h.pid = pid
        if state.etcd:
            from gridvm.lab.cluster import start_cluster

            start_cluster(state)
        state.ready = True
        save(state)
    except BaseException:
        with contextlib.suppress(GridvmError):
            down(state.name)
        raise
    return state


def _make_lan(state: LabState) -> None:
    for ns in state.namespaces():
        netns.create(ns)
    members = [(h.name, h.ns, h.address) for h in state.hosts]
    members.append(("client", state.client.ns, state.client.address))
    if state.etcd:
        members.append(("etcd", state.etcd.ns, state.etcd.address))

    def lan() -> None:
        netdevs.set_up("lo")
        netdevs.create_bridge(LAN_BRIDGE)
        for port, ns, _ in members:
            netdevs.veth(port, HOST_IFACE, ns)
            netdevs.set_master(port, LAN_BRIDGE)

    netns.call_in(state.lan_ns, lan)
    for _, ns, address in members:
        netns.call_in(ns, _host_side(address))


def _host_side(address: str) -> Callable[[], None]:
    def setup() -> None:
        netdevs.set_up("lo")
        netdevs.add_address(HOST_IFACE, ipaddress.IPv4Interface(address))
        netdevs.set_up(HOST_IFACE)
    return setup


def shared_dir(state: LabState) -> Path:
    """The lab's shared storage (its NFS): the one directory every host sees."""
    return Path(state.root) / "shared"


def _machine(state: LabState, host: LabHost) -> list[str]:
    """The host's mount namespace (made if missing): the argv prefix that enters it."""
    machine.create(host.ns, own=[Path(host.home)],
                   shared=[shared_dir(state), Path(state.images)], hide=Path(state.root))
    return machine.enter(host.ns)


def _agent(state: LabState, host: LabHost) -> Agent:
    args = _listen(state, host)            # the home and its certificate, before the machine
    return Agent(Path(host.home), ns=host.ns, accel=state.accel, images=Path(state.images),
                 args=args, wrap=_machine(state, host))


def _listen(state: LabState, host: LabHost) -> list[str]:
    """gridvmd options for a lab host: its API on its LAN address (mutual TLS, with the
    certificate the lab gives it), the LAN as allowlist."""
    home = Home(Path(host.home))
    home.ensure()
    address = host.address.split("/")[0]
    pki.provision(pki.load_ca(Path(state.root)), Files(home).identity, host.name, address)
    web = ["--web", f"{address}:{WEB_PORT}"] if state.web else []
    return ["--listen", f"{address}:{API_PORT}", "--relocation-hosts-allow", state.subnet,
            *web]


def _start_host(state: LabState, host: LabHost, *, network: bool) -> int:
    """Start the host's gridvmd (and on first start create its bridge network)."""
    agent = _agent(state, host)
    agent.start(timeout=30)
    assert agent.proc is not None
    if network:
        with _client(state, host) as c:
            c.post("/networks", {"name": host.network, "mode": "bridge",
                                 "uplink": HOST_IFACE})
    return agent.proc.pid


def client(state: LabState, host: LabHost, timeout: float = 120) -> Client:
    """The administrator's client for a lab host: HTTPS to its LAN address, from the lab's
    client namespace, with the lab's certificate."""
    return pki.client(Path(state.root), host.address.split("/")[0], state.client.ns, timeout)


@contextlib.contextmanager
def _client(state: LabState, host: LabHost, timeout: float = 60) -> Any:
    c = client(state, host, timeout)
    try:
        yield c
    finally:
        c.close()


# ----- down ---------------------------------------------------------------------------------


def down(name: str) -> None:
    """Remove the lab: guests, networks, daemons, every process in its namespaces, the
    namespaces themselves, the hosts' homes and the state file."""
    state = load(name)
    if state.hosts:
        with ThreadPoolExecutor(max_workers=len(state.hosts)) as pool:
            list(pool.map(lambda h: _stop_host(state, h), state.hosts))
    for ns in state.namespaces():
        _kill_namespace(ns)
        netns.remove(ns)
    for h in state.hosts:
        machine.remove(h.ns)
    for h in state.hosts:
        for kind in ("net", "lb"):      # dnsmasq's and conntrackd's files
            shutil.rmtree(RUN_ROOT / kind / host_tag(Home(Path(h.home))), ignore_errors=True)
        remove_home_groups(Home(Path(h.home)))
    shutil.rmtree(state.root, ignore_errors=True)
    state_path(name).unlink(missing_ok=True)


def _stop_host(state: LabState, host: LabHost) -> None:
    """Destroy the host's guests and delete its networks through its daemon, then stop it."""
    if host.pid is not None and _daemon_alive(host):
        with contextlib.suppress(GridvmError), _client(state, host, timeout=30) as c:
            for view in c.get("/domains"):
                with contextlib.suppress(GridvmError):
                    if view["domid"] is not None:
                        c.post(f"/domains/{q(view['uuid'])}/destroy")
                    c.delete(f"/domains/{q(view['uuid'])}")
            for net in c.get("/networks"):
                with contextlib.suppress(GridvmError):
                    c.delete(f"/networks/{q(net['name'])}")
    _stop_daemon(host, kill=False)


def _daemon_alive(host: LabHost) -> bool:
    return host.pid is not None and procs.pid_alive(host.pid) and any(
        a in ("gridvm.gridvmd", "gridvm.api.daemon") for a in procs.cmdline(host.pid))


def _stop_daemon(host: LabHost, *, kill: bool) -> None:
    if host.pid is None or not _daemon_alive(host):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(host.pid, signal.SIGKILL if kill else signal.SIGTERM)
    asyncio.run(procs.kill_and_wait(host.pid, timeout=10))


def _ns_inode(ns: str) -> int | None:
    try:
        return (netns.NETNS_DIR / ns).stat().st_ino
    except OSError:
        return None


def namespace_pids(ns: str) -> list[int]:
    """Processes whose network namespace is `ns`."""
    ino = _ns_inode(ns)
    if ino is None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "ns" / "net").stat().st_ino == ino and \
                        procs.pid_alive(int(entry.name)):
                    pids.append(int(entry.name))
    return pids


def _kill_namespace(ns: str) -> None:
    deadline = time.monotonic() + 10
    while (pids := namespace_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if namespace_pids(ns):
        raise GridvmError(f"processes in namespace {ns} did not exit: {namespace_pids(ns)}")


# ----- status, exec, restart ----------------------------------------------------------------


def status(state: LabState) -> dict[str, Any]:
    return {
        "name": state.name, "subnet": state.subnet, "lan_namespace": state.lan_ns,
        "ready": state.ready, "accel": state.accel,
        "client": {"namespace": state.client.ns, "address": state.client.address},
        "hosts": [{"name": h.name, "namespace": h.ns, "address": h.address,
                   "network": h.network, "home": h.home, "pid": h.pid,
                   "daemon": "running" if _daemon_alive(h) else "stopped"}
                  for h in state.hosts],
    }


def exec_argv(state: LabState, target: str, cmd: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run `cmd` inside a host's (or the client's) namespace."""
    env = {k: v for k, v in os.environ.items() if k != "GRIDVM_HOST"}
    if target == "client":
        ns = state.client.ns
    else:
        host = state.host(target)
        env["GRIDVM_HOME"] = host.home
        env["GRIDVM_IMAGES"] = state.images
        if not cmd:
            cmd = [os.environ.get("SHELL", "/bin/sh")]
        return [*machine.enter(host.ns), *netns.exec_prefix(host.ns), *cmd], env
    if not cmd:
        cmd = [os.environ.get("SHELL", "/bin/sh")]
    return [*netns.exec_prefix(ns), *cmd], env


def restart_daemon(state: LabState, host_name: str, *, kill: bool = False) -> LabHost:
    """Stop a host's gridvmd (SIGKILL with kill=True: a crash) and start it again."""
    host = state.host(host_name)
    _stop_daemon(host, kill=kill)
    host.pid = _start_host(state, host, network=False)
    save(state)
    return host
