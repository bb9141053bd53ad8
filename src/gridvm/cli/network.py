"""`gridvm network …`: bridged and NAT networks and their port forwards."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gridvm.api.client import q
from gridvm.errors import ConfigError

network_app = typer.Typer(no_args_is_help=True, help="Bridged and NAT networks.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _call(method: str, path: str, body: Any = None) -> Any:
    from gridvm.cli.main import client  # main imports this module: resolve at call time

    c = client()
    try:
        return c.request(method, path, json=body)
    finally:
        c.close()


def _emit(data: Any) -> None:
    from gridvm.cli.main import emit_json

    emit_json(data)


def _print(text: str) -> None:
    from gridvm.cli.main import out

    out.print(text, highlight=False, markup=False, soft_wrap=True)


def parse_host_port(text: str) -> tuple[int, str]:
    """`8080` or `8080/udp` → (8080, "udp")."""
    port, _, proto = text.partition("/")
    proto = proto or "tcp"
    if (not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535
            or proto not in ("tcp", "udp")):
        raise ConfigError(f"bad host port {text!r}: use PORT or PORT/tcp or PORT/udp")
    return int(port), proto


def parse_target(text: str) -> tuple[str, int]:
    """`DOM:PORT` → (DOM, PORT)."""
    dom, sep, port = text.rpartition(":")
    if not sep or not dom or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"bad forward target {text!r}: use DOMAIN:PORT, e.g. web1:80")
    return dom, int(port)


@network_app.command("create")
def create(
    name: str,
    mode: Annotated[str, typer.Option("--mode", help="bridge or nat")] = "bridge",
    uplink: Annotated[str | None, typer.Option(
        "--uplink", help="bridge mode: host interface to enslave (moves its addresses)")] = None,
    subnet: Annotated[str | None, typer.Option(
        "--subnet", help="nat mode: private subnet, e.g. 10.88.1.0/24")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a network (its bridge is called NAME; vifs join it with bridge=NAME)."""
    if mode not in ("bridge", "nat"):
        raise ConfigError(f"unknown network mode {mode!r} (use bridge or nat)")
    view = _call("POST", "/networks", {"name": name, "mode": mode, "uplink": uplink,
                                       "subnet": subnet})
    if as_json:
        _emit(view)
    elif mode == "nat":
        _print(f"Created NAT network {name} ({view['subnet']}, gateway {view['gateway']})")
    else:
        _print(f"Created bridge network {name}" + (f" on {uplink}" if uplink else ""))


@network_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List networks."""
    views = _call("GET", "/networks")
    if as_json:
        _emit(views)
        return
    _print(f"{'Name':<16}{'Mode':<8}{'Subnet/uplink':<20}{'Domains':>8}{'Forwards':>10}")
    for v in views:
        where = v["subnet"] if v["mode"] == "nat" else (v["uplink"] or "-")
        _print(f"{v['name']:<16}{v['mode']:<8}{where:<20}{len(v['domains']):>8}"
               f"{len(v.get('forwards', [])):>10}")


@network_app.command("show")
def show(name: str, as_json: JsonOpt = False) -> None:
    """Show a network: addresses, DHCP hosts and leases, forwards, attached domains."""
    v = _call("GET", f"/networks/{q(name)}")
    if as_json:
        _emit(v)
        return
    _print(f"name     : {v['name']}\nmode     : {v['mode']}\nbridge   : {v['bridge']}")
    if v["mode"] == "bridge":
        _print(f"uplink   : {v['uplink'] or '-'}")
        if v["addresses"]:
            _print(f"addresses: {', '.join(v['addresses'])}")
    else:
        _print(f"subnet   : {v['subnet']} (gateway {v['gateway']}, dynamic {v['dhcp_range']})")
        _print(f"dnsmasq  : {v['dnsmasq_pid'] or 'not running'}")
        for h in v["hosts"]:
            _print(f"host     : {h['domain']} {h['mac']} {h['ip']}")
        for f in v["forwards"]:
            _print(f"forward  : {f['host_port']}/{f['proto']} -> {f['domain']}:{f['port']}")
    _print(f"domains  : {', '.join(v['domains']) or '-'}")


@network_app.command("delete")
def delete(name: str) -> None:
    """Delete a network (refused while running domains are attached)."""
    _call("DELETE", f"/networks/{q(name)}")
    _print(f"Deleted network {name}")


@network_app.command("forward")
def forward(
    name: str,
    host_port: Annotated[str, typer.Argument(metavar="HOSTPORT", help="PORT[/tcp|/udp]")],
    target: Annotated[str, typer.Argument(metavar="DOM:PORT")],
) -> None:
    """Forward a host port to a domain on a NAT network."""
    port, proto = parse_host_port(host_port)
    dom, dport = parse_target(target)
    _call("POST", f"/networks/{q(name)}/forwards",
          {"proto": proto, "host_port": port, "domain": dom, "port": dport})
    _print(f"Forwarding {port}/{proto} to {dom}:{dport} on network {name}")


@network_app.command("unforward")
def unforward(
    name: str,
    host_port: Annotated[str, typer.Argument(metavar="HOSTPORT", help="PORT[/tcp|/udp]")],
) -> None:
    """Remove a port forward."""
    port, proto = parse_host_port(host_port)
    _call("DELETE", f"/networks/{q(name)}/forwards/{q(proto)}/{q(port)}")
    _print(f"Removed forward {port}/{proto} from network {name}")
