"""The durable outbox: order, ack, bounds + drop policy, coalescing, durability across SIGKILL, threads,
damaged files (moved aside, never deleted), full or read-only disks, locks held by another writer."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from edged.config import OutboxConfig
from edged.mqtt.outbox import Outbox, OutboxCorruptError, OutboxError
from tests.conftest import missing

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ob(tmp_path):
    o = Outbox(tmp_path / "ob.sqlite", max_rows=1000, max_bytes=1_000_000)
    yield o
    o.close()


def test_put_peek_ack_in_insertion_order(ob):
    ids = [ob.put("t/a", f"m{i}".encode(), qos=1) for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    rows = ob.peek(10)
    assert [r.payload for r in rows] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert rows[0].topic == "t/a" and rows[0].qos == 1 and rows[0].retain is False and rows[0].kind == "event"
    assert ob.depth() == 5 and ob.bytes() == 10
    assert ob.ack(ids[1]) is True
    assert ob.ack(ids[1]) is False  # already gone
    assert [r.payload for r in ob.peek(10)] == [b"m0", b"m2", b"m3", b"m4"]
    assert [r.payload for r in ob.peek(2, after_id=ids[2])] == [b"m3", b"m4"]
    assert ob.depth() == 4 and ob.bytes() == 8


def test_ids_never_reused_after_ack(ob):
    a = ob.put("t", b"x")
    ob.ack(a)
    b = ob.put("t", b"y")
    assert b > a  # the publisher's "sent up to id" cursor relies on this


def test_str_payload_and_bad_input(ob):
    ob.put("t", "héllo")
    assert ob.peek(1)[0].payload == "héllo".encode()
    with pytest.raises(ValueError, match="qos"):
        ob.put("t", b"x", qos=3)
    with pytest.raises(ValueError, match="topic"):
        ob.put("t/#", b"x")
    with pytest.raises(TypeError, match="bytes"):
        ob.put("t", 42)
    with pytest.raises(ValueError, match="max_bytes"):
        ob.put("t", b"x" * 2_000_000)
    with pytest.raises(ValueError, match="drop policy"):
        Outbox(ob.path, drop="newest")


def test_row_bound_drops_positions_first_then_oldest(tmp_path):
    o = Outbox(tmp_path / "b.sqlite", max_rows=10, max_bytes=10_000)
    for i in range(6):
        o.put("ev", f"e{i}".encode(), kind="event")
    for i in range(4):
        o.put("tr", f"p{i}".encode(), kind="position", qos=0)
    assert o.depth() == 10
    o.put("ev", b"e6", kind="event")  # 11 rows: the oldest position goes
    assert o.depth() == 10
    assert [r.payload for r in o.peek(20)] == [b"e0", b"e1", b"e2", b"e3", b"e4", b"e5", b"p1", b"p2", b"p3", b"e6"]
    for i in range(7, 12):
        o.put("ev", f"e{i}".encode(), kind="event")
    # 3 positions left to drop, then the oldest events
    payloads = [r.payload for r in o.peek(20)]
    assert all(not p.startswith(b"p") for p in payloads)
    assert payloads == [f"e{i}".encode() for i in range(2, 12)]
    assert o.counters()["dropped"] == {"position": 4, "event": 2}
    o.close()


def test_oldest_policy_ignores_kind(tmp_path):
    o = Outbox(tmp_path / "c.sqlite", max_rows=3, max_bytes=10_000, drop="oldest")
    o.put("ev", b"e0", kind="event")
    o.put("tr", b"p0", kind="position")
    o.put("ev", b"e1", kind="event")
    o.put("ev", b"e2", kind="event")
    assert [r.payload for r in o.peek(10)] == [b"p0", b"e1", b"e2"]
    assert o.counters()["dropped"] == {"event": 1}
    o.close()


def test_byte_bound(tmp_path):
    o = Outbox(tmp_path / "d.sqlite", max_rows=1000, max_bytes=1024)
    for i in range(10):
        o.put("ev", bytes([65 + i]) * 200, kind="event")
    assert o.bytes() <= 1024 and o.depth() == 5
    assert [r.payload[:1] for r in o.peek(10)] == [b"F", b"G", b"H", b"I", b"J"]
    assert sum(o.counters()["dropped"].values()) == 5
    o.close()


def test_coalesce_replaces_unsent_row_with_same_key(ob):
    ob.put("ev", b"e0")
    ob.put("st", b"s0", retain=True, kind="state", coalesce_key="state")
    ob.put("ev", b"e1")
    ob.put("st", b"s1", retain=True, kind="state", coalesce_key="state")
    ob.put("sx", b"x0", kind="stats", coalesce_key="stats")
    rows = ob.peek(10)
    assert [r.payload for r in rows] == [b"e0", b"e1", b"s1", b"x0"]
    assert rows[2].retain is True and rows[2].coalesce_key == "state"
    assert ob.counters()["coalesced"] == {"state": 1}
    assert ob.depth() == 4 and ob.bytes() == 8


def test_reopen_keeps_rows_and_counts(tmp_path):
    p = tmp_path / "e.sqlite"
    o = Outbox(p)
    o.put_many([("t", f"m{i}".encode(), 1, False, "event", None) for i in range(50)])
    o.close()
    o2 = Outbox(p)
    assert o2.depth() == 50 and o2.bytes() == sum(len(f"m{i}") for i in range(50))
    assert o2.peek(1)[0].payload == b"m0"
    o2.close()
    with pytest.raises(OutboxError, match="closed"):
        o2.put("t", b"x")


def test_not_a_database_is_a_clear_error(tmp_path):
    p = tmp_path / "junk.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match="junk.sqlite"):
        Outbox(p)


def test_from_config(tmp_path):
    o = Outbox.from_config(OutboxConfig(max_rows=10, drop="oldest", synchronous="full"), tmp_path / "f.sqlite")
    assert o.max_rows == 10 and o.drop_policy == "oldest"
    o.close()


def test_threads_put_and_ack_concurrently(ob):
    n_threads, per = 4, 200
    acked = []

    def producer(k):
        for i in range(per):
            ob.put("t", f"{k}:{i}".encode())

    def consumer(done: threading.Event):
        cursor = 0
        while not (done.is_set() and ob.depth() == 0):
            rows = ob.peek(50, after_id=cursor)
            if rows:
                cursor = rows[-1].id
                assert ob.ack_many(r.id for r in rows) == len(rows)
                acked.extend(r.payload for r in rows)

    done = threading.Event()
    c = threading.Thread(target=consumer, args=(done,))
    c.start()
    ps = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    done.set()
    c.join(30)
    assert not c.is_alive()
    assert len(acked) == n_threads * per == len(set(acked))
    for k in range(n_threads):  # per-producer order is kept
        mine = [int(p.split(b":")[1]) for p in acked if p.startswith(f"{k}:".encode())]
        assert mine == list(range(per))
    assert ob.depth() == 0 and ob.bytes() == 0


def test_sigkill_loses_nothing_put_returned(tmp_path):
    """A child process puts rows and reports each id after put() returned, then is SIGKILLed."""
    db = tmp_path / "crash.sqlite"
    root = Path(__file__).resolve().parent.parent
    code = textwrap.dedent(f"""
        import sys, os, signal
        sys.path.insert(0, {str(root)!r})
        from edged.mqtt.outbox import Outbox
        o = Outbox({str(db)!r})
        for i in range(100000):
            rid = o.put("t", str(i).encode())
            sys.stdout.write(f"{{rid}} {{i}}\\n"); sys.stdout.flush()
            if i == 300:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-stream, no close(), no atexit
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9
    promised = [tuple(map(int, line.split())) for line in proc.stdout.splitlines()]
    assert len(promised) == 301
    o = Outbox(db)
    rows = {r.id: r.payload for r in o.peek(100000)}
    for rid, i in promised:
        assert rows.get(rid) == str(i).encode()
    o.close()


