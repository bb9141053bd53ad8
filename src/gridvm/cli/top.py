"""`gridvm top`: per-domain usage like xentop (live table, `-b` batch text, `--json`)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gridvm.errors import ConfigError

# (header, width, value of a /v1/stats domain row); xentop's columns and units
# (MEM in KiB, NET in KiB, VBD_RD/VBD_WR = requests, VBD_RSECT/VBD_WSECT = 512-byte sectors).
Column = tuple[str, int, Callable[[dict[str, Any]], str]]
COLUMNS: list[Column] = [
    ("NAME", 16, lambda d: d["name"]),
    ("STATE", 6, lambda d: _flags(d["state"])),
    ("CPU(sec)", 10, lambda d: f"{d['cpu_seconds']:.0f}"),
    ("CPU(%)", 6, lambda d: f"{d['cpu_percent']:.1f}"),
    ("MEM(k)", 10, lambda d: str(d["memory"] * 1024)),
    ("MAXMEM(k)", 10, lambda d: str(d["maxmem"] * 1024)),
    ("VCPUS", 5, lambda d: str(d["vcpus"])),
    ("NETS", 4, lambda d: str(d["nets"])),
    ("NETTX(k)", 10, lambda d: str(d["net_tx"] // 1024)),
    ("NETRX(k)", 10, lambda d: str(d["net_rx"] // 1024)),
    ("VBDS", 4, lambda d: str(d["vbds"])),
    ("VBD_RD", 8, lambda d: str(d["block_read_ops"])),
    ("VBD_WR", 8, lambda d: str(d["block_write_ops"])),
    ("VBD_RSECT", 10, lambda d: str(d["block_read"] // 512)),
    ("VBD_WSECT", 10, lambda d: str(d["block_write"] // 512)),
]


def _flags(state: str) -> str:
    from gridvm.cli.main import FLAGS

    return FLAGS.get(state, state)


def batch_lines(doc: dict[str, Any]) -> list[str]:
    """One iteration as plain text, like `xentop -b`: a header line, then one line a domain."""
    def row(cells: list[str]) -> str:
        first = f"{cells[0]:>{COLUMNS[0][1]}}"
        return " ".join([first] + [f"{c:>{w}}" for c, (_, w, _f) in
                                   zip(cells[1:], COLUMNS[1:], strict=True)])

    lines = [row([name for name, _, _ in COLUMNS])]
    lines += [row([fn(d) for _, _, fn in COLUMNS]) for d in doc["domains"]]
    return lines


def summary(doc: dict[str, Any]) -> str:
    """xentop's header: time, domain count, host memory and CPUs."""
    h = doc["host"]
    states: dict[str, int] = {}
    for d in doc["domains"]:
        states[d["state"]] = states.get(d["state"], 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    return (f"gridvm top - {time.strftime('%H:%M:%S')}\n"
            f"{h['running']} domain{'' if h['running'] == 1 else 's'}"
            f"{': ' + counts if counts else ''}\n"
            f"Mem: {h['total_memory'] * 1024}k total, "
            f"{(h['total_memory'] - h['free_memory']) * 1024}k used, "
            f"{h['free_memory'] * 1024}k free    CPUs: {h['nr_cpus']}, "
            f"domains using {h['cpu_percent']:.1f}%")


def table(doc: dict[str, Any]) -> Group:
    """One iteration as a Rich renderable for the live view."""
    t = Table(box=None, pad_edge=False, header_style="reverse")
    for i, (name, _, _) in enumerate(COLUMNS):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for d in doc["domains"]:
        t.add_row(*(fn(d) for _, _, fn in COLUMNS))
    return Group(Text(summary(doc)), Text(""), t)


def _documents(iterations: int | None, delay: float) -> Iterator[dict[str, Any]]:
    from gridvm.cli.main import client

    c = client(timeout=30)
    n = 0
    try:
        while True:
            yield c.get("/stats")
            n += 1
            if iterations is not None and n >= iterations:
                return
            time.sleep(delay)
    finally:
        c.close()


def top(
    batch: Annotated[bool, typer.Option("-b", "--batch", help="plain text, no screen")] = False,
    iterations: Annotated[int | None, typer.Option(
        "-i", "--iterations", help="stop after N updates (default: forever; 1 with --json)")]
    = None,
    delay: Annotated[float, typer.Option("-d", "--delay", help="seconds between updates")] = 3.0,
    as_json: Annotated[bool, typer.Option(
        "--json", help="one JSON document per update, one per line")] = False,
) -> None:
    """Per-domain CPU, memory, network and disk usage, refreshing (like xentop)."""
    if delay <= 0:
        raise ConfigError(f"invalid delay {delay}: must be more than 0 seconds")
    if iterations is not None and iterations < 1:
        raise ConfigError(f"invalid iterations {iterations}: must be at least 1")
    if as_json and iterations is None:
        iterations = 1
    out = Console()
    try:
        if as_json:
            for doc in _documents(iterations, delay):
                sys.stdout.write(json.dumps(doc) + "\n")
                sys.stdout.flush()
        elif batch or not out.is_terminal:
            for doc in _documents(iterations, delay):
                sys.stdout.write("\n".join(batch_lines(doc)) + "\n")
                sys.stdout.flush()
        else:
            with Live(console=out, auto_refresh=False, screen=True) as live:
                for doc in _documents(iterations, delay):
                    live.update(table(doc), refresh=True)
    except KeyboardInterrupt:
        return
    except BrokenPipeError:     # `gridvm top -b | head`
        sys.stderr.close()
