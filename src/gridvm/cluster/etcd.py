"""A small etcd v3 client over its JSON gateway (plain httpx; keys and values are text).

Only what gridvm needs: kv get/put/delete/range, compare-and-swap transactions, leases,
the election API and cluster membership. Every call has a timeout; a failure to reach etcd
raises `EtcdUnavailable`. The client takes several endpoints (`https://a:2379,https://b:2379`)
and moves to the next one when one cannot be reached; with a TLS context it verifies the
members against the cluster CA and presents the host's certificate (etcd's
`--client-cert-auth`).
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
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


def endpoints(urls: str) -> list[str]:
    """`URL[,URL…]` → the list of endpoint URLs."""
    return [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]


class Etcd:
    """A thread-safe client for an etcd cluster (e.g. https://10.77.0.3:2379[,…])."""

    def __init__(self, urls: str, *, timeout: float = DEFAULT_TIMEOUT,
                 tls: ssl.SSLContext | None = None) -> None:
        self.urls = endpoints(urls)
        if not self.urls:
            raise EtcdError("no etcd endpoint given")
        self.timeout = timeout
        self._current = 0
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=timeout, verify=tls if tls is not None else True)

    @property
    def url(self) -> str:
        """The endpoint in use."""
        return self.urls[self._current]

    def close(self) -> None:
        self._http.close()

    def call(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        """POST `body` to /v3/`path` (on the first member that can be reached); the first
        JSON object of the answer."""
        wait = timeout if timeout is not None else self.timeout
        start = self._current
        errors = []
        for step in range(len(self.urls)):
            index = (start + step) % len(self.urls)
            url = self.urls[index]
            try:
                resp = self._http.post(f"{url}/v3/{path}", json=body, timeout=wait)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                errors.append(f"{url}: {type(exc).__name__} {exc}".strip())
                continue                      # never sent: safe to try another member
            except httpx.HTTPError as exc:
                with self._lock:              # may have been applied: do not resend, but
                    self._current = (index + 1) % len(self.urls)   # prefer another next
                raise EtcdUnavailable(f"cannot reach etcd at {url}: "
                                      f"{type(exc).__name__} {exc}".strip()) from exc
            with self._lock:
                self._current = index
            return self._answer(path, resp)
        raise EtcdUnavailable("cannot reach etcd: " + "; ".join(errors))

    def _answer(self, path: str, resp: httpx.Response) -> Any:
        text = resp.text.strip().splitlines()[0] if resp.text.strip() else "{}"
        try:
            data = json.loads(text)
        except ValueError:
            raise EtcdUnavailable(f"{resp.url.host} is not an etcd v3 gateway "
                                  f"(HTTP {resp.status_code})") from None
        if not isinstance(data, dict):
            raise EtcdUnavailable(f"{resp.url.host} is not an etcd v3 gateway")
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

    # ----- membership -----------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """The cluster's members: id, name, peerURLs, clientURLs (empty until started)."""
        return list(self.call("cluster/member/list", {}).get("members", []))

    def member_add(self, peer_url: str) -> list[dict[str, Any]]:
        """Add a member (before starting it with --initial-cluster-state existing); the
        member list that includes it."""
        data = self.call("cluster/member/add", {"peerURLs": [peer_url]})
        return list(data.get("members", []))

    def member_remove(self, member_id: str) -> None:
        self.call("cluster/member/remove", {"ID": member_id})

    def resign(self, name: str, key: str, lease: int, rev: int) -> None:
        self.call("election/resign", {"leader": {"name": _b64(name), "key": _b64(key),
                                                 "lease": str(lease), "rev": str(rev)}})
