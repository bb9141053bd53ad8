"""A deduplicating backup store: content-addressed 4 MiB chunks (SHA-256 of the data) and one
fixed-size index per disk per backup, as Proxmox Backup Server keeps VM images.

    STORE/gridvm-store.json          {"format": 1, "id": …, "chunk_size": 4194304}
    STORE/chunks/ab/abcd…ef          a chunk: b"R" + data, or b"Z" + zlib(data)
    STORE/backups/DOMAIN/ID/         one backup: manifest.json and <vdev>.fidx per disk
    STORE/.lock                      writers (backup, prune) exclusive, readers shared

Why fixed chunks and not restic or borg (content-defined chunks): an incremental backup reads
only the clusters QEMU's dirty bitmap marks, so its chunk boundaries must be known without
reading the rest of the disk — with fixed 4 MiB chunks a changed cluster names its chunk, and
every other chunk's digest is the previous index's. Content-defined chunking needs the whole
stream to find its boundaries, so each "incremental" backup would read the whole disk again.
Deduplication between backups, domains and clones works the same either way (equal 4 MiB
blocks are stored once). Chunk files are written to a temporary name and renamed, and the
store's filesystem is synced once (syncfs) before a backup's manifest is written — Proxmox
Backup Server's default "filesystem" sync level: a chunk per fsync costs a device flush per
4 MiB. An index is complete before its backup's directory gets its final name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound, ResourceError

CHUNK = 4 << 20
FORMAT = 1
MARKER = "gridvm-store.json"
INDEX_MAGIC = b"GVFIDX01"
INDEX_HEAD = struct.Struct(">8sQI")        # magic, disk size, chunk size
ZERO = bytes(CHUNK)
LOCK_WAIT_S = 300.0
SAMPLE = 64 << 10                          # compress a chunk only if its start compresses


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


ZERO_DIGEST = digest(ZERO)


def store_error(exc: OSError, store: Path) -> GridvmError:
    """An OSError while writing to the store as a one-line gridvm error."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(f"backup store {store} is full (no space left on device)")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return Conflict(f"backup store {store} is not writable ({exc.strerror})")
    return GridvmError(f"backup store {store}: {exc.strerror or exc}")


