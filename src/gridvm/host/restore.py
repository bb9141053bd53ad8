"""The rest of `gridvm backup`: list, verify, prune, and restore (a new domain from a
backup, whose disks are written from the store's chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gridvm.config.model import DomainConfig, check_name
from gridvm.errors import ConfigError, Conflict, GridvmError
from gridvm.host import qemuimg
from gridvm.host.backup import serve_nbd, wait_socket
from gridvm.host.chunkstore import CHUNK, ZERO_DIGEST, ChunkStore, Index, digest, store_error
from gridvm.host.devices import validated
from gridvm.qemu.nbd import NbdClient

if TYPE_CHECKING:
    from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.restore")


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """A backup's manifest without the config, for listings."""
    return {k: v for k, v in m.items() if k != "config"}


def write_raw(store: ChunkStore, index: Index, path: Path) -> int:
    """A raw image from an index (zero chunks left as holes); bytes written."""
    written = 0
    with open(path, "r+b") as f:
        for i, d in enumerate(index.digests):
            if d == ZERO_DIGEST or d == digest(bytes(index.chunk_len(i))):
                continue
            f.seek(i * CHUNK)
            f.write(store.get(d))
            written += index.chunk_len(i)
        f.flush()
        os.fsync(f.fileno())
    return written


def write_nbd(store: ChunkStore, index: Index, sock: Path, export: str) -> int:
    """An image through qemu-nbd (e.g. qcow2) from an index; bytes written."""
    written = 0
    zero_tail = digest(bytes(index.chunk_len(index.chunks - 1))) if index.chunks else b""
    with NbdClient.unix(sock, export) as nbd:
        for i, d in enumerate(index.digests):
            if d == ZERO_DIGEST or (i == index.chunks - 1 and d == zero_tail):
                continue
            nbd.write(i * CHUNK, store.get(d))
            written += index.chunk_len(i)
        nbd.flush()
    return written


class BackupStores:
    """Listing, verifying, pruning and restoring backups of one store."""

    def __init__(self, manager: HostManager) -> None:
        self.m = manager

    @staticmethod
    def _open(path: str) -> ChunkStore:
        return ChunkStore.open(path)

    async def listing(self, path: str, domain: str | None = None) -> dict[str, Any]:
        store = await asyncio.to_thread(self._open, path)
        manifests = await asyncio.to_thread(store.manifests, domain)
        usage = await asyncio.to_thread(store.usage)
        logical = sum(m["size"] for m in manifests)
        return {"store": path, "backups": [summary(m) for m in manifests],
                "chunk_bytes": usage, "logical_bytes": logical,
                "dedup_ratio": round(logical / usage, 2) if usage else None}

    async def verify(self, path: str, which: str | None = None) -> list[dict[str, Any]]:
        """Every backup, a domain's, or one backup (by id)."""
        store = await asyncio.to_thread(self._open, path)

        def run() -> list[dict[str, Any]]:
            with store.locked(exclusive=False):
                all_ = store.manifests()
                chosen = [m for m in all_ if which in (None, m["id"], m["domain"])]
                if which and not chosen:
                    raise ConfigError(f"backup store {path} has no backup or domain {which!r}")
                return store.verify(chosen)

        return await asyncio.to_thread(run)

    async def prune(self, path: str, keep_last: int, domain: str | None = None
                    ) -> dict[str, Any]:
        store = await asyncio.to_thread(self._open, path)

        def run() -> dict[str, Any]:
            with store.locked(exclusive=True):
                try:
                    return store.prune(keep_last, domain)
                except OSError as exc:
                    raise store_error(exc, store.root) from None

        return await asyncio.to_thread(run)

    async def restore(self, path: str, bid: str, name: str, *, domain: str | None = None,
                      target_dir: str | None = None, start: bool = False) -> dict[str, Any]:
        """A new managed domain `name` from backup `bid`: its disks written into
        `target_dir` (the home's disks/), a new UUID and MACs, the rest as backed up."""
        try:
            check_name(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.m.store.by_name(name) is not None:
            raise Conflict(f"domain name {name!r} is already in use")
        store = await asyncio.to_thread(self._open, path)
        where = Path(target_dir) if target_dir else self.m.home.disks
        if not where.is_absolute():
            raise ConfigError(f"restore: {where} is not an absolute path")
        fd = await asyncio.to_thread(store.acquire, exclusive=False)
        made: list[Path] = []
        try:
            manifest = await asyncio.to_thread(store.manifest, bid, domain)
            cfg = DomainConfig.model_validate(manifest["config"])
            where.mkdir(parents=True, exist_ok=True)
            targets: dict[str, str] = {}
            started = time.monotonic()
            written = 0
            for disk in manifest["disks"]:
                out = where / f"{name}-{disk['vdev']}.{disk['format']}"
                if os.path.lexists(out):
                    raise Conflict(f"restore: {out} already exists; refusing to overwrite it")
                index = await asyncio.to_thread(store.index, manifest, disk["vdev"])
                await qemuimg.create(str(out), disk["format"], index.size)
                made.append(out)
                written += await self._write(store, index, out, disk["format"], disk["vdev"])
                targets[disk["vdev"]] = str(out)
            disks = [d.model_dump() | ({"target": targets[d.vdev]} if d.vdev in targets else {})
                     for d in cfg.disks if d.vdev in targets or Path(d.target).exists()]
            vifs = [v.model_dump() | {"mac": None} for v in cfg.vifs]
            new = validated(cfg, name=name, uuid=str(uuidlib.uuid4()), disks=disks, vifs=vifs,
                            source_file=None)
            took = time.monotonic() - started
            rec = await self.m.create(new, managed=True, start=start)
        except BaseException:
            for out in made:
                with contextlib.suppress(OSError):
                    out.unlink()
            raise
        finally:
            store.release(fd)
        log.info("restored %s from backup %s of %s (%d bytes in %.1f s)", name, bid,
                 manifest["domain"], written, took)
        return {"name": name, "from": manifest["domain"], "backup": bid, "disks": targets,
                "written": written, "seconds": round(took, 3), "started": start,
                "domid": self.m.lookup(rec.uuid).domid}

    async def _write(self, store: ChunkStore, index: Index, out: Path, fmt: str,
                     vdev: str) -> int:
        try:
            if fmt == "raw":
                return await asyncio.to_thread(write_raw, store, index, out)
            sock = self.m.home.run / f"restore-{os.getpid()}-{out.name}.sock"
            with serve_nbd(sock, str(out), fmt, vdev, writable=True):
                await asyncio.to_thread(wait_socket, sock)
                return await asyncio.to_thread(write_nbd, store, index, sock, vdev)
        except OSError as exc:
            raise GridvmError(f"restore: writing {out}: {exc.strerror or exc}") from None
