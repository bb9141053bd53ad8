"""Test helpers for the web console: tokens, a headless Chromium (Debian's, driven by
Playwright) running in a lab's client namespace, and raw HTTP/websocket calls on a host's
Unix socket (where the console is served too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import websockets
from netlab import LabEnv
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "web"


def token(lab: LabEnv, role: str, ttl: str = "1h", host: str = "h1") -> str:
    out = json.loads(lab.gridvm("web", "token", "create", "--role", role, "--ttl", ttl,
                                "--comment", f"test {role}", "--json", host=host).stdout)
    return str(out["token"])


def url(lab: LabEnv, host: str = "h1") -> str:
    return f"https://{lab.addr(host)}:8006/ui/"


@contextlib.contextmanager
def browser_in(ns: str, tmp: Path) -> Iterator[Browser]:
    """Chromium inside network namespace `ns` (Playwright talks to it over pipes)."""
    wrapper = tmp / f"chromium-{ns}"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(wrapper), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def login(b: Browser, address: str, secret: str) -> Page:
    """A new page (own cookies) logged in with `secret`."""
    ctx = b.new_context(ignore_https_errors=True, viewport={"width": 1300, "height": 900})
    page = ctx.new_page()
    page.goto(address)
    page.fill("#login-token", secret)
    page.click("#login-form button")
    page.wait_for_selector("#app:not([hidden])")
    return page


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def page_fetch(page: Page, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """fetch() from inside the page (its cookie, its origin): {status, body}."""
    result: dict[str, Any] = page.evaluate(
        """async ([method, path, body]) => {
             const opts = {method, headers: {"content-type": "application/json"}};
             if (body !== null) opts.body = JSON.stringify(body);
             const r = await fetch(path, opts);
             return {status: r.status, body: await r.json().catch(() => null)};
           }""", [method, path, body])
    return result


def unix_http(lab: LabEnv, host: str = "h1") -> httpx.Client:
    sock = Path(lab.state.host(host).home) / "gridvmd.sock"
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://gridvmd",
                        timeout=30)


def ws_status(lab: LabEnv, path: str, headers: dict[str, str], host: str = "h1") -> int:
    """Open a websocket on the host's Unix socket: 101 if accepted, else the HTTP status."""
    sock = str(Path(lab.state.host(host).home) / "gridvmd.sock")

    async def attempt() -> int:
        try:
            async with websockets.unix_connect(sock, f"ws://gridvmd{path}",
                                               additional_headers=headers, open_timeout=10):
                return 101
        except websockets.exceptions.InvalidStatus as exc:
            return int(exc.response.status_code)

    with ThreadPoolExecutor(1) as pool:      # Playwright's sync API holds this thread's loop
        return pool.submit(asyncio.run, attempt()).result()


def bearer(secret: str, origin: str | None = "http://gridvmd") -> dict[str, str]:
    headers = {"Authorization": f"Bearer {secret}"}
    if origin:
        headers["Origin"] = origin
    return headers


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
