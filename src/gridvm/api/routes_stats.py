"""Monitoring API: latest usage per domain, per-domain history, Prometheus `/metrics`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from gridvm.host.manager import HostManager
from gridvm.host.stats import Sample

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MIB = 1024 * 1024

# (metric, type, help, value of a sample)
DOMAIN_METRICS: list[tuple[str, str, str, Callable[[Sample], float]]] = [
    ("gridvm_domain_cpu_seconds_total", "counter",
     "CPU time used by the domain's QEMU (all threads), in seconds.",
     lambda s: s.cpu_seconds),
    ("gridvm_domain_memory_bytes", "gauge",
     "Current memory of the domain (balloon size), in bytes.", lambda s: s.memory * MIB),
    ("gridvm_domain_memory_max_bytes", "gauge",
     "Maximum memory of the domain (maxmem), in bytes.", lambda s: s.maxmem * MIB),
    ("gridvm_domain_vcpus", "gauge", "Virtual CPUs of the domain.", lambda s: s.vcpus),
    ("gridvm_domain_net_rx_bytes_total", "counter",
     "Bytes received by the domain on all its vifs.", lambda s: s.net_rx),
    ("gridvm_domain_net_tx_bytes_total", "counter",
     "Bytes sent by the domain on all its vifs.", lambda s: s.net_tx),
    ("gridvm_domain_block_read_bytes_total", "counter",
     "Bytes read from all the domain's disks.", lambda s: s.block_read),
    ("gridvm_domain_block_write_bytes_total", "counter",
     "Bytes written to all the domain's disks.", lambda s: s.block_write),
    ("gridvm_domain_block_read_ops_total", "counter",
     "Read requests on all the domain's disks.", lambda s: s.block_read_ops),
    ("gridvm_domain_block_write_ops_total", "counter",
     "Write requests on all the domain's disks.", lambda s: s.block_write_ops),
]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: object) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render_prometheus(samples: list[Sample], totals: dict[str, Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of the latest samples and host totals."""
    lines: list[str] = []

    def family(name: str, kind: str, text: str) -> None:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")

    family("gridvm_domain_info", "gauge", "Running domain (always 1), with its state.")
    for s in samples:
        labels = _labels(name=s.name, domid=s.domid, uuid=s.uuid, state=s.state)
        lines.append(f"gridvm_domain_info{labels} 1")
    for name, kind, text, value in DOMAIN_METRICS:
        family(name, kind, text)
        for s in samples:
            lines.append(f"{name}{_labels(name=s.name, domid=s.domid, uuid=s.uuid)} "
                         f"{_num(value(s))}")
    for name, text, key, scale in (
        ("gridvm_domains_running", "Domains running on this host.", "running", 1),
        ("gridvm_host_cpus", "CPUs of this host.", "nr_cpus", 1),
        ("gridvm_host_memory_bytes", "Memory of this host, in bytes.", "total_memory", MIB),
        ("gridvm_host_memory_available_bytes", "Memory available on this host, in bytes.",
         "free_memory", MIB),
    ):
        family(name, "gauge", text)
        lines.append(f"{name} {_num(totals[key] * scale)}")
    return "\n".join(lines) + "\n"


def stats_routes(m: HostManager) -> APIRouter:
    """`GET /v1/stats`, `GET /v1/stats/{dom}/history`, `GET /metrics`."""
    r = APIRouter()

    @r.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return {"interval": m.stats.interval, "host": m.stats.totals(),
                "domains": [s.to_json() for s in m.stats.latest()]}

    @r.get("/v1/stats/{ref}/history")
    async def history(ref: str, limit: int | None = Query(default=None, ge=1)
                      ) -> dict[str, Any]:
        rec = m.lookup(ref)
        return {"name": rec.name, "uuid": rec.uuid, "interval": m.stats.interval,
                "samples": [s.to_json() for s in m.stats.history(rec.uuid, limit)]}

    @r.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        text = render_prometheus(m.stats.latest(), m.stats.totals())
        return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)

    return r
