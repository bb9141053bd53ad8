"""Web console benchmark: first meaningful paint of the overview with 50 domains, and the
latency from a state change in gridvmd to the browser showing it.

    sudo .venv/bin/python bench/web.py [--domains 50] [--loads 10] [--changes 20]

Makes a one-host lab serving the console (`lab up --web`), defines --domains managed domains
(defined, not running) and boots one tiny guest, then drives Debian's Chromium (headless,
Playwright, in the lab's client namespace) at https://<host>:8006/ui/:

* first meaningful paint: a fresh browser context (empty cache, logged-in cookie) loads the
  overview; the time from navigation start to the first frame that shows every domain
  counted ("51 domain(s)"), and to the Domains view's table with all rows; median and max;
* state change → browser: the running guest is paused and resumed through the API (the Unix
  socket, as `gridvm pause` does); from the moment gridvmd has answered (the state changed)
  to the frame in which the page shows the new state; median, p95, max.

All traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

from gridvm.api.client import Client
from gridvm.config.xmfile import parse_config
from gridvm.images.tiny import build_tiny
from gridvm.lab import lab as labmod
from gridvm.paths import Home

IMAGES = Path(os.environ.get("GRIDVM_TEST_IMAGES", "/var/cache/gridvm/test-images"))
LAB = "webbench"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CFG = """name = "{name}"
memory = 96
kernel = "{kernel}"
ramdisk = "{ramdisk}"
vif = [ 'bridge=xenbr0' ]
ip = "10.77.0.{n}"
netmask = "255.255.255.0"
"""
# Installed before the page's own script: `window.__painted(test)` resolves with the time
# (ms since navigation start) of the first frame after `test()` became true.
PAINT_PROBE = """
window.__painted = (test) => new Promise((done) => {
  const check = () => {
    if (!test()) return false;
    requestAnimationFrame(() => done(performance.now()));
    return true;
  };
  if (check()) return;
  const obs = new MutationObserver(() => { if (check()) obs.disconnect(); });
  obs.observe(document, {subtree: true, childList: true, characterData: true});
});
"""


def gridvm(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRIDVM_HOST"}
    env.update(GRIDVM_HOME=str(home), GRIDVM_IMAGES=str(IMAGES))
    proc = subprocess.run([sys.executable, "-m", "gridvm", *args], env=env, text=True,
                          capture_output=True, timeout=180)
    if proc.returncode != 0:
        raise SystemExit(f"gridvm {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return (f"median {statistics.median(xs):7.1f} ms   p95 {p95:7.1f} ms   "
            f"max {xs[-1]:7.1f} ms   (n={len(xs)})")


def context(b: Browser, base: str, secret: str) -> Page:
    ctx = b.new_context(ignore_https_errors=True, viewport={"width": 1300, "height": 900})
    ctx.add_cookies([{"name": "gridvm_token", "value": secret, "url": base,
                      "httpOnly": True, "secure": True, "sameSite": "Strict"}])
    ctx.add_init_script(PAINT_PROBE)
    return ctx.new_page()


def first_paint(b: Browser, base: str, secret: str, count: int, view: str) -> float:
    page = context(b, base, secret)
    page.goto(f"{base}#/{view}", wait_until="commit")
    test = (f"() => (document.querySelector('#view p')?.textContent || '')"
            f".includes('{count} domain(s)')" if view == "overview" else
            f"() => document.querySelectorAll('#domains tbody tr').length === {count}")
    ms = float(page.evaluate(f"Promise.race([window.__painted({test}), new Promise((_, no) => "
                             "setTimeout(() => no(new Error('not painted within 30 s')), "
                             "30000))])"))
    page.context.close()
    return ms


def change_latency(page: Page, api: Client, name: str, rounds: int) -> list[float]:
    out = []
    for i in range(rounds):
        verb, state = ("pause", "paused") if i % 2 == 0 else ("unpause", "running")
        page.evaluate(f"() => {{ window.__seen = Promise.race([window.__painted(() => "
                      f"document.querySelector('tr[data-domain={name}] .badge.{state}'))"
                      ".then(() => Date.now()), new Promise((_, no) => setTimeout(() => no("
                      f"new Error('{state} not shown within 10 s')), 10000))]); }}")
        api.post(f"/domains/{name}/{verb}")
        changed = time.time() * 1000          # gridvmd has answered: the state is changed
        shown = float(page.evaluate("window.__seen"))
        out.append(shown - changed)
        time.sleep(0.3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", type=int, default=50)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--changes", type=int, default=20)
    args = ap.parse_args()
    img = build_tiny(IMAGES)
    with tempfile.TemporaryDirectory(prefix="gridvm-webbench-") as tmp:
        home = Path(tmp) / "home"
        gridvm(home, "lab", "up", "--hosts", "1", "--name", LAB, "--accel", "tcg", "--web")
        try:
            state = labmod.load(LAB)
            host = state.hosts[0]
            api = Client(Home(Path(host.home)), timeout=60)
            for n in range(args.domains):
                cfg = parse_config(CFG.format(name=f"d{n:02d}", kernel=img.kernel,
                                              ramdisk=img.ramdisk, n=100 + n)).config
                api.post("/domains", {"config": cfg.model_dump(mode="json"), "managed": True,
                                      "start": False})
            probe = parse_config(CFG.format(name="probe", kernel=img.kernel,
                                            ramdisk=img.ramdisk, n=99)).config
            api.post("/domains", {"config": probe.model_dump(mode="json")})
            secret = api.post("/tokens", {"role": "readonly", "ttl": "1h"})["token"]
            base = f"https://{host.address.split('/')[0]}:8006/ui/"
            wrapper = Path(tmp) / "chromium"
            wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {state.client.ns} '
                               f'/usr/bin/chromium "$@"\n')
            wrapper.chmod(0o755)
            count = args.domains + 1
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path=str(wrapper), args=CHROMIUM_ARGS)
                first_paint(b, base, secret, count, "overview")          # warm the daemon
                overview = [first_paint(b, base, secret, count, "overview")
                            for _ in range(args.loads)]
                table = [first_paint(b, base, secret, count, "domains")
                         for _ in range(args.loads)]
                page = context(b, base, secret)
                page.goto(f"{base}#/domains")
                page.wait_for_selector("tr[data-domain=probe] .badge.running", timeout=60_000)
                changes = change_latency(page, api, "probe", args.changes)
                b.close()
        finally:
            with contextlib.suppress(SystemExit):
                gridvm(home, "lab", "down", "--name", LAB)
    print(f"web console, {count} domains ({args.domains} defined + 1 running), one lab host, "
          "TCG, headless Chromium")
    print(f"  first paint, overview with every domain counted:  {stats(overview)}")
    print(f"  first paint, Domains view with all {count} rows:     {stats(table)}")
    print(f"  state change in gridvmd -> shown in the browser:  {stats(changes)}")


if __name__ == "__main__":
    main()
