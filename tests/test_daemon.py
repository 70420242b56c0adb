"""The daemon end to end: real models, real frames, a real broker, the real `edged run` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, need_module, retained_topics, shared_path
from tests.mqttutil import Collector

pytestmark = pytest.mark.slow

SCHEMAS = ROOT / "edged" / "mqtt" / "schemas"


def _write_config(tmp_path: Path, port: int, source: str, **sections) -> Path:
    cfg = {
        "device_id": "testcam",
        "state_dir": str(tmp_path / "state"),
        "capture": {"source": source, "name": "cam0"},
        "mqtt": {"host": "127.0.0.1", "port": port, "stats_interval_s": 1.0, "qos_tracks": 1},
        "web": {"enabled": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    path = tmp_path / "edged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edged", "run", "--config", str(config), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )


def _spawn(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edged", "run", "--config", str(config), "--print-events", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def _spawn_reading(config: Path, log: Path) -> Tuple[subprocess.Popen, List[dict], threading.Thread]:
    """`edged run --print-events` with exactly one reader per pipe: a thread owns stdout and collects
    the printed events; stderr goes to the file `log` (a pipe nobody reads would fill up and block the
    daemon). Stop it with `_stop_reading`, never with communicate(), which would read stdout too."""
    with open(log, "w") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edged", "run", "--config", str(config), "--print-events"],
            stdout=subprocess.PIPE, stderr=log_fh, text=True, cwd=ROOT,
        )
    printed: List[dict] = []
    reader = threading.Thread(target=lambda: [printed.append(json.loads(line)) for line in proc.stdout], daemon=True)
    reader.start()
    return proc, printed, reader


def _stop_reading(proc: subprocess.Popen, reader: threading.Thread) -> None:
    """SIGTERM (SIGKILL if it does not stop within a minute); the reader ends at end of stdout."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(30)
        proc.stdout.close()


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM (the daemon's clean stop), SIGKILL if it does not stop within a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()


def _validator(name: str):
    jsonschema = need_module("jsonschema")
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory):
    scene = need_module("edged.scene")
    d = tmp_path_factory.mktemp("scene")
    spec = scene.default_scene()
    video = scene.write_video(spec, d / "scene.mp4")
    gt = scene.write_gt(spec, d / "gt.txt")
    return spec, Path(video), Path(gt)


def _check_lifecycle(events: list) -> None:
    """The contract: one enter per track, every exit after its enter, seq strictly increasing."""
    entered, exited = set(), set()
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len({e["event_id"] for e in events}) == len(events)
    for e in events:
        if e["type"] == "enter":
            assert e["track_id"] not in entered, f"second enter for track {e['track_id']}"
            entered.add(e["track_id"])
        elif e["type"] == "exit":
            assert e["track_id"] in entered, f"exit without enter for track {e['track_id']}"
            assert e["track_id"] not in exited
            exited.add(e["track_id"])
    assert entered == exited, "every entered track must exit by the end of the stream"