# ------------------------------------------------------------------------------ damaged files
def _filled(path: Path, n: int = 2000) -> Path:
    """A real outbox file with `n` rows of 300 random bytes (several hundred KiB of pages)."""
    with Outbox(path) as o:
        o.put_many([("t", os.urandom(300), 1, False, "event", None) for _ in range(n)])
    return path


def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(20_000))


def _truncated(p: Path) -> None:
    _filled(p)
    os.truncate(p, p.stat().st_size // 2)


def _broken_pages(p: Path) -> None:
    """The SQLite header is intact, some b-tree pages are overwritten."""
    _filled(p)
    data = bytearray(p.read_bytes())
    for off in range(3 * 4096, len(data), 7 * 4096):
        data[off:off + 200] = os.urandom(200)
    p.write_bytes(bytes(data))


def _directory(p: Path) -> None:
    p.mkdir()
    (p / "inside").write_text("kept")


def _stale_wal(p: Path) -> None:
    """A -wal/-shm pair left by another database (valid frames that do not belong to this file)."""
    other = p.with_name("other.sqlite3")
    _filled(other, 10)
    con = sqlite3.connect(other, isolation_level=None)
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("INSERT INTO outbox(topic, payload, qos, retain, kind, created, size) VALUES ('x', x'00', 1, 0, 'e', 0, 1)")
    wal, shm = Path(f"{other}-wal").read_bytes(), Path(f"{other}-shm").read_bytes()
    con.close()
    _filled(p)
    Path(f"{p}-wal").write_bytes(wal)
    Path(f"{p}-shm").write_bytes(shm)


def _foreign_table(p: Path) -> None:
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, body TEXT)")
    con.commit()
    con.close()


