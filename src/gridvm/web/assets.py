"""The console's files: its own (static/) and the front-end packages that `scripts/setup.sh`
installs from the npm registry into node_modules/ (nothing is fetched at run time)."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import HTTPException

STATIC = Path(__file__).parent / "static"
VENDOR_ENV = "GRIDVM_WEB_VENDOR"    # a node_modules/ elsewhere (packaged installs)

# URL path under /ui/vendor/ -> file (or directory, for a prefix ending in /) in node_modules
VENDOR = {
    "xterm.js": "@xterm/xterm/lib/xterm.js",
    "xterm.css": "@xterm/xterm/css/xterm.css",
    "addon-fit.js": "@xterm/addon-fit/lib/addon-fit.js",
    "uPlot.js": "uplot/dist/uPlot.iife.min.js",
    "uPlot.css": "uplot/dist/uPlot.min.css",
    "novnc/": "@novnc/novnc/",       # the graphical console (noVNC's ES modules)
}


def node_modules() -> Path:
    env = os.environ.get(VENDOR_ENV)
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        if (parent / "node_modules").is_dir():
            return parent / "node_modules"
    return Path("/nonexistent/node_modules")


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise HTTPException(404, f"no such file: {rel}")
    return path


def static_file(name: str) -> Path:
    return _inside(STATIC, name)


def vendor_file(path: str) -> Path:
    """A front-end package's file by its /ui/vendor/ path (only the files listed above)."""
    root = node_modules()
    if path in VENDOR and not VENDOR[path].endswith("/"):
        return _inside(root, VENDOR[path])
    for prefix, target in VENDOR.items():
        if prefix.endswith("/") and path.startswith(prefix) and path.endswith(".js"):
            return _inside(root / target, path.removeprefix(prefix))
    raise HTTPException(404, f"no such file: {path}")


def missing() -> list[str]:
    """Listed files that are not installed (scripts/setup.sh runs npm ci)."""
    root = node_modules()
    return [t for t in VENDOR.values() if not (root / t).exists()]
