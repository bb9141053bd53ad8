"""Helpers for the replicated database in a lab: the MariaDB image (built once, cached by
recipe hash like the provisioning tests' images) and a client that writes sequence numbers
through a VIP from the lab's client namespace, counting a number only when COMMIT said OK.
Used by tests/test_db_cluster.py and bench/database.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from gridvm.db.seqwriter import (  # noqa: F401  (the tests' and the benchmark's client)
    APP_PASSWORD,
    APP_USER,
    Writer,
    connect,
    count_rows,
    verify,
)
from gridvm.errors import GridvmError
from gridvm.images.store import ImageInfo, get_image
from gridvm.provision import clone as clones
from gridvm.provision.debian import build_debian
from gridvm.provision.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"


def mariadb_image(images: Path) -> ImageInfo:
    """The MariaDB recipe's image in `images`, built once (a template left by an earlier
    run is made writable first, so a changed recipe can rebuild it)."""
    with contextlib.suppress(GridvmError):
        if get_image(images, "mariadb").template:
            clones.unmark_template(images, "mariadb")
    return build_debian(images, load_recipe(RECIPES / "mariadb.toml"), name="mariadb",
                        base_dir=RECIPES)


def status(run: Any, name: str) -> dict[str, Any]:
    """`gridvm db status NAME --json` through a `run(*args) -> CompletedProcess`."""
    view: dict[str, Any] = json.loads(run("db", "status", name, "--json").stdout)
    return view


def member(view: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in view["members"] if m["name"] == name)
