"""The replicated database under failure, measured in a lab cluster (real MariaDB members).

    python bench/database.py [--trials N] [--members 2|3] [--seconds S] [--ttl S]

Brings up a lab cluster (one host per member, etcd in its own namespace), creates a
database with `gridvm db create`, and from the lab's client namespace runs one client that
inserts sequence numbers (one transaction each; a number counts when COMMIT said OK). It
prints, side by side in one run:

* the same client's write rate direct to the primary's address vs through the writer VIP;
* `db switchover` under that load: the blocked time gridvm measured, and the longest gap
  between two acknowledged commits the client saw;
* N trials of the primary's host powered off under load: the write-unavailability gap
  (longest time between two acknowledged commits around the power-off), acknowledged and
  lost writes (every acknowledged number is looked for on the new primary), then the host
  powered on again and the old primary back as a replica (not timed against the gap);
* median and max of the gaps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dblab import (  # noqa: E402
    APP_PASSWORD,
    APP_USER,
    Writer,
    connect,
    count_rows,
    mariadb_image,
    member,
    status,
    verify,
)

from gridvm.host import netns  # noqa: E402
from gridvm.images.tiny import build_tiny  # noqa: E402

IMAGES = Path(os.environ.get("GRIDVM_TEST_IMAGES", "/var/cache/gridvm/test-images"))


class Lab:
    def __init__(self, hosts: int, ttl: int, margin: float) -> None:
        self.name = f"bdb{os.getpid() % 10000}"
        self.home = Path(tempfile.mkdtemp(prefix="gridvm-benchdb-"))
        self.env = {**os.environ, "GRIDVM_HOME": str(self.home), "GRIDVM_IMAGES": str(IMAGES)}
        self.env.pop("GRIDVM_HOST", None)
        self.run("lab", "up", "--hosts", str(hosts), "--name", self.name, "--cluster",
                 "--ttl", str(ttl), "--margin", str(margin), "--accel", "tcg")

    def run(self, *args: str, host: str | None = None, timeout: float = 900
            ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gridvm", *(["--host", f"{self.name}/{host}"] if host
                                                   else []), *args]
        proc = subprocess.run(argv, env=self.env, text=True, capture_output=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"gridvm {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    @property
    def client_ns(self) -> str:
        return f"{self.name}-client"

    def down(self) -> None:
        subprocess.run([sys.executable, "-m", "gridvm", "lab", "down", "--name", self.name],
                       env=self.env, capture_output=True, timeout=300)


def wait(what: str, fn: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except (SystemExit, OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def rate(lab: Lab, host: str, seconds: float) -> float:
    w = Writer(lab.client_ns, host)
    w.start()
    time.sleep(seconds)
    w.halt()
    return len(w.acked) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--members", type=int, default=3, choices=(2, 3))
    ap.add_argument("--seconds", type=float, default=8.0, help="load before/after a fault")
    ap.add_argument("--ttl", type=int, default=2)
    ap.add_argument("--margin", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    build_tiny(IMAGES)
    mariadb_image(IMAGES)
    lab = Lab(args.members, args.ttl, args.margin)
    out: dict[str, Any] = {"members": args.members, "ttl_s": args.ttl,
                           "margin_s": args.margin, "trials": []}
    try:
        vip = "10.77.0.190"
        lab.run("db", "create", "bench", "--members", str(args.members), "--ip",
                "10.77.0.150/24", "--vip", vip, "--memory", "448", host="h1")
        lab.run("db", "user", "bench", APP_USER, "--password", APP_PASSWORD, "--database",
                "app", host="h1")
        def ddl() -> None:
            c = connect(vip, timeout=30)
            with c.cursor() as cur:
                cur.execute("CREATE TABLE seq (id INT AUTO_INCREMENT PRIMARY KEY, n INT)")
            c.close()
        netns.call_in(lab.client_ns, ddl)
        st = status(lambda *a: lab.run(*a, host="h1"), "bench")
        p_ip = member(st, st["primary"])["ip"]
        out["rate_direct"] = round(rate(lab, p_ip, args.seconds), 1)
        out["rate_vip"] = round(rate(lab, vip, args.seconds), 1)

        w = Writer(lab.client_ns, vip)
        w.start()
        time.sleep(args.seconds / 2)
        t0 = time.monotonic()
        sw = json.loads(lab.run("db", "switchover", "bench", "--json", host="h2").stdout)
        time.sleep(args.seconds / 2)
        w.halt()
        out["switchover"] = {"blocked_s": sw["blocked_s"],
                             "client_gap_s": round(w.longest_gap(t0 - 0.5)[0], 3),
                             **verify(w.acked, count_rows(lab.client_ns, vip))}
        for trial in range(1, args.trials + 1):
            st = status(lambda *a: lab.run(*a, host="h1"), "bench")
            old = st["primary"]
            victim = member(st, old)["host"]
            other = next(m["host"] for m in st["members"] if m["host"] != victim)
            w = Writer(lab.client_ns, vip)
            w.start()
            time.sleep(args.seconds / 2)
            t_off = time.monotonic()
            lab.run("lab", "poweroff", victim, "--name", lab.name)
            def moved(other: str = other, old: str = old) -> bool:
                return bool(status(lambda *a: lab.run(*a, host=other), "bench")["primary"]
                            != old)
            wait("a new primary", moved, 120)
            time.sleep(args.seconds / 2)
            w.halt()
            gap, at = w.longest_gap(t_off - 1)
            res = verify(w.acked, count_rows(lab.client_ns, vip))
            new = status(lambda *a, h=other: lab.run(*a, host=h), "bench")["primary"]
            t = {"trial": trial, "host": victim, "from": old, "to": new,
                 "gap_s": round(gap, 2), "gap_starts_s": round(at - t_off, 2),
                 "acked": res["acked"], "lost": len(res["lost"]),
                 "duplicated": len(res["duplicated"]), "failed": len(w.failed)}
            out["trials"].append(t)
            print(f"trial {trial}: {victim} off, {old} → {new}: write gap {gap:.2f}s, "
                  f"{res['acked']} acknowledged, {len(res['lost'])} lost", file=sys.stderr)
            t_on = time.monotonic()
            lab.run("lab", "poweron", victim, "--name", lab.name)

            def back(other: str = other) -> bool:
                v = status(lambda *a: lab.run(*a, host=other), "bench")
                return all(m["answers"] and m["role"] in ("primary", "replica")
                           for m in v["members"])
            wait("the old primary back as a replica", back, 400)
            t["rejoin_s"] = round(time.monotonic() - t_on, 1)
        gaps = [t["gap_s"] for t in out["trials"]]
        out["gap_median_s"] = round(statistics.median(gaps), 2) if gaps else None
        out["gap_max_s"] = max(gaps, default=None)
    finally:
        lab.down()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"writes/s, one client: direct to the primary {out['rate_direct']}, through the "
          f"writer VIP {out['rate_vip']} "
          f"({out['rate_vip'] / max(out['rate_direct'], 1e-9):.2f}x)")
    s = out["switchover"]
    print(f"switchover under load: writes blocked {s['blocked_s']:.3f}s (gridvm), client gap "
          f"{s['client_gap_s']:.2f}s, {s['acked']} acknowledged, {len(s['lost'])} lost")
    for t in out["trials"]:
        print(f"host loss {t['trial']}: {t['host']} off, {t['from']} → {t['to']}: gap "
              f"{t['gap_s']:.2f}s, {t['acked']} acknowledged, {t['lost']} lost, "
              f"{t['failed']} failed attempts; back as a replica {t['rejoin_s']}s after "
              "power-on")
    print(f"write unavailability after host loss: median {out['gap_median_s']}s, max "
          f"{out['gap_max_s']}s (TTL {args.ttl}s, margin {args.margin}s)")


if __name__ == "__main__":
    main()