@dataclass
class Index:
    """The chunk digests of one disk image in one backup."""

    size: int
    digests: list[bytes] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        return -(-self.size // CHUNK)

    def chunk_len(self, i: int) -> int:
        return min(CHUNK, self.size - i * CHUNK)

    def encode(self) -> bytes:
        return INDEX_HEAD.pack(INDEX_MAGIC, self.size, CHUNK) + b"".join(self.digests)

    @classmethod
    def decode(cls, data: bytes) -> Index:
        magic, size, chunk = INDEX_HEAD.unpack_from(data)
        body = data[INDEX_HEAD.size:]
        if magic != INDEX_MAGIC or chunk != CHUNK or len(body) != 32 * -(-size // CHUNK):
            raise GridvmError("damaged backup index")
        return cls(size, [body[i:i + 32] for i in range(0, len(body), 32)])


class ChunkStore:
    """A backup store directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.chunks = root / "chunks"
        self.backups = root / "backups"
        self._lock_fd: int | None = None

    # ----- opening and locking ------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, create: bool = False) -> ChunkStore:
        """The store at `path`; with `create`, a new one is made in an empty or missing
        directory."""
        root = Path(path)
        if not root.is_absolute():
            raise ConfigError(f"backup store {path}: give an absolute path")
        store = cls(root)
        marker = root / MARKER
        if marker.exists():
            meta = json.loads(marker.read_text())
            if meta.get("format") != FORMAT or meta.get("chunk_size") != CHUNK:
                raise Conflict(f"{root} is a backup store of another format")
            return store
        if not create:
            raise NotFound(f"{root} is not a gridvm backup store")
        if root.exists() and not root.is_dir():
            raise Conflict(f"backup store {root}: not a directory")
        if root.exists() and any(p.name != "lost+found" for p in root.iterdir()):
            raise Conflict(f"{root} is not empty and not a backup store; refusing to use it")
        try:
            for d in (root, store.chunks, store.backups):
                d.mkdir(parents=True, exist_ok=True)
            for i in range(256):             # every fan-out directory, made once
                (store.chunks / f"{i:02x}").mkdir(exist_ok=True)
            _write_atomic(marker, json.dumps({"format": FORMAT, "chunk_size": CHUNK,
                                              "id": secrets.token_hex(8),
                                              "created": time.time()}).encode())
        except OSError as exc:
            raise store_error(exc, root) from None
        return store

    @property
    def id(self) -> str:
        return str(json.loads((self.root / MARKER).read_text())["id"])

    def acquire(self, *, exclusive: bool, wait: float = LOCK_WAIT_S) -> int:
        """Take the store's lock (blocking, up to `wait` s): writers (backup, prune) one at
        a time, readers (restore, verify) beside each other but not beside a prune."""
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise store_error(exc, self.root) from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise Conflict(f"backup store {self.root} is busy (another backup or "
                                   "prune)") from None
                time.sleep(0.2)

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool, wait: float = LOCK_WAIT_S) -> Iterator[None]:
        fd = self.acquire(exclusive=exclusive, wait=wait)
        try:
            yield
        finally:
            self.release(fd)

    def check_writable(self) -> None:
        """Fail now (one line) if chunks cannot be written, before any work starts."""
        probe = self.chunks / f".probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"x")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise store_error(exc, self.root) from None

    # ----- chunks -------------------------------------------------------------------------

    def chunk_path(self, d: bytes) -> Path:
        h = d.hex()
        return self.chunks / h[:2] / h

    def has(self, d: bytes) -> bool:
        return self.chunk_path(d).exists()

    def put(self, d: bytes, data: bytes) -> int:
        """Store a chunk unless present; the bytes written (0 if deduplicated)."""
        path = self.chunk_path(d)
        if path.exists():
            return 0
        kind, body = b"R", data
        if len(zlib.compress(data[:SAMPLE], 1)) < SAMPLE * 0.8:
            packed = zlib.compress(data, 1)
            if len(packed) < len(data) * 0.9:
                kind, body = b"Z", packed
        path.parent.mkdir(exist_ok=True)
        _write_atomic(path, kind, body, sync=False)     # synced by `commit` (syncfs)
        return 1 + len(body)

    def get(self, d: bytes) -> bytes:
        try:
            body = self.chunk_path(d).read_bytes()
        except FileNotFoundError:
            raise GridvmError(f"backup store {self.root}: chunk {d.hex()[:16]}… is "
                              "missing") from None
        data = zlib.decompress(body[1:]) if body[:1] == b"Z" else body[1:]
        if digest(data) != d:
            raise GridvmError(f"backup store {self.root}: chunk {d.hex()[:16]}… is damaged")
        return data

    def check(self, d: bytes) -> str | None:
        """None if the chunk is there and sound, else what is wrong."""
        try:
            self.get(d)
        except GridvmError as exc:
            return "missing" if "missing" in str(exc) else "damaged"
        except (OSError, zlib.error):
            return "damaged"
        return None

    # ----- backups ------------------------------------------------------------------------

    def new_id(self, domain: str) -> str:
        base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        n, bid = 1, base
        while (self.backups / domain / bid).exists():
            n += 1
            bid = f"{base}-{n}"
        return bid

    def staging(self, domain: str, bid: str) -> Path:
        path = self.backups / domain / f".{bid}.partial"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, domain: str, bid: str, manifest: dict[str, Any]) -> None:
        """Write the manifest and give the backup its final name (it exists from now on)."""
        staging = self.backups / domain / f".{bid}.partial"
        _syncfs(self.root)                  # every chunk it names is on disk first
        _write_atomic(staging / "manifest.json", json.dumps(manifest, indent=1).encode())
        os.rename(staging, self.backups / domain / bid)
        _fsync_dir(self.backups / domain)

    def abandon(self, domain: str, bid: str) -> None:
        shutil.rmtree(self.backups / domain / f".{bid}.partial", ignore_errors=True)

    def write_index(self, where: Path, vdev: str, index: Index) -> str:
        data = index.encode()
        _write_atomic(where / f"{vdev}.fidx", data)
        return hashlib.sha256(data).hexdigest()

    def manifests(self, domain: str | None = None) -> list[dict[str, Any]]:
        """Every committed backup (oldest first), or one domain's."""
        out = []
        groups = [self.backups / domain] if domain else sorted(self.backups.iterdir()) \
            if self.backups.exists() else []
        for group in groups:
            if not group.is_dir():
                continue
            for b in sorted(group.iterdir()):
                if b.name.startswith(".") or not (b / "manifest.json").exists():
                    continue
                out.append(json.loads((b / "manifest.json").read_text()))
        return sorted(out, key=lambda m: (m["created"], m["id"]))

    def manifest(self, bid: str, domain: str | None = None) -> dict[str, Any]:
        found = [m for m in self.manifests(domain) if m["id"] == bid]
        if not found:
            raise NotFound(f"backup store {self.root} has no backup {bid!r}"
                           + (f" of {domain}" if domain else ""))
        if len(found) > 1:
            raise Conflict(f"backup {bid} exists for several domains: name the domain too")
        return found[0]

    def index(self, manifest: dict[str, Any], vdev: str) -> Index:
        disk = next(d for d in manifest["disks"] if d["vdev"] == vdev)
        data = (self.backups / manifest["domain"] / manifest["id"] / f"{vdev}.fidx").read_bytes()
        if hashlib.sha256(data).hexdigest() != disk["index_sha256"]:
            raise GridvmError(f"backup {manifest['id']}: index of {vdev} is damaged")
        return Index.decode(data)

    def update_manifest(self, manifest: dict[str, Any]) -> None:
        path = self.backups / manifest["domain"] / manifest["id"] / "manifest.json"
        _write_atomic(path, json.dumps(manifest, indent=1).encode())

    # ----- verify and prune ---------------------------------------------------------------

    def verify(self, manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Re-read every chunk each backup needs (each chunk once); note the result in the
        manifests."""
        seen: dict[bytes, str | None] = {}
        results = []
        for m in manifests:
            bad: dict[str, int] = {}
            chunks = 0
            for disk in m["disks"]:
                try:
                    index = self.index(m, disk["vdev"])
                except (GridvmError, OSError):
                    bad["index"] = bad.get("index", 0) + 1
                    continue
                for d in index.digests:
                    chunks += 1
                    if d not in seen:
                        seen[d] = self.check(d)
                    if seen[d]:
                        bad[str(seen[d])] = bad.get(str(seen[d]), 0) + 1
            m["verified"] = {"at": time.time(), "ok": not bad}
            with contextlib.suppress(OSError):
                self.update_manifest(m)
            results.append({"id": m["id"], "domain": m["domain"], "chunks": chunks,
                            "ok": not bad, "problems": bad})
        return results

    def prune(self, keep_last: int, domain: str | None = None) -> dict[str, Any]:
        """Remove all but the newest `keep_last` backups of each domain (or of `domain`),
        then every chunk no backup needs any more."""
        if keep_last < 1:
            raise ConfigError("prune: --keep-last must be at least 1")
        removed = []
        by_domain: dict[str, list[dict[str, Any]]] = {}
        for m in self.manifests(domain):
            by_domain.setdefault(m["domain"], []).append(m)
        for items in by_domain.values():
            for m in items[:-keep_last]:
                shutil.rmtree(self.backups / m["domain"] / m["id"])
                removed.append(m["id"])
        for partial in self.backups.glob("*/.*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        used: set[bytes] = set()
        for m in self.manifests():
            for disk in m["disks"]:
                used.update(self.index(m, disk["vdev"]).digests)
        freed = chunks = 0
        for sub in self.chunks.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                try:
                    known = bytes.fromhex(f.name) in used
                except ValueError:
                    known = False          # a temporary file left by a crash
                if not known:
                    freed += f.stat().st_size
                    chunks += 1
                    f.unlink()
        return {"removed": removed, "chunks_removed": chunks, "bytes_freed": freed}

    def usage(self) -> int:
        """Bytes the chunks take."""
        return sum(f.stat().st_size for f in self.chunks.glob("*/*"))


def _write_atomic(path: Path, *parts: bytes, sync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _syncfs(path: Path) -> None:
    """Flush the whole filesystem holding `path` (syncfs(2); sync(2) if it is missing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    except AttributeError:
        os.sync()
    finally:
        os.close(fd)


_LIBC = ctypes.CDLL(None, use_errno=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