def test_demo_scene_one_enter_one_exit_per_object(tmp_path, broker, demo_video):
    spec, video, gt = demo_video
    truth = Counter(o.class_name for o in spec.objects)
    sub = Collector(broker.port, "edged/testcam/#")
    try:
        cfg = _write_config(tmp_path, broker.port, str(video), detector={"classes": sorted(truth)})
        r = _run(cfg, "--mot-out", str(tmp_path / "mot.txt"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/availability") and m.payload == b"offline" for m in ms), 30)
        events = sub.payloads("/events")
        _check_lifecycle(events)
        enters = Counter(e["class"] for e in events if e["type"] == "enter")
        assert enters == truth, f"enter events per class {dict(enters)} != objects in the scene {dict(truth)}"
        # Every published payload honours its schema.
        ev_schema, pos_schema = _validator("event"), _validator("position")
        for e in events:
            ev_schema.validate(e)
        positions = sub.payloads("/tracks")
        assert positions, "moving objects must produce position updates"
        for p in positions:
            pos_schema.validate(p)
        state = sub.last("/state")
        assert state is not None, "no state message"
        assert state.retain is False  # a live delivery to our subscription, made before the daemon started
        _validator("state").validate(state.json())
        # ... and the broker keeps the last state, the availability and the effective config (remote
        # configuration) for late subscribers.
        assert sorted(retained_topics(broker.port, "edged/testcam/#")) == [
            "edged/testcam/availability", "edged/testcam/config/effective", "edged/testcam/state"]
        for s in sub.payloads("/stats"):
            _validator("stats").validate(s)
        # --mot-out is scorable MOTChallenge.
        rows = np.loadtxt(tmp_path / "mot.txt", delimiter=",", ndmin=2)
        assert rows.shape[1] == 10 and rows[:, 0].min() >= 1
    finally:
        sub.close()


def test_sigterm_exits_live_tracks_and_goes_offline(tmp_path, broker, demo_video):
    _, video, _ = demo_video
    sub = Collector(broker.port, "edged/testcam/#")
    cfg = _write_config(tmp_path, broker.port, str(video), capture={"loop": True, "name": "cam0"},
                        detector={"classes": ["person", "cat", "cup"]})
    proc = _spawn(cfg)
    try:
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/events") and json.loads(m.payload)["type"] == "enter" for m in ms), 120), \
            "no enter event"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/availability") and m.payload == b"offline" for m in ms), 30)
        events = sub.payloads("/events")
        _check_lifecycle(events)
        assert any(e["type"] == "exit" and e["reason"] == "shutdown" for e in events)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_sigkill_during_outage_loses_no_event(tmp_path, broker, demo_video):
    """Events queued while the broker is down survive a SIGKILL of the daemon and arrive later."""
    _, video, _ = demo_video
    cfg = _write_config(tmp_path, broker.port, str(video), capture={"loop": True, "name": "cam0"},
                        detector={"classes": ["person", "cat", "cup"]})
    broker.stop()
    proc = _spawn(cfg)
    printed = []
    try:
        # Events printed on stdout were already committed to the outbox (put happens first).
        for line in proc.stdout:
            ev = json.loads(line)
            if ev["type"] != "position":
                printed.append(ev["event_id"])
            if len(printed) >= 4:
                break
        assert len(printed) >= 4
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    broker.start()
    sub = Collector(broker.port, "edged/testcam/#")
    proc2 = _spawn(cfg)
    try:
        got = lambda ms: set(printed) <= {json.loads(m.payload).get("event_id") for m in ms if m.topic.endswith("/events")}
        assert sub.wait_for(got, 120), "events queued before the SIGKILL never arrived"
    finally:
        _terminate(proc2)
        sub.close()


def test_debug_web_serves_health_snapshot_metrics(tmp_path, demo_video):
    _, video, _ = demo_video
    cfg = _write_config(tmp_path, 1, str(video), capture={"loop": True, "name": "cam0"},
                        web={"enabled": True, "port": 0}, mqtt={"enabled": False})
    proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = None
        for line in proc.stderr:
            if "debug view on http://" in line:
                port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
                break
        assert port, "the daemon did not report its debug port"
        base = f"http://127.0.0.1:{port}"
        import cv2
        deadline = time.monotonic() + 60
        while True:  # healthz turns 200 once frames flow; poll the real endpoint
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                    assert r.status == 200
                    break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
                assert time.monotonic() < deadline, "healthz never became ok"
                time.sleep(0.2)
        with urllib.request.urlopen(base + "/snapshot.jpg", timeout=5) as r:
            img = cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape[2] == 3
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "edged_frames_processed_total" in text
        with urllib.request.urlopen(base + "/stream.mjpg", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            head = r.read(200)
            assert b"--frame" in head and b"image/jpeg" in head
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_tud_stadtmitte_video_scores(tmp_path, broker):
    """Real video through the default models and a real broker, scored against MOT15 ground truth."""
    video = shared_path("data", "video", "MOT15-TUD-Stadtmitte.mp4")
    gt = shared_path("data", "mot15", "TUD-Stadtmitte", "gt", "gt.txt")
    sub = Collector(broker.port, "edged/testcam/#")
    try:
        cfg = _write_config(tmp_path, broker.port, str(video))
        mot = tmp_path / "tud.txt"
        r = _run(cfg, "--mot-out", str(mot))
        assert r.returncode == 0, r.stderr[-3000:]
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/availability") and m.payload == b"offline" for m in ms), 30)
        events = sub.payloads("/events")
        _check_lifecycle(events)
        enters = sum(1 for e in events if e["type"] == "enter" and e["class"] == "person")
        ev = subprocess.run([sys.executable, "-m", "edged", "eval", "--gt", str(gt), "--result", str(mot), "--json"],
                            capture_output=True, text=True, cwd=ROOT)
        assert ev.returncode == 0, ev.stderr
        scores = json.loads(ev.stdout.strip().splitlines()[-1])
        overall = scores.get("overall", scores)
        print(f"TUD-Stadtmitte: MOTA {overall['MOTA']:.3f} IDF1 {overall['IDF1']:.3f} "
              f"IDsw {overall['IDSW']} person enters {enters}")
        # The default (motion-gated) mode scores MOTA 0.706, IDF1 0.759, 13 enters, the same in every run
        # (the region planner sees the tracker as of the previous frame, whatever the thread timing).
        # Issue 10's bar against full-frame mode (0.715 / 0.761 / 13): IDF1 within 0.02, enters <= 13 + 1.
        assert overall["MOTA"] >= 0.68
        assert overall["IDF1"] >= 0.741
        assert enters <= 14
    finally:
        sub.close()


def test_broker_down_at_start_up_20s_later_every_event_in_order(tmp_path, broker_factory, demo_video):
    """The daemon starts while the broker is down, keeps working; 20 s later the broker comes up and
    every event the daemon produced meanwhile arrives, in sequence order."""
    _, video, _ = demo_video
    broker = broker_factory(start=False)
    cfg = _write_config(tmp_path, broker.port, str(video), capture={"loop": True, "name": "cam0"},
                        detector={"classes": ["person", "cat", "cup"]})
    proc, printed, reader = _spawn_reading(cfg, tmp_path / "daemon.log")
    sub = None
    try:
        # The scenario: 20 s with no broker (a duration, not a synchronisation); the pipeline keeps
        # producing events, which wait in the outbox.
        time.sleep(20.0)
        assert proc.poll() is None, "the daemon must keep running without a broker"
        produced_while_down = [e for e in printed if e["type"] != "position"]
        assert produced_while_down, "no event was produced during the outage"
        broker.start()
        sub = Collector(broker.port, "edged/testcam/#")
        want = {e["event_id"] for e in produced_while_down}
        got = lambda ms: want <= {json.loads(m.payload).get("event_id") for m in ms if m.topic.endswith("/events")}
        assert sub.wait_for(got, 120), "events queued while the broker was down never arrived"
        _stop_reading(proc, reader)
        assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/availability") and m.payload == b"offline" for m in ms), 30)
        events = sub.payloads("/events")
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs), "events must arrive in sequence order"
        assert {e["event_id"] for e in events} == {e["event_id"] for e in printed if e["type"] != "position"}
    finally:
        _stop_reading(proc, reader)
        if sub is not None:
            sub.close()


