"""Typed errors shared by every layer; each carries a one-line message for the user."""

from __future__ import annotations


class GridvmError(Exception):
    """Base error: its str() is the one line shown to the user."""


class ConfigError(GridvmError):
    """A domain config file is invalid (message names file:line and key)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        self.file = file
        self.line = line
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        super().__init__(f"{where}{message}")


class NotFound(GridvmError):
    """A named object (domain, image, network) does not exist."""


class Conflict(GridvmError):
    """The request clashes with existing state (duplicate name, busy domain)."""


class ResourceError(GridvmError):
    """The host cannot provide what was asked (memory, kernel file, accelerator)."""


class QemuError(GridvmError):
    """QEMU failed to start or answered a command with an error."""


class PeerUnreachable(GridvmError):
    """Another host's gridvmd does not answer (down, partitioned, refused our certificate)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def error_kind(name: str) -> type[GridvmError]:
    """The error class an API answer's `type` names (GridvmError for anything else)."""
    kinds: dict[str, type[GridvmError]] = {
        "NotFound": NotFound, "Conflict": Conflict, "ConfigError": ConfigError,
        "ResourceError": ResourceError, "QemuError": QemuError,
    }
    return kinds.get(name, GridvmError)
