"""gridvm: a Xen-style toolstack that runs xm/xl domains on QEMU."""

__version__ = "0.1.0"
