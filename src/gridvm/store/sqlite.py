"""The embedded single-host store: one SQLite file in the gridvm home."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from pydantic import ValidationError

from gridvm.errors import ConfigError, Conflict
from gridvm.store.records import DomainRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SqliteStore:
    """Domain records as JSON rows; names are unique (enforced by the schema)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def put(self, rec: DomainRecord) -> None:
        """Store a record; one whose config no longer passes the model (an update made with
        model_copy, which skips validation) is refused: it could never be read back."""
        text = rec.model_dump_json()
        try:
            DomainRecord.model_validate_json(text)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"invalid {where}: "
                              f"{str(err['msg']).removeprefix('Value error, ')}") from None
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO domains(uuid, name, record) VALUES (?, ?, ?) "
                    "ON CONFLICT(uuid) DO UPDATE SET name=excluded.name, record=excluded.record",
                    (rec.uuid, rec.name, text),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"domain name {rec.name!r} is already in use") from exc

    def get(self, uuid: str) -> DomainRecord | None:
        return self._one("SELECT record FROM domains WHERE uuid = ?", uuid)

    def by_name(self, name: str) -> DomainRecord | None:
        return self._one("SELECT record FROM domains WHERE name = ?", name)

    def all(self) -> list[DomainRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM domains ORDER BY name").fetchall()
        return [DomainRecord.model_validate_json(r[0]) for r in rows]

    def delete(self, uuid: str, *, reason: str | None = None) -> None:
        with self._lock:
            self._db.execute("DELETE FROM domains WHERE uuid = ?", (uuid,))

    def hands_over(self, rec: DomainRecord, reason: str) -> bool:
        """Nobody else restarts this host's domains."""
        return False

    def arrived(self, rec: DomainRecord) -> None:
        """Nothing is shared beyond this host."""

    def departing(self, uuid: str) -> None:
        """Nothing is shared beyond this host."""

    def next_domid(self) -> int:
        """Monotonic domids (Domain-0 is 0); never reused on this host."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'next_domid'").fetchone()
            domid = int(row[0]) if row else 1
            self._db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('next_domid', ?)", (domid + 1,)
            )
            self._db.execute("COMMIT")
        return domid

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _one(self, sql: str, arg: str) -> DomainRecord | None:
        with self._lock:
            row = self._db.execute(sql, (arg,)).fetchone()
        return DomainRecord.model_validate_json(row[0]) if row else None