def test_systemd_notify_ready_watchdog_stopping(tmp_path, demo_video):
    """Type=notify through its real interface: a datagram socket standing in for systemd."""
    import socket as socketlib

    _, video, _ = demo_video
    cfg = _write_config(tmp_path, 1, str(video), capture={"loop": True, "name": "cam0"}, mqtt={"enabled": False})
    sock_path = tmp_path / "notify.sock"
    server = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    try:
        got = []
        while not any(m.startswith("READY=1") for m in got):
            got.append(server.recv(4096).decode())
        while "WATCHDOG=1" not in got:  # fed while frames flow
            got.append(server.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got:
            got.append(server.recv(4096).decode())
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()


def test_60s_broker_outage_mid_stream_loses_no_event(tmp_path, broker_factory, demo_video):
    """Stop the broker process for 60 s while the daemon runs, restart it: every event arrives
    (duplicates allowed, removed by event_id) and availability is back to a retained `online`."""
    from tests._mqtt_helpers import DEVICE_PASSWORD, DEVICE_USER, SUB_PASSWORD, SUB_USER, gated_broker

    _, video, _ = demo_video
    broker, gate = gated_broker(broker_factory, tmp_path)
    cfg = _write_config(tmp_path, broker.port, str(video), capture={"loop": True, "name": "cam0"},
                        detector={"classes": ["person", "cat", "cup"]},
                        mqtt={"username": DEVICE_USER, "password": DEVICE_PASSWORD,
                              "reconnect_min_s": 0.2, "reconnect_max_s": 1.0})
    sub = Collector(broker.port, "edged/testcam/#", username=SUB_USER, password=SUB_PASSWORD)
    proc, printed, reader = _spawn_reading(cfg, tmp_path / "daemon.log")
    try:
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/events") for m in ms), 120), "no event before the outage"
        broker.stop()
        n_before = len(printed)
        time.sleep(60.0)  # the scenario: a 60 s outage (a duration, not a synchronisation)
        assert proc.poll() is None
        assert len(printed) > n_before, "the pipeline must keep producing events during the outage"
        # Keep the device out until our subscriber is back, so that what we measure is the device's
        # delivery, not a race between two clients reconnecting.
        gate.close()
        broker.start()
        assert sub.wait_subscribed(30)
        gate.open()
        want = {e["event_id"] for e in printed if e["type"] != "position"}
        got = lambda ms: want <= {json.loads(m.payload).get("event_id") for m in ms if m.topic.endswith("/events")}
        assert sub.wait_for(got, 120), "events produced during the outage were lost"
        fresh = Collector(broker.port, "edged/testcam/availability", username=SUB_USER, password=SUB_PASSWORD)
        try:
            assert fresh.wait_for(lambda ms: any(m.retain and m.payload == b"online" for m in ms), 30)
        finally:
            fresh.close()
    finally:
        _stop_reading(proc, reader)
        sub.close()
