"""The web console in a real headless browser (Debian's Chromium driven by Playwright), against
a two-host lab cluster whose gridvmds serve it over HTTPS (`lab up --web`), with real guests.

An admin logs in, sees both hosts and the domains of both, starts a domain and sees it
running without a reload, types and pastes into its serial console and reads the guest's
answers, migrates it and watches the progress and the host change. A read-only token sees
the same but every action, from the page or forged, gets 403 and changes nothing. Bad input:
expired, revoked and forged tokens, forged websockets (no token, bad token, wrong or no
Origin), actions from another origin, an action on a domain that vanished meanwhile.
Screenshots of the main views go to artifacts/web/.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netlab import LabEnv, lab_env, wait_for
from playwright.sync_api import Browser, Page
from webtools import (
    bearer,
    browser_in,
    login,
    page_fetch,
    shot,
    token,
    unix_http,
    url,
    ws_status,
)

from gridvm.images.store import ImageInfo

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def lab(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    with lab_env(tiny_image, tmp_path_factory.mktemp("weblab"), 2,
                 "--cluster", "--ttl", "3", "--web") as env:
        yield env


@pytest.fixture(scope="module")
def browser(lab: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with browser_in(lab.ns("client"), tmp_path_factory.mktemp("chromium")) as b:
        yield b


@pytest.fixture(scope="module")
def tokens(lab: LabEnv) -> dict[str, str]:
    return {"admin": token(lab, "admin"), "readonly": token(lab, "readonly")}


def views(lab: LabEnv) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads(lab.gridvm("list", "--json", host="h1").stdout)}


def tasks(lab: LabEnv) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(lab.gridvm("task", "list", "--json", host="h1").stdout)
    return rows


def define(lab: LabEnv, name: str, n: int) -> Path:
    cfg = lab.write_cfg(name, "bridge=xenbr0", f'ip = "{lab.guest_ip(n)}"\n'
                        'netmask = "255.255.255.0"\n')
    lab.gridvm("new", str(cfg), host="h1")
    return cfg


def console_has(page: Page, line: str, timeout: float = 20_000) -> None:
    page.wait_for_function(
        r"""(want) => { const t = window.gridvmConsole; if (!t) return false; t.selectAll();
             return t.getSelection().split("\n").some((l) => l.trim() === want); }""",
        arg=line, timeout=timeout)


def test_admin_starts_uses_console_and_migrates(lab: LabEnv, browser: Browser,
                                                tokens: dict[str, str]) -> None:
    define(lab, "wa", 1)                                   # defined, not running
    wb = lab.write_cfg("wb", "bridge=xenbr0", f'ip = "{lab.guest_ip(2)}"\n'
                       'netmask = "255.255.255.0"\n')
    lab.gridvm("create", str(wb), "--host", "h2", host="h1")
    page = login(browser, url(lab), tokens["admin"])
    page.evaluate("window.__sameDocument = true")          # gone if the page reloads

    # overview: both hosts, their state and the HA manager
    for h in ("h1", "h2"):
        page.wait_for_selector(f".card[data-host={h}] .badge.up")
    page.wait_for_selector(".card .badge:text('HA manager')")
    shot(page, "overview")

    # domains of both hosts
    page.click("nav a[data-view=domains]")
    page.wait_for_selector("tr[data-domain=wb] td.host:text('h2')")
    page.wait_for_selector("tr[data-domain=wa] .badge.shutoff")
    shot(page, "domains")

    # start wa and see it running, no reload
    page.click("tr[data-domain=wa]")
    page.click("#detail-actions button[data-action=start]")
    page.wait_for_selector("#detail-state .badge.running", timeout=30_000)
    assert views(lab)["wa"]["state"] == "running"
    home = views(lab)["wa"]["host"]
    other = "h2" if home == "h1" else "h1"
    page.wait_for_selector(f"#detail-host:text('{home}')")

    # serial console: type, paste, read the guest's answers
    assert lab.wait_http(lab.guest_ip(1)) == "wa"
    page.click("#detail-actions button[data-action=console]")
    page.wait_for_selector("#console[data-connections='1']")
    page.keyboard.type("echo typed-$((40+2))\n")
    console_has(page, "typed-42")
    page.evaluate("""() => { const dt = new DataTransfer();
        dt.setData("text/plain", "echo pasted-$((6*7))\\n");
        document.querySelector("#console .xterm-helper-textarea")
          .dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true})); }""")
    console_has(page, "pasted-42")
    copied = page.evaluate("""() => { const t = window.gridvmConsole; t.selectAll();
        const dt = new DataTransfer();
        document.querySelector("#console .xterm-helper-textarea")
          .dispatchEvent(new ClipboardEvent("copy", {clipboardData: dt, bubbles: true}));
        return dt.getData("text/plain"); }""")
    assert "pasted-42" in copied
    shot(page, "console")

    # migrate, slowly enough to watch the progress, and see the host change
    page.click("#detail-actions button[data-action=migrate]")
    page.select_option("#migrate-host", other)
    page.fill("#migrate-bandwidth", "12")
    page.click("#dialog button[value=ok]")
    page.wait_for_selector("#migrate-progress", timeout=10_000)
    page.wait_for_function("document.querySelector('#migrate-progress')?.value > 0",
                           timeout=30_000)
    shot(page, "migrating")
    page.wait_for_selector(f"#detail-host:text('{other}')", timeout=90_000)
    page.wait_for_selector("#migrate-progress", state="detached")
    assert views(lab)["wa"]["host"] == other and views(lab)["wa"]["state"] == "running"
    assert lab.wait_http(lab.guest_ip(1), timeout=30) == "wa"
    page.wait_for_selector("#console[data-connections='2']")  # it reconnected to `other`
    page.click("#console .xterm-screen")                   # focus the terminal again
    page.keyboard.type("echo moved-$((40+2))\n")
    console_has(page, "moved-42")
    assert page.evaluate("window.__sameDocument") is True

    # the tasks, in the page and from the CLI
    page.click("nav a[data-view=tasks]")
    page.wait_for_selector("#tasks tr:has-text('domain.migrate') .badge.ok")
    shot(page, "tasks")
    mig = next(t for t in tasks(lab) if t["action"] == "domain.migrate")
    assert mig["state"] == "ok" and mig["target"] == "wa" and "(admin)" in mig["user"]
    out = lab.gridvm("task", "show", mig["id"], host="h1").stdout
    assert f"Migrated wa to {other}" in out and "status: ok" in out
    assert [t["action"] for t in tasks(lab)[:2]] == ["domain.migrate", "domain.start"]


def test_service_drain_and_weight(lab: LabEnv, browser: Browser,
                                  tokens: dict[str, str]) -> None:
    vip = lab.guest_ip(120)
    lab.gridvm("service", "create", "websvc", "--vip", f"{vip}:80", "--backends", "wb",
               "--scheduler", "wrr", "--interval", "0.5", host="h1")
    page = login(browser, url(lab), tokens["admin"])
    page.click("nav a[data-view=services]")
    row = "[data-service=websvc] tr[data-backend=wb]"
    page.wait_for_selector(f"{row} .badge.up", timeout=30_000)
    page.click(f"{row} button[data-act=drain]")
    page.wait_for_selector(f"{row} .badge.drained", timeout=15_000)
    page.click(f"{row} button[data-act=weight]")
    page.fill("#weight", "3")
    page.click("#dialog button[value=ok]")
    page.wait_for_selector(f"{row} td.weight:text('3')", timeout=15_000)
    shot(page, "services")
    backend = json.loads(lab.gridvm("service", "show", "websvc", "--json", host="h1").stdout
                         )["backends"][0]
    assert backend["drained"] and backend["weight"] == 3
    done = [t for t in tasks(lab) if t["target"] == "websvc"]
    assert [t["action"] for t in done] == ["service.weight", "service.drain"] and all(
        t["state"] == "ok" for t in done)
    for view in ("networks", "images"):
        page.click(f"nav a[data-view={view}]")
        page.wait_for_selector("#view table.grid tbody tr")
        shot(page, view)
    lab.gridvm("service", "delete", "websvc", host="h1")


def test_readonly_sees_everything_and_can_do_nothing(lab: LabEnv, browser: Browser,
                                                     tokens: dict[str, str]) -> None:
    page = login(browser, url(lab), tokens["readonly"])
    page.click("nav a[data-view=domains]")
    page.wait_for_selector("tr[data-domain=wb] .badge.running")
    assert page.is_disabled("#create")
    page.click("tr[data-domain=wb]")
    page.wait_for_selector("#detail-state .badge.running")
    for action in ("start", "shutdown", "reboot", "pause", "destroy", "migrate", "console"):
        assert page.is_disabled(f"#detail-actions button[data-action={action}]"), action
    shot(page, "readonly")
    before = (views(lab), len(tasks(lab)))
    pid = lab.pids("h2", "process=gridvm:wb")
    for action, params in (("domain.destroy", {}), ("domain.pause", {}),
                           ("domain.shutdown", {}), ("domain.migrate", {"host": "h1"}),
                           ("host.maintenance", {"on": True}), ("host.evacuate", {})):
        target = "h2" if action.startswith("host.") else "wb"
        got = page_fetch(page, "POST", "api/tasks",
                         {"action": action, "target": target, "params": params})
        assert got["status"] == 403 and "read-only" in got["body"]["error"], (action, got)
    assert page.evaluate("""() => new Promise((done) => {
        const ws = new WebSocket(`wss://${location.host}/ui/ws/console/wb`);
        ws.onopen = () => done("open"); ws.onclose = () => done("closed"); })""") == "closed"
    assert ws_status(lab, "/ui/ws/console/wb", bearer(tokens["readonly"])) == 403
    time.sleep(1)
    after = (views(lab), len(tasks(lab)))
    assert before[0]["wb"]["state"] == after[0]["wb"]["state"] == "running"
    assert before[1] == after[1] and lab.pids("h2", "process=gridvm:wb") == pid


def test_bad_tokens_forged_websockets_and_vanished_domains(lab: LabEnv, browser: Browser,
                                                           tokens: dict[str, str]) -> None:
    admin = tokens["admin"]
    expired = token(lab, "admin", ttl="1s")
    revoked = token(lab, "admin")
    lab.gridvm("web", "token", "revoke", revoked.split("_")[1], host="h1")
    time.sleep(1.2)
    with unix_http(lab) as c:
        assert c.get("/ui/api/whoami").status_code == 401
        r = c.get("/ui/api/whoami", headers=bearer(expired))
        assert r.status_code == 401 and "expired" in r.json()["error"]
        r = c.get("/ui/api/whoami", headers=bearer(revoked))
        assert r.status_code == 401 and "unknown or revoked" in r.json()["error"]
        assert c.get("/ui/api/whoami", headers=bearer("gvt_00000000_" + "x" * 43)
                     ).status_code == 401
        assert c.post("/ui/api/tasks", json={"action": "domain.destroy", "target": "wb"}
                      ).status_code == 401
        r = c.post("/ui/api/tasks", headers=bearer(admin, "https://evil.example"),
                   json={"action": "domain.destroy", "target": "wb"})
        assert r.status_code == 403 and "another origin" in r.json()["error"]
        # only the console is served over TCP: the API stays on the Unix socket
        assert c.get("/v1/tokens").status_code == 200
    page = login(browser, url(lab), admin)
    assert page_fetch(page, "GET", "/v1/domains")["status"] == 404

    # forged websockets: no token, bad token, expired token, wrong Origin, no Origin
    path = "/ui/ws/console/wb"
    assert ws_status(lab, path, {"Origin": "http://gridvmd"}) == 401
    assert ws_status(lab, path, bearer("gvt_deadbeef_" + "y" * 43)) == 401
    assert ws_status(lab, path, bearer(expired)) == 401
    assert ws_status(lab, path, bearer(admin, "https://evil.example")) == 403
    assert ws_status(lab, path, bearer(admin, None)) == 403
    assert ws_status(lab, path, bearer(admin)) == 101              # the real thing works

    # the login page says why an expired token is refused
    ctx = browser.new_context(ignore_https_errors=True)
    p2 = ctx.new_page()
    p2.goto(url(lab))
    p2.fill("#login-token", expired)
    p2.click("#login-form button")
    p2.wait_for_selector("#login-error:has-text('expired')")

    # a domain that vanishes while the page shows it
    define(lab, "gone1", 9)
    page.goto(url(lab) + "#/domain/gone1")
    page.wait_for_selector("#detail-state .badge.shutoff")
    lab.gridvm("delete", "gone1", host="h1")
    page.wait_for_selector("#detail-state .badge.gone")
    assert page.is_disabled("#detail-actions button[data-action=start]")
    count = len(tasks(lab))
    got = page_fetch(page, "POST", "api/tasks", {"action": "domain.start", "target": "gone1"})
    assert got["status"] == 404 and got["body"]["error"] == "domain 'gone1' does not exist"
    got = page_fetch(page, "POST", "api/tasks", {"action": "domain.start", "target": "wb"})
    assert got["status"] == 409 and "already running" in got["body"]["error"]
    got = page_fetch(page, "POST", "api/tasks", {"action": "domain.frobnicate", "target": "wb"})
    assert got["status"] == 422 and "unknown action" in got["body"]["error"]
    bad = {"config": "name = 'x'\nmemory = 'lots'\n"}
    got = page_fetch(page, "POST", "api/tasks",
                     {"action": "domain.create", "target": "new", "params": bad})
    assert got["status"] == 422 and "<config>:2" in got["body"]["error"], got
    assert len(tasks(lab)) == count and "gone1" not in views(lab) and "x" not in views(lab)
    assert views(lab)["wb"]["state"] == "running"

    # tokens are stored hashed
    home = Path(lab.state.host("h1").home)
    db = b"".join(p.read_bytes() for p in home.glob("tokens.db*"))    # with the WAL
    tid, secret = admin[4:12], admin[13:]
    assert secret.encode() not in db and tid.encode() in db
    listing = lab.gridvm("web", "token", "list", host="h1").stdout
    assert "(expired)" in listing and admin not in listing
    wait_for("wb still answers", lambda: lab.http(lab.guest_ip(2)) == "wb", 30)


def test_tasks_and_tokens_survive_a_gridvmd_restart(lab: LabEnv, tokens: dict[str, str]) -> None:
    before = tasks(lab)
    assert before and all(t["state"] != "running" for t in before)
    lab.gridvm("lab", "restart", "h1", "--name", lab.name)
    assert [t["id"] for t in tasks(lab)] == [t["id"] for t in before]
    with unix_http(lab) as c:
        r = c.get("/ui/api/whoami", headers=bearer(tokens["admin"]))
        assert r.status_code == 200 and r.json()["role"] == "admin"
