"""Talk to a gridvmd over its Unix socket; API errors come back as gridvm errors."""

from __future__ import annotations

import urllib.parse
from typing import Any

import httpx

from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound, QemuError, ResourceError
from gridvm.paths import Home

ERRORS: dict[str, type[GridvmError]] = {
    "NotFound": NotFound, "Conflict": Conflict, "ConfigError": ConfigError,
    "ResourceError": ResourceError, "QemuError": QemuError,
}


class DaemonNotRunning(GridvmError):
    """No gridvmd answers on the home's socket."""


def q(ref: object) -> str:
    """One path segment naming an object (domain, network, host…), URL-quoted. A reference
    can never reach another resource: '/', '.', '..' and empty names are refused."""
    text = str(ref)
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise ConfigError(f"invalid name {text!r}")
    return urllib.parse.quote(text, safe="")


class Client:
    def __init__(self, home: Home, timeout: float = 120,
                 headers: dict[str, str] | None = None) -> None:
        self.home = home
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(home.api_socket)),
                                  base_url="http://gridvmd", timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {"json": json, "params": params}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if any(part in (".", "..") for part in path.split("?")[0].split("/")):
            raise ConfigError(f"invalid request path {path!r}")
        try:
            resp = self._http.request(method, f"/v1{path}", **kwargs)
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise DaemonNotRunning(
                f"gridvmd is not running (no answer on {self.home.api_socket}); "
                f"start it with: gridvmd --home {self.home.root}"
            ) from exc
        except httpx.TimeoutException as exc:
            raise GridvmError(f"gridvmd did not answer {method} {path} in time") from exc
        except PermissionError as exc:
            raise GridvmError(f"permission denied on {self.home.api_socket}: using gridvm "
                              "takes root or membership of the 'gridvm' group") from exc
        except (httpx.TransportError, OSError) as exc:
            raise DaemonNotRunning(f"gridvmd went away during {method} {path} "
                                   f"({type(exc).__name__}); see gridvm log") from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                raise GridvmError(f"gridvmd: HTTP {resp.status_code}: {resp.text[:200]}") from None
            if "error" in body:
                raise ERRORS.get(body.get("type", ""), GridvmError)(body["error"])
            raise GridvmError(_validation_message(body))
        return resp.json()

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json if json is not None else {}, **kw)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _validation_message(body: Any) -> str:
    """FastAPI's 422 detail list → one line."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail:
        first = detail[0]
        loc = ".".join(str(p) for p in first.get("loc", [])[1:])
        return f"invalid request: {loc}: {first.get('msg')}"
    return f"invalid request: {body}"
