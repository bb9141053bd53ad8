"""Small HTTP GETs to guests, optionally from inside a network namespace."""

from __future__ import annotations

import http.client
import time

from gridvm.host import netns


def http_get(host: str, path: str = "/", *, port: int = 80, timeout: float = 2.0) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status} from {host}{path}: {body.strip()[:80]}")
        return body.strip()
    finally:
        conn.close()


def get(host: str, path: str = "/", *, ns: str | None = None, timeout: float = 2.0) -> str:
    if ns is None:
        return http_get(host, path, timeout=timeout)
    return netns.call_in(ns, lambda: http_get(host, path, timeout=timeout))


def wait_http(host: str, path: str = "/", *, ns: str | None = None,
              timeout: float = 60.0) -> str:
    """Poll until the guest answers; raise TimeoutError with the last error otherwise."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return get(host, path, ns=ns, timeout=1.0)
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"{host}{path} did not answer within {timeout:.0f}s ({last})")