@pytest.mark.parametrize("damage", [_garbage, _truncated, _broken_pages, _directory, _stale_wal, _foreign_table],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupt_outbox_is_moved_aside_and_a_fresh_one_used(tmp_path, caplog, damage):
    path = tmp_path / "outbox.sqlite3"
    damage(path)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.glob("outbox.sqlite3*")}
    with pytest.raises(OutboxCorruptError, match="outbox.sqlite3"):
        Outbox(path)  # the plain constructor refuses it...
    caplog.set_level(logging.ERROR, logger="edged.mqtt.outbox")
    o = Outbox.open_or_recover(path, OutboxConfig(max_rows=100))  # ...open_or_recover moves it aside
    try:
        rec = o.recovered
        assert rec is not None and rec["reason"]
        moved = Path(rec["moved_to"])
        assert re.fullmatch(r"outbox\.sqlite3\.corrupt-\d{8}T\d{6}Z", moved.name)
        assert abs(datetime.fromisoformat(rec["at"]).timestamp() - time.time()) < 3600
        # Nothing deleted: every file (and the -wal/-shm beside it) is there under the new name, unchanged.
        for name, content in before.items():
            kept = tmp_path / name.replace("outbox.sqlite3", moved.name, 1)
            assert kept.exists(), kept
            if content is not None and not name.endswith("-shm"):  # -shm is an index SQLite rebuilds
                assert kept.read_bytes() == content, kept
        if damage is _directory:
            assert (moved / "inside").read_text() == "kept"
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and str(path) in errors[0] and str(moved) in errors[0]
        # The fresh outbox at the original path works.
        assert o.max_rows == 100 and o.depth() == 0 and path.is_file()
        rid = o.put("t", b"fresh")
        assert [r.payload for r in o.peek(10)] == [b"fresh"] and o.ack(rid) and o.depth() == 0
    finally:
        o.close()
    with Outbox.open_or_recover(path) as again:  # the fresh file is healthy: nothing moved this time
        assert again.recovered is None


def test_healthy_outbox_and_discardable_wal_are_not_moved(tmp_path):
    path = _filled(tmp_path / "outbox.sqlite3", 50)
    # A -wal/-shm of garbage (no valid frame) is ignored and rebuilt by SQLite: the rows are intact.
    Path(f"{path}-wal").write_bytes(os.urandom(5000))
    Path(f"{path}-shm").write_bytes(os.urandom(32768))
    with Outbox.open_or_recover(path) as o:
        assert o.recovered is None and o.depth() == 50 and o.bytes() == 50 * 300
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []


