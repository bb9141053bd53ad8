"""A small etcd v3 client over its JSON gateway (plain httpx; keys and values are text).

Only what gridvm needs: kv get/put/delete/range, compare-and-swap transactions, leases and
the election API. Every call has a timeout; a failure to reach etcd raises `EtcdUnavailable`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import httpx

from gridvm.errors import GridvmError

DEFAULT_TIMEOUT = 2.0


class EtcdError(GridvmError):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached (network, timeout, not an etcd)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str) -> str:
    return base64.b64decode(data).decode()


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with `prefix`."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return raw.decode()


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    mod_revision: int
    create_revision: int
    lease: int

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class Compare:
    """One txn condition: target is VALUE, MOD or CREATE (revisions)."""

    key: str
    target: str
    value: str | int

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": _b64(self.key), "target": self.target,
                               "result": "EQUAL"}
        if self.target == "VALUE":
            out["value"] = _b64(str(self.value))
        elif self.target == "MOD":
            out["mod_revision"] = str(self.value)
        else:
            out["create_revision"] = str(self.value)
        return out


def put_op(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


class Etcd:
    """A thread-safe client for one etcd endpoint (e.g. http://10.77.0.3:2379)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def call(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        """POST `body` to /v3/`path`; the first JSON object of the answer."""
        try:
            resp = self._http.post(f"/v3/{path}", json=body,
                                   timeout=timeout if timeout is not None else self.timeout)
        except httpx.HTTPError as exc:
            raise EtcdUnavailable(f"cannot reach etcd at {self.url}: "
                                  f"{type(exc).__name__} {exc}".strip()) from exc
        text = resp.text.strip().splitlines()[0] if resp.text.strip() else "{}"
        try:
            data = json.loads(text)
        except ValueError:
            raise EtcdUnavailable(f"{self.url} is not an etcd v3 gateway "
                                  f"(HTTP {resp.status_code})") from None
        if not isinstance(data, dict):
            raise EtcdUnavailable(f"{self.url} is not an etcd v3 gateway")
        if "error" in data and "result" not in data:
            raise EtcdError(f"etcd {path}: {data.get('message') or data['error']}")
        return data.get("result", data)

    # ----- kv -------------------------------------------------------------------------------

    def put(self, key: str, value: str, *, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        self.call("kv/put", body)

    def put_json(self, key: str, value: Any, *, lease: int = 0) -> None:
        self.put(key, json.dumps(value, sort_keys=True), lease=lease)

    def get(self, key: str) -> KeyValue | None:
        kvs = self._range({"key": _b64(key)})
        return kvs[0] if kvs else None

    def get_json(self, key: str) -> Any:
        kv = self.get(key)
        return kv.json() if kv else None

    def range(self, prefix: str) -> list[KeyValue]:
        """Every key under `prefix`, sorted by key."""
        return self._range({"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})

    def _range(self, body: dict[str, Any]) -> list[KeyValue]:
        data = self.call("kv/range", body)
        return [KeyValue(key=_unb64(kv["key"]), value=_unb64(kv.get("value", "")),
                         mod_revision=int(kv.get("mod_revision", 0)),
                         create_revision=int(kv.get("create_revision", 0)),
                         lease=int(kv.get("lease", 0)))
                for kv in data.get("kvs", [])]

    def delete(self, key: str) -> None:
        self.call("kv/deleterange", {"key": _b64(key)})

    def txn(self, compare: list[Compare], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> bool:
        """Apply `success` if every comparison holds (else `failure`); True if it held."""
        data = self.call("kv/txn", {"compare": [c.body() for c in compare],
                                    "success": success, "failure": failure or []})
        return bool(data.get("succeeded", False))

    def create(self, key: str, value: str, *, lease: int = 0) -> bool:
        """Put `key` only if it does not exist."""
        return self.txn([Compare(key, "CREATE", 0)], [put_op(key, value, lease)])

    # ----- leases ---------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        """Renew a lease; its new TTL, or 0 if it has expired."""
        data = self.call("lease/keepalive", {"ID": str(lease)}, timeout=timeout)
        return int(data.get("TTL", 0))

    def revoke(self, lease: int) -> None:
        try:
            self.call("lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    # ----- election -------------------------------------------------------------------------

    def campaign(self, name: str, lease: int, value: str, *, timeout: float) -> str:
        """Block until elected leader of `name` (or raise on timeout); the leader key.

        Campaigning again with the same lease reuses the same candidacy."""
        data = self.call("election/campaign", {"name": _b64(name), "lease": str(lease),
                                                "value": _b64(value)}, timeout=timeout)
        return _unb64(data["leader"]["key"])

    def leader(self, name: str) -> KeyValue | None:
        """The current leader's key and value, or None."""
        try:
            data = self.call("election/leader", {"name": _b64(name)})
        except EtcdError as exc:
            if "no leader" in str(exc):
                return None
            raise
        kv = data["kv"]
        return KeyValue(key=_unb64(kv["key"]), value=_unb64(kv.get("value", "")),
                        mod_revision=int(kv.get("mod_revision", 0)),
                        create_revision=int(kv.get("create_revision", 0)),
                        lease=int(kv.get("lease", 0)))

    def resign(self, name: str, key: str, lease: int, rev: int) -> None:
        self.call("election/resign", {"leader": {"name": _b64(name), "key": _b64(key),
                                                 "lease": str(lease), "rev": str(rev)}})
