"""The `gridvmd` command: the host agent (gridvm.api.daemon) with every part an upper layer
adds to it — the web console."""

from __future__ import annotations

from gridvm.api import daemon
from gridvm.web.part import WebPart


def main(argv: list[str] | None = None) -> None:
    daemon.main(argv, parts=[WebPart()])


if __name__ == "__main__":
    main()
