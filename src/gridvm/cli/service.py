"""`gridvm service …`: LVS-style virtual services over domains."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydantic import ValidationError

from gridvm.api.client import q
from gridvm.cli.network import _call, _emit, _print
from gridvm.errors import ConfigError
from gridvm.lb.model import (
    SCHEDULERS,
    ServiceSpec,
    parse_backends,
    parse_check,
    parse_vip,
    parse_weight,
    validation_message,
)

service_app = typer.Typer(no_args_is_help=True,
                          help="Virtual services: a VIP:PORT load-balanced over domains.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def build_spec(name: str, vip: str, backends: str, scheduler: str, weights: list[str],
               check: str, interval: float, rise: int, fall: int,
               auth: str | None = None) -> ServiceSpec:
    """The CLI's strings → a validated ServiceSpec (one-line ConfigError otherwise)."""
    addr, port = parse_vip(vip)
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r} (use {', '.join(SCHEDULERS)})")
    parse_check(check)
    items = parse_backends(backends)
    w = dict(parse_weight(x) for x in weights)
    unknown = set(w) - {d for d, _ in items}
    if unknown:
        raise ConfigError(f"--weight names {sorted(unknown)[0]}, which is not in --backends")
    try:
        return ServiceSpec.model_validate({
            "name": name, "vip": addr, "port": port, "scheduler": scheduler, "check": check,
            "interval": interval, "rise": rise, "fall": fall, "auth": auth,
            "backends": [{"domain": d, "port": p, "weight": w.get(d, 1)} for d, p in items]})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None


@service_app.command("create")
def create(
    name: str,
    vip: Annotated[str, typer.Option("--vip", help="IP:PORT clients connect to")],
    backends: Annotated[str, typer.Option("--backends", help="DOM[:PORT][,DOM[:PORT]…]")],
    scheduler: Annotated[str, typer.Option("--scheduler", help="rr, wrr, sh or random")] = "rr",
    weight: Annotated[list[str] | None, typer.Option("--weight", help="DOM=W (repeatable)")]
    = None,
    check: Annotated[str, typer.Option("--check", help="tcp, http:/PATH, mysql:primary or "
                                       "mysql:replica[:MAX_LAG]")] = "tcp",
    check_auth: Annotated[str | None, typer.Option(
        "--check-auth", help="USER:PASSWORD a mysql check logs in with")] = None,
    interval: Annotated[float, typer.Option("--interval", help="seconds between checks")] = 2.0,
    rise: Annotated[int, typer.Option("--rise", help="passes to come back")] = 2,
    fall: Annotated[int, typer.Option("--fall", help="failures to leave rotation")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Create a virtual service (its VIP is added to this host and announced)."""
    spec = build_spec(name, vip, backends, scheduler, weight or [], check, interval, rise, fall,
                      check_auth)
    view = _call("POST", "/services", spec.model_dump(mode="json"))
    if as_json:
        _emit(view)
        return
    up = sum(b["state"] == "up" for b in view["backends"])
    _print(f"Created service {name} on {view['address']} ({view['scheduler']}, "
           f"{up}/{len(view['backends'])} backends up)")


@service_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List virtual services."""
    views = _call("GET", "/services")
    if as_json:
        _emit(views)
        return
    _print(f"{'Name':<16}{'VIP':<22}{'Sched':<7}{'Up':>5}  Check")
    for v in views:
        up = f"{sum(b['in_rotation'] for b in v['backends'])}/{len(v['backends'])}"
        _print(f"{v['name']:<16}{v['address']:<22}{v['scheduler']:<7}{up:>5}  "
               f"{v['check']} every {v['interval']:g}s "
               f"rise {v['rise']} fall {v['fall']}")


def _print_service(v: dict[str, Any]) -> None:
    where = (f"held here on {v['vip_interface']}" if v["vip_interface"] else
             f"held by {v['vip_owner']}" if v.get("vip_owner") else "an address of this host")
    _print(f"{v['name']}: TCP {v['address']} {v['scheduler']}, check {v['check']} every "
           f"{v['interval']:g}s (rise {v['rise']}, fall {v['fall']}), VIP {where}")
    _print(f"  {'Backend':<14}{'Address':<22}{'Weight':>6}  {'State':<9}{'ActConn':>8}"
           f"{'InActConn':>10}  Last check")
    for b in v["backends"]:
        addr = f"{b['ip'] or '?'}:{b['port']}"
        _print(f"  {b['domain']:<14}{addr:<22}{b['weight']:>6}  {b['state']:<9}"
               f"{b['active']:>8}{b['inactive']:>10}  {b['last_check']} "
               f"({b['checks'] - b['failed']}/{b['checks']} passed)")


@service_app.command("show")
def show(name: str, as_json: JsonOpt = False) -> None:
    """A service's backends: state, weight, checks and connection counts."""
    v = _call("GET", f"/services/{q(name)}")
    if as_json:
        _emit(v)
    else:
        _print_service(v)


@service_app.command("delete")
def delete(name: str) -> None:
    """Delete a virtual service (its rules, map and VIP go with it)."""
    _call("DELETE", f"/services/{q(name)}")
    _print(f"Deleted service {name}")


@service_app.command("set-weight")
def set_weight(name: str, domain: str, weight: int) -> None:
    """Change a backend's weight (0: no new connections)."""
    _call("POST", f"/services/{q(name)}/weight", {"domain": domain, "weight": weight})
    _print(f"{name}: {domain} weight {weight}")


@service_app.command("drain")
def drain(
    name: str,
    domain: str,
    undo: Annotated[bool, typer.Option("--undo", help="take it back into rotation")] = False,
) -> None:
    """No new connections to a backend; open ones finish (conntrack keeps them)."""
    _call("POST", f"/services/{q(name)}/drain", {"domain": domain, "undo": undo})
    _print(f"{name}: {domain} " + ("back in rotation" if undo else "draining"))
