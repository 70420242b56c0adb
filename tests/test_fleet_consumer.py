"""examples/fleet_consumer.py: de-duplication, per-site live counts against the devices' own `state`, MQTT 5
shared subscriptions on mosquitto, the 3.1.1 fallback on NATS; real devices (`edged replay` with a site)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import ROOT
from netutil import ProcessOutput
from _replay_device import ReplayDevice

sys.path.insert(0, str(ROOT / "examples"))
import fleet_consumer  # noqa: E402


def _ev(event_id: str, kind: str, frame: int, cls: str = "person") -> dict:
    return {"event_id": event_id, "type": kind, "frame": frame, "class": cls}


def test_counts_deduplicate_and_follow_device_restarts():
    c = fleet_consumer.FleetCounts()
    assert c.event("s1", "d1", _ev("a", "enter", 5))
    assert not c.event("s1", "d1", _ev("a", "enter", 5))  # at-least-once: the duplicate is dropped
    c.event("s1", "d1", _ev("b", "enter", 6))
    c.event("s1", "d2", _ev("c", "enter", 3, "car"))
    c.event("s2", "d3", _ev("d", "enter", 9))
    c.event("s1", "d1", _ev("e", "exit", 8))
    assert c.per_site() == {"s1": 2, "s2": 1} and c.duplicates == 1 and c.received == 6
    c.state("s1", "d1", {"ts": "2026-01-01T00:00:01.000Z", "frame": 6, "total": 2})
    c.state("s1", "d1", {"ts": "2026-01-01T00:00:00.500Z", "frame": 5, "total": 1})  # older: ignored
    c.state("s1", "d2", {"ts": "2026-01-01T00:00:01.000Z", "frame": 3, "total": 1})
    # events up to each state's frame against the states: d1 at frame 6 had 2 (the exit came at 8)
    assert c.check_against_states() == {"s1": {"from_events": 3, "from_states": 3, "devices": 2}}
    # d1's process restarts (frames start over, SIGKILL: its live track never exits): its count restarts
    c.event("s1", "d1", _ev("f", "enter", 1))
    assert c.per_site() == {"s1": 2, "s2": 1} and c.restarts == 1


def _consumer(port: int, tmp_path, name: str, *extra: str) -> ProcessOutput:
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "fleet_consumer.py"), "--broker", f"127.0.0.1:{port}",
                             "--client-id", name, "--record", str(tmp_path / f"{name}.jsonl"),
                             "--summary", str(tmp_path / f"{name}.json"), "--interval", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return ProcessOutput(proc)


def _records(tmp_path, name: str) -> list:
    f = tmp_path / f"{name}.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []


def test_shared_subscription_splits_events_between_instances_on_mqtt5(pool, tmp_path):
    broker = pool.make("mosquitto")
    a = _consumer(broker.port, tmp_path, "backend-a", "--group", "backends")
    b = _consumer(broker.port, tmp_path, "backend-b", "--group", "backends")
    dev = None
    try:
        for c in (a, b):
            assert c.wait_stderr("(MQTT 5,", 30), c.stderr
        dev = ReplayDevice(tmp_path, broker.port, site="shop-1", loop=False, fast=True).start()
        assert dev.out.wait_exit(180) == 0, dev.stderr_tail()
        committed = set(dev.event_ids())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ids_a = {r["event_id"] for r in _records(tmp_path, "backend-a")}
            ids_b = {r["event_id"] for r in _records(tmp_path, "backend-b")}
            if committed <= ids_a | ids_b:
                break
            time.sleep(0.2)
        assert committed <= ids_a | ids_b
        assert ids_a and ids_b, "both instances of the group get a share"
        assert not ids_a & ids_b, "each event goes to one instance of the group"
        assert {r["site"] for r in _records(tmp_path, "backend-a")} == {"shop-1"}
    finally:
        for c in (a, b):
            c.stop(30)
        if dev is not None:
            dev.stop()
        broker.cleanup()


def test_on_nats_falls_back_to_311_and_counts_match_device_states(pool, tmp_path):
    """NATS speaks 3.1.1 only: the consumer falls back, says --group cannot work there, receives every
    event of two sites, and its live counts equal the sum of the devices' states at the end."""
    nats = pool.make("nats")
    c = _consumer(nats.port, tmp_path, "backend-n", "--group", "backends")
    devices = []
    try:
        assert c.wait_stderr("(MQTT 3.1.1,", 30), c.stderr
        assert c.wait_stderr("no shared subscriptions", 5)
        devices = [ReplayDevice(tmp_path, nats.port, site=site, loop=False, fast=True).start()
                   for site in ("north", "south", "south")]
        for d in devices:
            assert d.out.wait_exit(180) == 0, d.stderr_tail()
        committed = set().union(*(set(d.event_ids()) for d in devices))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not committed <= {r["event_id"] for r in _records(tmp_path, "backend-n")}:
            time.sleep(0.2)
        assert committed <= {r["event_id"] for r in _records(tmp_path, "backend-n")}
        # ... and the newest state of each device (its last frame: after the file ended, total 0)
        last_frames = {f"{s}/{d.device_id}": max(e["frame"] for e in d.events())
                       for d, s in zip(devices, ("north", "south", "south"), strict=True)}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c.proc.send_signal(signal.SIGUSR1)  # the consumer writes its summary
            assert c.wait_stderr("snapshot of", 10)
            summary_file = tmp_path / "backend-n.json"
            if summary_file.exists() and json.loads(summary_file.read_text())["newest_state_frames"] == last_frames:
                break
            time.sleep(0.2)
        assert c.stop(30) == 0
        summary = json.loads((tmp_path / "backend-n.json").read_text())
        assert summary["newest_state_frames"] == last_frames
        assert summary["protocol"] == "3.1.1" and summary["unique"] == len(committed)
        check = summary["check_newest_states"]
        assert set(check) == {"north", "south"} and check["south"]["devices"] == 2
        assert all(v["from_events"] == v["from_states"] for v in check.values())
        assert summary["live_per_site"] == {"north": 0, "south": 0}
    finally:
        c.stop(30)
        for d in devices:
            d.stop()
        nats.cleanup()
