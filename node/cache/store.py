"""The local tier: an sqlite store of response blocks by CID, with an index from request key to CID.

- WAL journal, so the daemon and `accelmesh cache ...` can use the same file at once.
- Schema version in ``PRAGMA user_version``; `MIGRATIONS[i]` takes version i to i+1. A file
  written by a newer accelmesh is refused rather than damaged.
- A damaged file (not a database, or a corrupt one) is refused too (`CorruptStoreError`); the
  daemon opens its store with `open_store`, which moves such a file aside and starts an empty one.
- A size cap (`max_bytes`) with least-recently-used eviction; dropping a block drops the keys
  that point at it.
- Verify on read: a block whose bytes no longer hash to its CID is deleted and reported as a
  miss, never returned.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.cache.memory import Entry
from node.errors import AccelmeshError
from protocols.cid import cid_of

__all__ = [
    "SCHEMA_VERSION",
    "BlockInfo",
    "CorruptStoreError",
    "LocalStore",
    "StoreError",
    "StoreStatistics",
    "VerifyReport",
    "open_store",
]

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: blocks by CID, and the request-key index.
    """
    CREATE TABLE blocks (
        cid       TEXT PRIMARY KEY,
        data      BLOB NOT NULL,
        size      INTEGER NOT NULL,
        created   REAL NOT NULL,
        last_used REAL NOT NULL
    );
    CREATE INDEX blocks_by_last_used ON blocks(last_used);
    CREATE TABLE request_keys (
        key     TEXT PRIMARY KEY,
        cid     TEXT NOT NULL REFERENCES blocks(cid) ON DELETE CASCADE,
        created REAL NOT NULL
    );
    CREATE INDEX request_keys_by_cid ON request_keys(cid);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(AccelmeshError):
    """The store file cannot be used (newer schema, not a database)."""


class CorruptStoreError(StoreError):
    """The store file is damaged: not a database at all, or sqlite finds it malformed."""


_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}  # sqlite's (primary) codes for a damaged file


@dataclass(frozen=True)
class BlockInfo:
    cid: str
    size: int
    created: float
    last_used: float
    keys: int


@dataclass(frozen=True)
class StoreStatistics:
    path: str
    blocks: int
    keys: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    corrupt: int


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    corrupt: tuple[str, ...]  # CIDs whose bytes did not match; they have been removed


def open_store(path: str | os.PathLike[str], **options: Any) -> LocalStore:
    """The store at `path` as a daemon opens it: a damaged file is moved aside (to
    ``<name>.corrupt-<UTC time>``, with its WAL, kept for a post-mortem) and an empty store is made
    in its place, so a damaged cache costs its contents, never the daemon. Anything else that
    `LocalStore` refuses (a newer schema, a locked or unreadable file) is still raised."""
    try:
        return LocalStore(path, **options)
    except CorruptStoreError as exc:
        aside = _move_aside(Path(path))
        log.warning("store %s is damaged (%s): moved it to %s and started an empty store", path, exc.__cause__, aside)
        return LocalStore(path, **options)


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    path.rename(aside)
    for suffix in ("-wal", "-shm"):  # sqlite's companions go with it: a stale WAL must not meet the new file
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.rename(aside.with_name(aside.name + suffix))
    return aside


