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

Damage (SD cards): `Outbox(path)` runs `PRAGMA quick_check` and raises OutboxCorruptError for a file
that is not a usable outbox (garbage, truncated, broken pages, a WAL from another database, a
directory in its place, a foreign table). `Outbox.open_or_recover()` then moves the file and its
-wal/-shm aside as `<name>.corrupt-<UTC time>` (never deleted), logs an ERROR and opens a fresh
outbox; `recovered` says where the old one went. Damage found while running raises
OutboxCorruptError from put/peek/ack; `recover()` does the same move in place, row ids going on.

Errors: every SQLite failure at run time (a write lock held beyond `busy_timeout_s`, disk full, I/O)
raises OutboxError naming the file, with the SQLite error as `__cause__`, after rolling the whole
transaction back: depth(), bytes() and the counters change only when a transaction committed.
OutboxError (not OutboxCorruptError) from the constructor means a fresh outbox cannot be created
either (state directory not writable, disk full).

Files are 0600 whatever the umask (edged.statefiles); SQLite gives its -wal/-shm the same mode.
The SQL needs SQLite 3.31 or later (Ubuntu 20.04; Raspberry Pi OS Bullseye has 3.34): no RETURNING,
no UPSERT, at most 999 bound parameters per statement (tests/test_old_sqlite.py runs the tests on
SQLite 3.31.1 and 3.34.1).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, TypeVar, Union

from edged.statefiles import ensure_private_dir, make_private, open_private

log = logging.getLogger("edged.mqtt.outbox")

DropPolicy = Literal["oldest_position_first", "oldest"]
Synchronous = Literal["normal", "full"]
T = TypeVar("T")

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


class OutboxCorruptError(OutboxError):
    """The file is not a usable outbox (damaged or foreign); `reason` says what was found."""

    def __init__(self, path: Union[str, Path], reason: str):
        super().__init__(f"outbox {path} is corrupt: {reason}")
        self.path = Path(path)
        self.reason = reason


