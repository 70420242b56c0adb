"""Durable outbox: an SQLite queue between the pipeline and the MQTT client.

A row is written (committed) by `put()` before it is ever handed to paho, and deleted by `ack()`
only once the broker acknowledged it, so messages survive a broker outage and a daemon crash.

Durability: WAL journal. With `synchronous="normal"` (default) a committed transaction is in the
WAL file in the OS page cache when `put()` returns: a SIGKILL/crash of the process loses nothing,
a power cut may lose the last transactions. `synchronous="full"` fsyncs every commit and survives
power loss too, at the cost of one fsync per `put()` (see docs/mqtt.md for the measured rates).

Bounds: `max_rows` and `max_bytes` (payload bytes). When a put() goes over a bound the drop policy
removes rows until it fits, and counts them per kind:
  - "oldest_position_first": oldest `position` rows first, then the oldest rows of any kind;
  - "oldest": oldest rows of any kind.
`coalesce_key`: a new row deletes the queued rows with the same key (counted as `coalesced`), used
for retained state/stats so an outage queues only the newest one.

Row ids come from AUTOINCREMENT, so they grow strictly: the publisher keeps a "sent up to id"
cursor and `peek(limit, after_id=cursor)` never returns a row twice, even after acks.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

DropPolicy = Literal["oldest_position_first", "oldest"]
Synchronous = Literal["normal", "full"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    kind TEXT NOT NULL,
    coalesce_key TEXT,
    created REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, id);
CREATE INDEX IF NOT EXISTS outbox_coalesce ON outbox(coalesce_key) WHERE coalesce_key IS NOT NULL;
"""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    coalesce_key: Optional[str]
    created: float  # UTC epoch seconds when put() was called


PutItem = Tuple[str, bytes, int, bool, str, Optional[str]]  # topic, payload, qos, retain, kind, coalesce_key


class OutboxError(Exception):
    """The outbox file cannot be opened or used (message names the file)."""


