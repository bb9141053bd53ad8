"""Where gridvm keeps its state: one home directory per daemon."""

from __future__ import annotations

import grp
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "/var/lib/gridvm"
GROUP = "gridvm"       # members may use gridvmd's socket (and so are as powerful as root)


def admin_gid() -> int | None:
    """The `gridvm` group's id, if the group exists (scripts/setup.sh creates it)."""
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return None


def restrict(path: Path, mode: int) -> None:
    """Give `path` `mode`, owned by root (or us) and the gridvm group when it exists."""
    gid = admin_gid()
    if gid is not None and os.geteuid() == 0:
        os.chown(path, 0, gid)
    os.chmod(path, mode)


@dataclass(frozen=True)
class Home:
    """The state directory of one gridvmd (database, sockets, logs, images)."""

    root: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> Home:
        """`home` if given, else $GRIDVM_HOME, else /var/lib/gridvm."""
        return cls(Path(home or os.environ.get("GRIDVM_HOME") or DEFAULT_HOME).absolute())

    @property
    def tag(self) -> str:
        """A short id of this home, for host-wide names and marks (cgroups, tap aliases)."""
        return hashlib.sha1(str(self.root).encode()).hexdigest()[:10]

    @property
    def db(self) -> Path:
        return self.root / "gridvm.db"

    @property
    def api_socket(self) -> Path:
        return self.root / "gridvmd.sock"

    @property
    def run(self) -> Path:
        """Per-domain runtime files (QMP sockets, serial sockets, pid files)."""
        return self.root / "run"

    @property
    def pki(self) -> Path:
        """The host's key and certificate, its cluster's CA and CRL."""
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def images(self) -> Path:
        """The image store; $GRIDVM_IMAGES overrides it (e.g. a cache shared by tests)."""
        env = os.environ.get("GRIDVM_IMAGES")
        return Path(env).absolute() if env else self.root / "images"

    @property
    def daemon_log(self) -> Path:
        return self.logs / "gridvmd.log"

    def ensure(self) -> None:
        """Create the directory tree (idempotent)."""
        for d in (self.root, self.run, self.logs, self.images):
            d.mkdir(parents=True, exist_ok=True)

    def secure(self) -> None:
        """The daemon's home is 0750 root:gridvm: other users can neither reach the API
        socket nor read consoles, logs or the database."""
        restrict(self.root, 0o750)