_COLUMNS = ("id", "topic", "payload", "qos", "retain", "kind", "coalesce_key", "created", "size")
_MAX_PARAMS = 500  # bound parameters per statement; SQLite < 3.32 allows at most 999
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11; the extended code
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _sidecars(path: Path) -> List[Path]:
    return [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal")]


def _move_aside(path: Path, reason: str) -> Dict[str, str]:
    """Rename a damaged outbox and its -wal/-shm/-journal to `<name>.corrupt-<UTC time>[-n]`."""
    now = datetime.now(timezone.utc)
    stem = f"{path.name}.corrupt-{now:%Y%m%dT%H%M%SZ}"
    target, n = path.with_name(stem), 1
    while any(os.path.lexists(p) for p in [target, *_sidecars(target)]):
        target, n = path.with_name(f"{stem}-{n}"), n + 1
    try:
        # Sidecars first: a fresh database must never find the old WAL beside it and replay it.
        for side, side_target in zip(_sidecars(path), _sidecars(target)):
            if os.path.lexists(side):
                os.rename(side, side_target)
        if os.path.lexists(path):
            os.rename(path, target)
    except OSError as exc:
        raise OutboxError(
            f"outbox {path} is corrupt ({reason}) and cannot be moved aside to {target}: {exc.strerror or exc}"
        ) from None
    log.error("outbox %s is corrupt (%s): moved it to %s and started an empty outbox; "
              "the messages queued in it were not delivered", path, reason, target)
    return {"moved_to": str(target), "reason": reason, "at": now.isoformat(timespec="seconds")}


class _Delta:
    """Changes of one transaction, applied to the in-memory counters only once it committed."""

    __slots__ = ("rows", "bytes", "dropped", "coalesced")

    def __init__(self) -> None:
        self.rows = 0
        self.bytes = 0
        self.dropped: List[str] = []  # kind of each row removed by the bound policy
        self.coalesced: List[str] = []  # kind of each row replaced by a newer one with the same key


class Outbox:
    def __init__(
        self,
        path: Union[str, Path],
        *,
        max_rows: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        drop: DropPolicy = "oldest_position_first",
        synchronous: Synchronous = "normal",
        busy_timeout_s: float = 5.0,
    ):
        if drop not in ("oldest_position_first", "oldest"):
            raise ValueError(f"outbox drop policy must be 'oldest_position_first' or 'oldest', got {drop!r}")
        if synchronous not in ("normal", "full"):
            raise ValueError(f"outbox synchronous must be 'normal' or 'full', got {synchronous!r}")
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("outbox max_rows and max_bytes must be >= 1")
        if not busy_timeout_s >= 0:
            raise ValueError(f"outbox busy_timeout_s must be >= 0, got {busy_timeout_s!r}")
        self.path = Path(path)
        self.max_rows = int(max_rows)
        self.max_bytes = int(max_bytes)
        self.drop_policy = drop
        self.synchronous = synchronous
        # How long a write waits for a lock held by another connection before OutboxError.
        self.busy_timeout_s = float(busy_timeout_s)
        # Set when a damaged file was moved aside: {"moved_to", "reason", "at"} (for stats).
        self.recovered: Optional[Dict[str, str]] = None
        self._lock = threading.Lock()
        self._listeners: List[Callable[[], None]] = []
        self.dropped: Counter = Counter()  # kind -> rows removed by the bound policy since open
        self.coalesced: Counter = Counter()  # kind -> rows replaced by a newer one with the same key
        # One connection shared under a lock: SQLite serialises writers anyway, and the lock
        # keeps the in-memory depth/bytes counters consistent with the table.
        self._db, self._rows, self._bytes, self._last_id = self._connect()
        self._closed = False

    def _connect(self) -> Tuple[sqlite3.Connection, int, int, int]:
        """Open and check the file: (connection, rows, payload bytes, last row id handed out)."""
        path = self.path
        try:
            if not path.parent.is_dir():
                ensure_private_dir(path.parent)
            if os.path.lexists(path) and not path.is_file():
                raise OutboxCorruptError(path, "not a regular file")
            # Created here, 0600, before SQLite would create it with the umask's mode.
            os.close(open_private(path, os.O_RDWR | os.O_CREAT))
        except OSError as exc:
            raise OutboxError(f"outbox {path}: {exc.strerror or exc}") from None
        db = None
        try:
            self._check_file()
            db = sqlite3.connect(str(path), timeout=self.busy_timeout_s, check_same_thread=False,
                                 isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.executescript(_SCHEMA)
            rows, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            for side in _sidecars(path):  # SQLite copies the file's mode; older versions' files get fixed
                make_private(side)
        except BaseException as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.Error):
                if _is_corruption(exc):
                    raise OutboxCorruptError(path, str(exc)) from None
                raise OutboxError(f"outbox {path}: cannot open: {exc}") from None
            if isinstance(exc, OSError):
                raise OutboxError(f"outbox {path}: {exc.strerror or exc}") from None
            raise
        return db, int(rows), int(size), int(seq[0]) if seq else 0

    def _check_file(self) -> None:
        """quick_check and the table's columns, through a read-only connection: closing it never
        checkpoints a WAL into the file or deletes it, so a damaged file is moved aside as found."""
        con = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True,
                              timeout=self.busy_timeout_s, isolation_level=None)
        try:
            problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise OutboxCorruptError(self.path, "quick_check: " + "; ".join(map(str, problems[:3])))
            columns = tuple(r[1] for r in con.execute("PRAGMA table_info(outbox)"))
            if columns and columns != _COLUMNS:
                raise OutboxCorruptError(self.path, f"not an edged outbox (table columns {', '.join(columns)})")
        finally:
            con.close()

    @classmethod
    def open_or_recover(cls, path: Union[str, Path], cfg=None, **overrides) -> "Outbox":
        """Open the outbox; a corrupt file is moved aside (never deleted), logged as an ERROR and
        replaced by a fresh one (`recovered` tells where it went). `cfg` is an OutboxConfig
        (edged.config); keyword arguments override it. Raises OutboxError only when a fresh outbox
        cannot be created either (state directory not writable, disk full)."""
        kwargs = {**(cls._config_kwargs(cfg) if cfg is not None else {}), **overrides}
        try:
            return cls(path, **kwargs)
        except OutboxCorruptError as exc:
            recovered = _move_aside(Path(path), exc.reason)
        ob = cls(path, **kwargs)
        ob.recovered = recovered
        return ob

    def recover(self, reason: str) -> Dict[str, str]:
        """Damage found while running: move the file aside and go on with a fresh, empty outbox in
        this same object (the publisher and the pipeline keep their reference). New row ids continue
        above the last one handed out, so the publisher's cursor stays valid. Returns `recovered`."""
        with self._lock:
            self._ensure_open()
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._closed = True  # until a fresh database is open
            recovered = _move_aside(self.path, reason)
            db, rows, size, _ = self._connect()
            try:
                db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('outbox', ?)", (self._last_id,))
            except sqlite3.Error as exc:
                db.close()
                raise OutboxError(f"outbox {self.path}: cannot start a fresh outbox: {exc}") from exc
            self._db, self._rows, self._bytes, self._closed = db, rows, size, False
            self.recovered = recovered
            return recovered

    def _error(self, action: str, exc: sqlite3.Error) -> OutboxError:
        if _is_corruption(exc):
            return OutboxCorruptError(self.path, f"{action}: {exc}")
        return OutboxError(f"outbox {self.path}: {action} failed: {exc}")

    def _write(self, action: str, work: Callable[[sqlite3.Cursor, _Delta], T]) -> T:
        """`work(cursor, delta)` inside BEGIN IMMEDIATE ... COMMIT. On any error: ROLLBACK, the
        counters stay as they were, and OutboxError is raised."""
        delta = _Delta()
        with self._lock:
            self._ensure_open()
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")  # waits up to busy_timeout_s for another writer
                try:
                    result = work(cur, delta)
                    cur.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        try:
                            cur.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass  # the first error is the one to report
                    raise
            except sqlite3.Error as exc:
                raise self._error(action, exc) from exc
            self._rows += delta.rows
            self._bytes += delta.bytes
            self.dropped.update(delta.dropped)
            self.coalesced.update(delta.coalesced)
        return result

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

        def work(cur: sqlite3.Cursor, delta: _Delta) -> List[int]:
            ids = []
            for topic, payload, qos, retain, kind, key in rows:
                if key is not None:
                    replaced = cur.execute("SELECT kind, size FROM outbox WHERE coalesce_key = ?", (key,)).fetchall()
                    if replaced:
                        cur.execute("DELETE FROM outbox WHERE coalesce_key = ?", (key,))
                        for rkind, size in replaced:
                            delta.rows -= 1
                            delta.bytes -= size
                            delta.coalesced.append(rkind)
                cur.execute(
                    "INSERT INTO outbox(topic, payload, qos, retain, kind, coalesce_key, created, size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (topic, payload, qos, int(retain), kind, key, now, len(payload)),
                )
                ids.append(int(cur.lastrowid))
                delta.rows += 1
                delta.bytes += len(payload)
            self._enforce_bounds(cur, delta)
            self._last_id = ids[-1]  # (a rolled-back id only leaves a gap after recover())
            return ids

        ids = self._write("put", work)
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

    def _enforce_bounds(self, cur: sqlite3.Cursor, delta: _Delta) -> None:
        def over_rows() -> int:
            return self._rows + delta.rows - self.max_rows

        def over_bytes() -> int:
            return self._bytes + delta.bytes - self.max_bytes

        if over_rows() <= 0 and over_bytes() <= 0:
            return
        passes = ["position", None] if self.drop_policy == "oldest_position_first" else [None]
        for kind in passes:
            while over_rows() > 0 or over_bytes() > 0:
                # Delete in chunks sized to the excess rows (at least 1, bytes may need more).
                n = min(over_rows() if over_rows() > 0 else 256, _MAX_PARAMS)
                where = "WHERE kind = ?" if kind else ""
                args: tuple = (kind, n) if kind else (n,)
                victims = cur.execute(
                    f"SELECT id, kind, size FROM outbox {where} ORDER BY id LIMIT ?", args
                ).fetchall()
                if not victims:
                    break
                if over_rows() <= 0:  # only bytes are over: take just enough
                    need, acc, cut = over_bytes(), 0, 0
                    for cut, (_i, _k, size) in enumerate(victims, 1):
                        acc += size
                        if acc >= need:
                            break
                    victims = victims[:cut]
                marks = ",".join("?" * len(victims))
                cur.execute(f"DELETE FROM outbox WHERE id IN ({marks})", [v[0] for v in victims])
                for _i, vkind, size in victims:
                    delta.rows -= 1
                    delta.bytes -= size
                    delta.dropped.append(vkind)

    # ------------------------------------------------------------------------------------ reading
    def peek(self, limit: int = 100, after_id: int = 0) -> List[OutboxRow]:
        """Up to `limit` queued rows with id > after_id, oldest first (rows stay queued)."""
        with self._lock:
            self._ensure_open()
            try:
                rows = self._db.execute(
                    "SELECT id, topic, payload, qos, retain, kind, coalesce_key, created FROM outbox"
                    " WHERE id > ? ORDER BY id LIMIT ?",
                    (int(after_id), int(limit)),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._error("peek", exc) from exc
        return [OutboxRow(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6], r[7]) for r in rows]

    def oldest_created(self) -> Optional[float]:
        """When the oldest queued row was put (epoch seconds), None when nothing is queued: its age
        is how far delivery lags. One step down the primary key, no scan."""
        with self._lock:
            self._ensure_open()
            try:
                row = self._db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
            except sqlite3.Error as exc:
                raise self._error("oldest_created", exc) from exc
        return None if row is None else float(row[0])

    def ack(self, row_id: int) -> bool:
        """Delete a delivered row. False if it was already gone (dropped, coalesced, acked)."""
        return self.ack_many([row_id]) == 1

    def ack_many(self, row_ids: Iterable[int]) -> int:
        """Delete several delivered rows in one transaction; returns how many existed."""
        ids = sorted({int(i) for i in row_ids})
        if not ids:
            return 0

        def work(cur: sqlite3.Cursor, delta: _Delta) -> int:
            for start in range(0, len(ids), _MAX_PARAMS):
                chunk = ids[start:start + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                sizes = cur.execute(f"SELECT size FROM outbox WHERE id IN ({marks})", chunk).fetchall()
                if sizes:
                    cur.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
                    delta.rows -= len(sizes)
                    delta.bytes -= sum(s for (s,) in sizes)
            return -delta.rows

        return self._write("ack", work)

    def depth(self) -> int:
        return self._rows

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

    @staticmethod
    def _config_kwargs(cfg) -> Dict[str, object]:
        kwargs: Dict[str, object] = dict(max_rows=cfg.max_rows, max_bytes=cfg.max_bytes, drop=cfg.drop,
                                         synchronous=getattr(cfg, "synchronous", "normal"))
        return kwargs

    @classmethod
    def from_config(cls, cfg, path: Union[str, Path]) -> "Outbox":
        """Build from an OutboxConfig (edged.config); a corrupt file raises OutboxCorruptError
        (use open_or_recover() to move it aside instead)."""
        return cls(path, **cls._config_kwargs(cfg))