def test_second_corruption_in_the_same_second_gets_its_own_name(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    moved = []
    for _ in range(2):
        _garbage(path)
        with Outbox.open_or_recover(path) as o:
            moved.append(o.recovered["moved_to"])
    assert moved[0] != moved[1] and all(Path(m).is_file() for m in moved)


def test_unwritable_state_dir_is_an_outbox_error_not_a_recovery(tmp_path):
    """A read-only file system (an SD card the kernel remounted read-only) in a private mount namespace."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        missing("needs root and unshare(1) to mount a read-only file system")
    state = tmp_path / "state"
    state.mkdir()
    _filled(state / "outbox.sqlite3", 5)
    (state / "outbox.sqlite3-wal").unlink(missing_ok=True)  # as after a clean stop
    (state / "outbox.sqlite3-shm").unlink(missing_ok=True)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from edged.mqtt.outbox import Outbox, OutboxError, OutboxCorruptError
        for name in ("outbox.sqlite3", "new/outbox.sqlite3"):
            try:
                Outbox.open_or_recover({str(state)!r} + "/" + name)
            except OutboxCorruptError as exc:
                print("WRONGLY CORRUPT", exc)
            except OutboxError as exc:
                print("OutboxError:", exc)
    """)
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -c "$3"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                           str(state), sys.executable, code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("OutboxError:") for line in lines), proc.stdout
    assert str(state / "outbox.sqlite3") in lines[0] and str(state / "new") in lines[1]
    assert sorted(p.name for p in state.iterdir()) == ["outbox.sqlite3"]  # nothing moved


def test_state_dir_that_is_a_file_is_an_outbox_error(tmp_path):
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(OutboxError, match="state") as err:
        Outbox.open_or_recover(tmp_path / "state" / "outbox.sqlite3")
    assert not isinstance(err.value, OutboxCorruptError)
    assert (tmp_path / "state").read_text() == "not a directory"


_DISK_FULL = """
import os, resource, signal, sqlite3, sys
sys.path.insert(0, {root!r})
from edged.mqtt.outbox import Outbox, OutboxError, OutboxCorruptError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past RLIMIT_FSIZE fail with EFBIG, like a full disk
path = {path!r}
unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
try:
    Outbox.open_or_recover(path)
    print("opened")
except OutboxCorruptError as exc:
    print("WRONGLY CORRUPT", exc)
except OutboxError as exc:
    print("open:", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
o = Outbox.open_or_recover(path)
o.put_many([("t", b"x" * 300, 1, False, "event", None) for _ in range(100)])
o.put("st", b"s0", retain=True, kind="state", coalesce_key="state")
room = max(os.path.getsize(path), os.path.getsize(path + "-wal")) + 8192
resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
batch = [("st", b"s1", 1, True, "state", "state")] + [("t", b"y" * 300, 1, False, "event", None)] * 200
try:
    o.put_many(batch)
    print("put: no error")
except OutboxError as exc:
    print("put:", exc)
print("after failure", o.depth(), o.bytes(), o.counters()["coalesced"])
resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
o.put_many(batch)
print("after retry", o.depth(), o.bytes(), o.counters()["coalesced"])
o.close()
con = sqlite3.connect(path)
print("table", *con.execute("SELECT COUNT(*), SUM(size) FROM outbox").fetchone())
"""


