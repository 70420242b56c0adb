"""Faults under the running daemon (real process, real broker, real video): a broken outbox in the
publisher path (transient and permanent) and a silent network partition."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, need_module
from tests.mqttutil import Collector
from tests.netutil import ProcessOutput, StallingProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory):
    need_module("skimage")
    from edged import scene

    d = tmp_path_factory.mktemp("scene")
    return Path(scene.write_video(scene.default_scene(), d / "scene.mp4"))


def _config(tmp_path: Path, port: int, video: Path, **sections) -> Path:
    cfg = {
        "device_id": "faulty",
        "state_dir": str(tmp_path / "state"),
        "capture": {"source": str(video), "name": "cam0"},
        "detector": {"classes": ["person", "cat", "cup"]},
        "mqtt": {"host": "127.0.0.1", "port": port, "qos_tracks": 1, "stats_interval_s": 1.0, "keepalive": 5},
        "web": {"enabled": False},
        "supervisor": {"backoff_min_s": 0.2, "backoff_max_s": 1.0},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "edged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _spawn(config: Path) -> ProcessOutput:
    proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(config), "--print-events"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return ProcessOutput(proc)


def _printed(out: ProcessOutput) -> list:
    return [json.loads(line) for line in out.stdout if line.startswith("{")]


def _received(sub: Collector) -> list:
    return sub.payloads("/events") + sub.payloads("/tracks")


def _lock_outbox(state: Path) -> sqlite3.Connection:
    """Another process's write lock on the daemon's outbox: every write (put, ack) fails with
    `database is locked` after the busy timeout, as a stuck backup job or a failing SD card would."""
    db = sqlite3.connect(str(state / "outbox.sqlite3"), isolation_level=None, timeout=30)
    db.execute("BEGIN EXCLUSIVE")
    return db


def test_outbox_fault_in_the_publisher_path_then_every_event_arrives(tmp_path, broker, demo_video):
    sub = Collector(broker.port, "edged/faulty/#")
    cfg = _config(tmp_path, broker.port, demo_video, capture={"fps_cap": 15.0})
    out = _spawn(cfg)
    lock = None
    try:
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/events") for m in ms), 90), "no event before the fault"
        # Messages in flight when the fault starts: freeze the broker, let rows be sent, lock the
        # outbox, thaw the broker: its PUBACKs arrive and deleting the acknowledged rows fails.
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            n = len(_printed(out))
            assert out.wait_for(lambda: len(_printed(out)) >= n + 3, 60)
            lock = _lock_outbox(tmp_path / "state")
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        assert out.wait_stderr("stage publisher failed", 60), "\n".join(out.stderr[-20:])
        lock.rollback()
        lock.close()
        lock = None
        rc = out.wait_exit(180)
        assert rc == 0, "\n".join(out.stderr[-30:])
        printed = _printed(out)  # printed only once committed to the outbox
        assert sub.wait_for(lambda ms: len({e["event_id"] for e in _received(sub)}) >= len(printed), 60)
        got = {e["event_id"] for e in _received(sub)}
        assert {e["event_id"] for e in printed} <= got, "events committed to the outbox were lost"
        seqs = sorted(e["seq"] for e in printed)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gap: nothing was dropped on the way"
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/availability") and m.payload == b"offline" for m in ms), 30)
        stats = sub.payloads("/stats")
        assert stats[-1]["stages"]["publisher"]["failures"] >= 1, "the failure is counted in stats"
        assert any("restarting in" in ln for ln in out.stderr)
    finally:
        if lock is not None:
            lock.close()
        out.stop()
        sub.close()


def test_permanent_outbox_fault_exits_nonzero_and_the_broker_publishes_offline(tmp_path, broker, demo_video):
    sub = Collector(broker.port, "edged/faulty/availability")
    cfg = _config(tmp_path, broker.port, demo_video, capture={"fps_cap": 10.0, "loop": True},
                  supervisor={"max_restarts": 1, "backoff_min_s": 0.2, "backoff_max_s": 0.5})
    out = _spawn(cfg)
    lock = None
    try:
        assert sub.wait_for(lambda ms: any(m.payload == b"online" for m in ms), 90)
        lock = _lock_outbox(tmp_path / "state")
        rc = out.wait_exit(120)
        assert rc == 70, f"exit code {rc}\n" + "\n".join(out.stderr[-20:])  # edged.exitcodes.STAGE_FAILED
        assert any("kept failing" in ln for ln in out.stderr)
        # No clean DISCONNECT: the broker sends the last will.
        assert sub.wait_for(lambda ms: ms and ms[-1].payload == b"offline", 30)
        assert not any("mqtt: disconnected" in ln for ln in out.stderr)
    finally:
        if lock is not None:
            lock.close()
        out.stop()
        sub.close()


def test_silent_partition_is_noticed_within_keepalive_and_loses_nothing(tmp_path, broker, demo_video):
    proxy = StallingProxy(broker.port)
    sub = Collector(broker.port, "edged/faulty/#")  # the consumer's own link stays up
    cfg = _config(tmp_path, proxy.port, demo_video, capture={"fps_cap": 10.0})
    out = _spawn(cfg)
    try:
        assert sub.wait_for(lambda ms: sum(m.topic.endswith("/events") for m in ms) >= 1, 90)
        proxy.stall()
        n_printed = len(_printed(out))
        assert out.wait_stderr("link stalled", 60), "\n".join(out.stderr[-20:])
        # Events keep being produced (and committed) while the link is dead.
        assert out.wait_for(lambda: len(_printed(out)) > n_printed + 5, 60)
        proxy.resume()
        rc = out.wait_exit(180)
        assert rc == 0, "\n".join(out.stderr[-30:])
        printed = _printed(out)
        assert sub.wait_for(lambda ms: {e["event_id"] for e in printed} <= {e["event_id"] for e in _received(sub)}, 60), \
            "events lost across the partition"
        dup = sum(n - 1 for n in Counter(e["event_id"] for e in _received(sub)).values() if n > 1)
        assert dup <= 20, f"{dup} duplicates: more than one in-flight window (max_inflight) re-sent"
        assert proxy.connections >= 2, "the daemon reconnected through the proxy after the stall"
        stall_line = next(ln for ln in out.stderr if "link stalled" in ln)
        assert "no acknowledgement" in stall_line
    finally:
        out.stop()
        sub.close()
        proxy.close()


def test_a_corrupt_outbox_is_moved_aside_and_the_daemon_starts(tmp_path, broker, demo_video):
    """SD-card damage: the outbox file holds garbage. The daemon keeps the file (renamed, never deleted),
    reports it in the log and in stats, and runs on a fresh outbox."""
    state = tmp_path / "state"
    state.mkdir()
    damaged = b"SQLite format 3\x00" + bytes(range(256)) * 64
    (state / "outbox.sqlite3").write_bytes(damaged)
    sub = Collector(broker.port, "edged/faulty/#")
    out = _spawn(_config(tmp_path, broker.port, demo_video))
    try:
        assert out.wait_exit(180) == 0, "\n".join(out.stderr[-20:])
        kept = sorted(state.glob("outbox.sqlite3.corrupt-*"))
        assert len(kept) == 1 and kept[0].read_bytes() == damaged
        assert any(" ERROR " in ln and "outbox" in ln and kept[0].name in ln for ln in out.stderr), out.stderr[-20:]
        assert sub.wait_for(lambda ms: any(m.payload == b"offline" for m in sub.on("/availability")), 30)
        assert sub.payloads("/events"), "events delivered through the fresh outbox"
        recovered = [s["outbox_recovered"] for s in sub.payloads("/stats") if "outbox_recovered" in s]
        assert recovered and recovered[-1]["moved_to"].endswith(kept[0].name)
    finally:
        out.stop()
        sub.close()