class Outbox:
    def __init__(
        self,
        path: Union[str, Path],
        *,
        max_rows: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        drop: DropPolicy = "oldest_position_first",
        synchronous: Synchronous = "normal",
    ):
        if drop not in ("oldest_position_first", "oldest"):
            raise ValueError(f"outbox drop policy must be 'oldest_position_first' or 'oldest', got {drop!r}")
        if synchronous not in ("normal", "full"):
            raise ValueError(f"outbox synchronous must be 'normal' or 'full', got {synchronous!r}")
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("outbox max_rows and max_bytes must be >= 1")
        self.path = Path(path)
        self.max_rows = int(max_rows)
        self.max_bytes = int(max_bytes)
        self.drop_policy = drop
        self._lock = threading.Lock()
        self._listeners: List[Callable[[], None]] = []
        self.dropped: Counter = Counter()  # kind -> rows removed by the bound policy since open
        self.coalesced: Counter = Counter()  # kind -> rows replaced by a newer one with the same key
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection shared under a lock: SQLite serialises writers anyway, and the lock
            # keeps the in-memory depth/bytes counters consistent with the table.
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"outbox {self.path}: cannot open as SQLite: {exc}") from None
        except OSError as exc:
            raise OutboxError(f"outbox {self.path}: {exc.strerror or exc}") from None
        self._rows, self._bytes = int(row[0]), int(row[1])
        self._closed = False

    # ------------------------------------------------------------------------------------ writing
    def put(
        self,
        topic: str,
        payload: Union[bytes, str],
        qos: int = 1,
        retain: bool = False,
        kind: str = "event",
        coalesce_key: Optional[str] = None,
    ) -> int:
        """Queue one message; returns its row id once it is committed to disk."""
        return self.put_many([(topic, payload, qos, retain, kind, coalesce_key)])[0]

    def put_many(self, items: Iterable[Sequence]) -> List[int]:
        """Queue several messages in one transaction (one commit, much faster than many put())."""
        rows = [self._check(*it) for it in items]
        if not rows:
            return []
        now = time.time()
        ids: List[int] = []
        with self._lock:
            self._ensure_open()
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for topic, payload, qos, retain, kind, key in rows:
                    if key is not None:
                        for _rid, rkind, size in cur.execute(
                            "DELETE FROM outbox WHERE coalesce_key = ? RETURNING id, kind, size", (key,)
                        ).fetchall():
                            self._rows -= 1
                            self._bytes -= size
                            self.coalesced[rkind] += 1
                    cur.execute(
                        "INSERT INTO outbox(topic, payload, qos, retain, kind, coalesce_key, created, size)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (topic, payload, qos, int(retain), kind, key, now, len(payload)),
                    )
                    ids.append(int(cur.lastrowid))
                    self._rows += 1
                    self._bytes += len(payload)
                self._enforce_bounds(cur)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                self._recount()
                raise
        for fn in list(self._listeners):
            fn()
        return ids

    def _check(self, topic, payload, qos=1, retain=False, kind="event", coalesce_key=None) -> PutItem:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"outbox payload must be bytes or str, got {type(payload).__name__}")
        payload = bytes(payload)
        if not topic or any(c in topic for c in "+#\0"):
            raise ValueError(f"outbox: bad topic {topic!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"outbox: qos must be 0, 1 or 2, got {qos!r}")
        if len(payload) > self.max_bytes:
            raise ValueError(f"outbox: payload of {len(payload)} bytes exceeds max_bytes={self.max_bytes}")
        return topic, payload, int(qos), bool(retain), str(kind), coalesce_key

    def _enforce_bounds(self, cur: sqlite3.Cursor) -> None:
        if self._rows <= self.max_rows and self._bytes <= self.max_bytes:
            return
        passes = ["position", None] if self.drop_policy == "oldest_position_first" else [None]
        for kind in passes:
            while self._rows > self.max_rows or self._bytes > self.max_bytes:
                # Delete in chunks sized to the excess rows (at least 1, bytes may need more).
                n = self._rows - self.max_rows if self._rows > self.max_rows else 256
                where = "WHERE kind = ?" if kind else ""
                args: tuple = (kind, n) if kind else (n,)
                victims = cur.execute(
                    f"SELECT id, kind, size FROM outbox {where} ORDER BY id LIMIT ?", args
                ).fetchall()
                if not victims:
                    break
                if self._rows <= self.max_rows:  # only bytes are over: take just enough
                    need, acc, cut = self._bytes - self.max_bytes, 0, 0
                    for cut, (_i, _k, size) in enumerate(victims, 1):
                        acc += size
                        if acc >= need:
                            break
                    victims = victims[:cut]
                cur.executemany("DELETE FROM outbox WHERE id = ?", [(v[0],) for v in victims])
                for _i, vkind, size in victims:
                    self._rows -= 1
                    self._bytes -= size
                    self.dropped[vkind] += 1

    # ------------------------------------------------------------------------------------ reading
    def peek(self, limit: int = 100, after_id: int = 0) -> List[OutboxRow]:
        """Up to `limit` queued rows with id > after_id, oldest first (rows stay queued)."""
        with self._lock:
            self._ensure_open()
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, kind, coalesce_key, created FROM outbox"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (int(after_id), int(limit)),
            ).fetchall()
        return [OutboxRow(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6], r[7]) for r in rows]

    def ack(self, row_id: int) -> bool:
        """Delete a delivered row. False if it was already gone (dropped, coalesced, acked)."""
        return self.ack_many([row_id]) == 1

    def ack_many(self, row_ids: Iterable[int]) -> int:
        """Delete several delivered rows in one transaction; returns how many existed."""
        ids = [(int(i),) for i in row_ids]
        if not ids:
            return 0
        found = 0
        with self._lock:
            self._ensure_open()
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for (rid,) in ids:
                    r = cur.execute("DELETE FROM outbox WHERE id = ? RETURNING size", (rid,)).fetchone()
                    if r is not None:
                        found += 1
                        self._rows -= 1
                        self._bytes -= r[0]
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                self._recount()
                raise
        return found

    def depth(self) -> int:
        return self._rows

    def oldest_created(self) -> Optional[float]:
        """`created` of the oldest queued row (epoch seconds), None when empty."""
        with self._lock:
            self._ensure_open()
            row = self._db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def bytes(self) -> int:
        return self._bytes

    def counters(self) -> Dict[str, Dict[str, int]]:
        """{"dropped": {kind: n}, "coalesced": {kind: n}} since this Outbox was opened."""
        with self._lock:
            return {"dropped": dict(self.dropped), "coalesced": dict(self.coalesced)}

    # ------------------------------------------------------------------------------------ misc
    def add_listener(self, fn: Callable[[], None]) -> None:
        """`fn()` is called (outside the lock, in the putting thread) after every committed put."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        try:
            self._listeners.remove(fn)
        except ValueError:
            pass

    def _recount(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        self._rows, self._bytes = int(row[0]), int(row[1])

    def _ensure_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_config(cls, cfg, path: Union[str, Path]) -> "Outbox":
        """Build from an OutboxConfig (edged.config)."""
        return cls(path, max_rows=cfg.max_rows, max_bytes=cfg.max_bytes, drop=cfg.drop,
                   synchronous=getattr(cfg, "synchronous", "normal"))