def test_disk_full_raises_outbox_error_and_keeps_counters_exact(tmp_path):
    path = tmp_path / "state" / "outbox.sqlite3"
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL.format(root=str(ROOT), path=str(path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    # Start-up on a full disk: an OutboxError naming the file, not a "corrupt" recovery.
    assert out[0].startswith("open: outbox ") and str(path) in out[0], out
    assert not list(path.parent.glob("*corrupt*"))
    # Mid-transaction failure (the coalesced row was already deleted inside it): nothing changed.
    assert out[1].startswith("put: outbox ") and str(path) in out[1], out
    assert out[2] == "after failure 101 30002 {}"
    assert out[3] == f"after retry {100 + 200 + 1} {100 * 300 + 200 * 300 + 2} {{'state': 1}}"
    assert out[4] == f"table {100 + 200 + 1} {100 * 300 + 200 * 300 + 2}"


def test_write_lock_held_elsewhere_raises_then_recovers_with_exact_counters(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    o = Outbox(path, busy_timeout_s=0.2)
    assert o.busy_timeout_s == 0.2
    ids = o.put_many([("t", f"m{i}".encode(), 1, False, "event", None) for i in range(10)])
    o.put("st", b"s0", kind="state", coalesce_key="state")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(OutboxError, match="locked") as err:
            o.put("st", b"s1", kind="state", coalesce_key="state")
        assert str(path) in str(err.value) and isinstance(err.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(OutboxError, match="locked"):
            o.put_many([("t", b"new", 1, False, "event", None)] * 3)
        with pytest.raises(OutboxError, match="locked"):
            o.ack_many(ids[:5])
        assert o.depth() == 11 and o.bytes() == 10 * 2 + 2 and o.counters()["coalesced"] == {}
        assert len(o.peek(100)) == 11  # readers are not blocked (WAL)
        # Opening while another process writes is not "corrupt" either.
        with Outbox.open_or_recover(path, busy_timeout_s=0.2) as second:
            assert second.recovered is None and second.depth() == 11
    finally:
        other.execute("ROLLBACK")
        other.close()
    o.put("st", b"s1", kind="state", coalesce_key="state")
    assert o.ack_many(ids[:5]) == 5
    assert o.depth() == 6 and o.bytes() == 5 * 2 + 2 and o.counters()["coalesced"] == {"state": 1}
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT COUNT(*), SUM(size) FROM outbox").fetchone() == (6, 12)
    o.close()
    with pytest.raises(ValueError, match="busy_timeout_s"):
        Outbox(path, busy_timeout_s=-1)


def test_corruption_while_running_raises_and_recover_continues_in_place(tmp_path, caplog):
    path = tmp_path / "outbox.sqlite3"
    o = Outbox(path)
    ids = o.put_many([("t", os.urandom(300), 1, False, "event", None) for _ in range(2000)])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row now lives in the main file
    with open(path, "r+b") as fh:  # the SD card loses the table's pages
        for off in range(2 * 4096, path.stat().st_size, 4096):
            fh.seek(off)
            fh.write(os.urandom(4096))
    other.execute("CREATE TABLE poke (x)")  # another write, so the outbox connection re-reads its pages
    other.close()
    with pytest.raises(OutboxCorruptError, match="malformed"):
        o.peek(5000)
    with pytest.raises(OutboxCorruptError):
        o.ack_many(ids[:10])
    caplog.set_level(logging.ERROR, logger="edged.mqtt.outbox")
    rec = o.recover("peek: database disk image is malformed")
    assert o.recovered == rec and Path(rec["moved_to"]).is_file()
    assert any(rec["moved_to"] in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert o.depth() == 0 and o.bytes() == 0
    new = o.put("t", b"after")
    assert new > ids[-1]  # the publisher's "sent up to" cursor stays valid
    assert [r.payload for r in o.peek(10, after_id=ids[-1])] == [b"after"]
    o.close()


def test_oldest_created(tmp_path):
    path = tmp_path / "o.sqlite3"
    o = Outbox(path)
    assert o.oldest_created() is None
    t0 = time.time()
    a = o.put("t", b"a")
    b = o.put("t", b"b")
    first, second = (r.created for r in o.peek(2))
    assert t0 <= first <= second <= time.time()
    assert o.oldest_created() == first
    o.ack(a)
    assert o.oldest_created() == second
    o.close()
    with Outbox(path) as again:
        assert again.oldest_created() == second
        again.ack(b)
        assert again.oldest_created() is None
