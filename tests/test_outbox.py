"""The durable outbox: order, ack, bounds + drop policy, coalescing, durability across SIGKILL, threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edged.config import OutboxConfig
from edged.mqtt.outbox import Outbox, OutboxError


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
