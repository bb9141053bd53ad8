"""`gridvm web token …`: tokens for the web console (admin or readonly, with a ttl)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

web_app = typer.Typer(no_args_is_help=True, help="The web console served by gridvmd.")
token_app = typer.Typer(no_args_is_help=True, help="Login tokens for the web console.")
web_app.add_typer(token_app, name="token")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "never"


@token_app.command("create")
def create(
    role: Annotated[str, typer.Option("--role", help="admin or readonly")],
    ttl: Annotated[str, typer.Option(
        "--ttl", help="lifetime: 90s, 30m, 8h, 30d, 2w; 0 = never expires")] = "30d",
    comment: Annotated[str, typer.Option("--comment", help="who or what it is for")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Make a token; it is printed once (only its hash is kept)."""
    from gridvm.api.tokens import ROLES, parse_ttl
    from gridvm.cli.main import client, emit_json, out
    from gridvm.errors import ConfigError

    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r} (use admin or readonly)")
    parse_ttl(ttl)
    t = client().post("/tokens", {"role": role, "ttl": ttl, "comment": comment})
    if as_json:
        emit_json(t)
        return
    out.print(t["token"], highlight=False, markup=False, soft_wrap=True)
    typer.echo(f"token {t['id']}: {t['role']}, expires {_when(t['expires'])} "
               "(shown once; log in with it at https://HOST:8006/ui/)", err=True)


@token_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Tokens (without their secrets)."""
    from gridvm.cli.main import client, emit_json, out

    rows = client().get("/tokens")
    if as_json:
        emit_json(rows)
        return
    out.print(f"{'ID':<10}{'Role':<10}{'Created':<18}{'Expires':<18}Comment", highlight=False)
    for t in rows:
        expires = _when(t["expires"]) + (" (expired)" if t["expired"] else "")
        out.print(f"{t['id']:<10}{t['role']:<10}{_when(t['created']):<18}{expires:<18}"
                  f"{t['comment']}", highlight=False, markup=False)


@token_app.command("revoke")
def revoke(token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke a token at once (open pages get 401 on their next request)."""
    from gridvm.cli.main import client, out

    client().delete(f"/tokens/{token_id}")
    out.print(f"revoked token {token_id}", highlight=False)