class LocalStore:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 1024 * 1024 * 1024,
        verify_on_read: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.verify_on_read = verify_on_read
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._bytes = self._total_bytes()
        except StoreError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._db.close()
            damaged = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _DAMAGED
            kind = CorruptStoreError if damaged else StoreError  # (a locked file is not damaged)
            raise kind(f"{self.path}: not a usable accelmesh store: {exc}") from exc
        self._hits = self._misses = self._evictions = self._corrupt = 0

    # -- schema ------------------------------------------------------------------------

    def _migrate(self) -> None:
        while True:
            self._db.execute("BEGIN IMMEDIATE")  # one writer: two processes never migrate at once
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path} has schema version {version}, newer than this accelmesh "
                        f"({SCHEMA_VERSION}); upgrade accelmesh to use it"
                    )
                if version == SCHEMA_VERSION:
                    self._db.execute("COMMIT")
                    return
                # executescript() would commit early: run the statements one by one.
                for statement in filter(str.strip, MIGRATIONS[version].split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={version + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            log.info("store %s migrated to schema version %d", self.path, version + 1)

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _total_bytes(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()[0])

    # -- reads -------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The response stored for a request key, verified against its CID; None on a miss."""
        with self._lock:
            row = self._db.execute(
                "SELECT b.cid, b.data FROM request_keys k JOIN blocks b ON b.cid = k.cid WHERE k.key = ?", (key,)
            ).fetchone()
            entry = self._checked(row)
            if entry is None:
                self._misses += 1
            else:
                self._hits += 1
            return entry

    def get_block(self, cid: str) -> bytes | None:
        """The bytes of a block by CID, verified; None if absent or corrupt."""
        with self._lock:
            row = self._db.execute("SELECT cid, data FROM blocks WHERE cid = ?", (cid,)).fetchone()
            entry = self._checked(row)
            return entry.data if entry else None

    def _checked(self, row: tuple[str, bytes] | None) -> Entry | None:
        if row is None:
            return None
        cid, data = row[0], bytes(row[1])
        if self.verify_on_read and cid_of(data) != cid:
            log.warning("store %s: block %s is corrupt (bytes hash to %s); removed", self.path, cid, cid_of(data))
            self._corrupt += 1
            self._delete_locked(cid)
            return None
        self._db.execute("UPDATE blocks SET last_used = ? WHERE cid = ?", (self._clock(), cid))
        return Entry(data, cid, float("inf"))

    def has(self, cid: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM blocks WHERE cid = ?", (cid,)).fetchone() is not None

    def list(self, limit: int | None = None) -> list[BlockInfo]:
        """Blocks, most recently used first."""
        sql = (
            "SELECT b.cid, b.size, b.created, b.last_used, COUNT(k.key) FROM blocks b "
            "LEFT JOIN request_keys k ON k.cid = b.cid GROUP BY b.cid ORDER BY b.last_used DESC"
        )
        with self._lock:
            rows = self._db.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        return [BlockInfo(*row) for row in rows]

    # -- writes ------------------------------------------------------------------------

    def put(self, key: str | None, data: bytes, cid: str) -> bool:
        """Store a block (and the key pointing at it); False if it alone exceeds `max_bytes`."""
        if cid_of(data) != cid:
            raise ValueError(f"refusing to store bytes under {cid}: they hash to {cid_of(data)}")
        if len(data) > self.max_bytes:
            return False
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO blocks (cid, data, size, created, last_used) VALUES (?, ?, ?, ?, ?)",
                    (cid, data, len(data), now, now),
                ).rowcount
                if not inserted:
                    self._db.execute("UPDATE blocks SET last_used = ? WHERE cid = ?", (now, cid))
                if key is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO request_keys (key, cid, created) VALUES (?, ?, ?)", (key, cid, now)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if inserted:
                self._bytes += len(data)
            if self._bytes > self.max_bytes:
                self._evict_locked()
        return True

    def _evict_locked(self) -> None:
        self._bytes = self._total_bytes()  # another process may have changed the file
        while self._bytes > self.max_bytes:
            row = self._db.execute("SELECT cid, size FROM blocks ORDER BY last_used ASC LIMIT 1").fetchone()
            if row is None:
                break
            self._delete_locked(row[0])
            self._evictions += 1

    def delete(self, cid: str) -> bool:
        """Remove a block and the keys pointing at it (this node only)."""
        with self._lock:
            return self._delete_locked(cid)

    def _delete_locked(self, cid: str) -> bool:
        row = self._db.execute("SELECT size FROM blocks WHERE cid = ?", (cid,)).fetchone()
        if row is None:
            return False
        self._db.execute("DELETE FROM blocks WHERE cid = ?", (cid,))
        self._bytes -= int(row[0])
        return True

    def verify(self) -> VerifyReport:
        """Re-hash every block; remove and report the corrupt ones."""
        corrupt = []
        with self._lock:
            cids = [r[0] for r in self._db.execute("SELECT cid FROM blocks").fetchall()]
            for cid in cids:
                row = self._db.execute("SELECT data FROM blocks WHERE cid = ?", (cid,)).fetchone()
                if row is not None and cid_of(bytes(row[0])) != cid:
                    corrupt.append(cid)
                    self._delete_locked(cid)
            self._corrupt += len(corrupt)
        return VerifyReport(checked=len(cids), corrupt=tuple(corrupt))

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM blocks")
            self._bytes = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- introspection -----------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        with self._lock:
            blocks, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blocks").fetchone()
            keys = self._db.execute("SELECT COUNT(*) FROM request_keys").fetchone()[0]
        return StoreStatistics(
            path=str(self.path), blocks=blocks, keys=keys, bytes=total, max_bytes=self.max_bytes,
            hits=self._hits, misses=self._misses, evictions=self._evictions, corrupt=self._corrupt,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<LocalStore {s.path} {s.blocks} blocks, {s.bytes}/{s.max_bytes} bytes, schema v{self.schema_version}>"
