"""Talk to a gridvmd: over its Unix socket (this host), or over HTTPS with a client
certificate of its cluster (another machine, a lab host from the lab's client namespace).
API errors come back as gridvm errors."""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from websockets.sync.client import ClientConnection, unix_connect
from websockets.sync.client import connect as ws_connect

from gridvm.errors import ConfigError, GridvmError, error_kind
from gridvm.host import netns
from gridvm.paths import Home

T = TypeVar("T")


class DaemonNotRunning(GridvmError):
    """No gridvmd answers on the home's socket (or at the address)."""


HOST_HEADER = "x-gridvm-host"   # in a cluster: serve this request on that host's gridvmd


def q(ref: object) -> str:
    """One path segment naming an object (domain, network, host…), URL-quoted. A reference
    can never reach another resource: '/', '.', '..' and empty names are refused."""
    text = str(ref)
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise ConfigError(f"invalid name {text!r}")
    return urllib.parse.quote(text, safe="")


class Client:
    """A gridvmd's API. `Client(home)` uses the home's Unix socket; `Client.remote(url,
    tls)` reaches one over HTTPS, optionally from inside network namespace `ns`."""

    def __init__(self, home: Home, timeout: float = 120,
                 headers: dict[str, str] | None = None) -> None:
        self.home = home
        self.where = str(home.api_socket)
        self.ns: str | None = None
        self.tls: ssl.SSLContext | None = None
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(home.api_socket)),
                                  base_url="http://gridvmd", timeout=timeout, headers=headers)

    @classmethod
    def remote(cls, url: str, tls: ssl.SSLContext, *, ns: str | None = None,
               timeout: float = 120, headers: dict[str, str] | None = None) -> Client:
        c = cls.__new__(cls)
        c.home = Home.resolve()
        c.where = url
        c.ns = ns
        c.tls = tls
        c._http = httpx.Client(base_url=url, verify=tls, timeout=timeout, headers=headers)
        return c

    def close(self) -> None:
        self._http.close()

    def websocket(self, path: str) -> ClientConnection:
        """A websocket to `path` (e.g. a console stream), over the same socket or URL."""
        if self.tls is None:
            return unix_connect(self.where, f"ws://gridvmd{path}", open_timeout=10,
                                max_size=2**20)
        uri = "wss://" + self.where.removeprefix("https://") + path
        tls = self.tls
        return self._run(lambda: ws_connect(uri, ssl=tls, open_timeout=10, max_size=2**20))

    def _run(self, fn: Callable[[], T]) -> T:
        return netns.call_in(self.ns, fn) if self.ns else fn()

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        if any(part in (".", "..") for part in path.split("?")[0].split("/")):
            raise ConfigError(f"invalid request path {path!r}")
        kwargs: dict[str, Any] = {"json": json, "params": params}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            resp = self._run(lambda: self._http.request(method, f"/v1{path}", **kwargs))
        except (httpx.ConnectError, FileNotFoundError) as exc:
            if isinstance(exc.__cause__ or exc.__context__, ssl.SSLError) or \
                    "SSL" in str(exc):
                raise GridvmError(f"{self.where} refused our certificate: {exc}") from exc
            raise DaemonNotRunning(
                f"gridvmd is not running (no answer on {self.where})"
                + (f"; start it with: gridvmd --home {self.home.root}" if not self.ns
                   and self.where.endswith(".sock") else "")
            ) from exc
        except httpx.TimeoutException as exc:
            raise GridvmError(f"gridvmd did not answer {method} {path} in time") from exc
        except PermissionError as exc:
            raise GridvmError(f"permission denied on {self.where}: using gridvm "
                              "takes root or membership of the 'gridvm' group") from exc
        except (httpx.TransportError, OSError) as exc:
            raise DaemonNotRunning(f"gridvmd went away during {method} {path} "
                                   f"({type(exc).__name__}); see gridvm log") from exc
        return _answer(resp)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json if json is not None else {}, **kw)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


class AppClient:
    """The gridvmd API called in-process (no socket): what the daemon's own parts (tasks,
    the web console) use, so every request passes the same routes and cluster routing as
    the CLI's. `host` serves the request on that cluster host's gridvmd."""

    def __init__(self, app: Any, timeout: float = 900) -> None:
        self._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                       base_url="http://gridvmd", timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None, host: str | None = None) -> Any:
        headers = {HOST_HEADER: host} if host else None
        resp = await self._http.request(method, f"/v1{path}", json=json, params=params,
                                        headers=headers)
        return _answer(resp)

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return await self.request("POST", path, json=json if json is not None else {}, **kw)


def _answer(resp: httpx.Response) -> Any:
    """A response's JSON, or its error raised as the gridvm error it stands for."""
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            raise GridvmError(f"gridvmd: HTTP {resp.status_code}: {resp.text[:200]}") from None
        if isinstance(body, dict) and "error" in body:
            raise error_kind(str(body.get("type", "")))(body["error"])
        raise GridvmError(_validation_message(body))
    return resp.json()


def _validation_message(body: Any) -> str:
    """FastAPI's 422 detail list → one line."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail:
        first = detail[0]
        loc = ".".join(str(p) for p in first.get("loc", [])[1:])
        return f"invalid request: {loc}: {first.get('msg')}"
    return f"invalid request: {body}"
