"""Remote configuration against the running daemon: real mosquitto, real video, the real `edged run`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import paho.mqtt.client as mqtt
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from paho.mqtt.enums import CallbackAPIVersion

from edged.remote_config import OVERLAY_FILE, signed_envelope
from tests._hostile import hostile_payloads
from tests.conftest import ROOT, Broker, free_port, need_module
from tests.mqttutil import Collector
from tests.netutil import ProcessOutput

pytestmark = pytest.mark.slow
DEVICE = "rc"


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory):
    need_module("skimage")
    from edged import scene

    d = tmp_path_factory.mktemp("scene")
    return Path(scene.write_video(scene.default_scene(), d / "scene.mp4"))


def _config(d: Path, port: int, video: Path, **sections) -> Path:
    cfg = {
        "device_id": DEVICE,
        "state_dir": str(d / "state"),
        "capture": {"source": str(video), "loop": True, "fps_cap": 10.0},
        "detector": {"classes": ["person", "cat", "cup"]},
        "mqtt": {"host": "127.0.0.1", "port": port, "stats_interval_s": 0.5, "qos_tracks": 1},
        "web": {"enabled": False},
        "remote_config": {"health_timeout_s": 6.0},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = d / "edged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _spawn(config: Path) -> ProcessOutput:
    return ProcessOutput(subprocess.Popen(
        [sys.executable, "-m", "edged", "run", "--config", str(config), "--print-events"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))


def _publish(port: int, topic: str, payload: bytes, retain: bool = True) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(30)
    finally:
        c.loop_stop()
        c.disconnect()


def _desired(version: int, config: dict) -> bytes:
    return json.dumps({"version": version, "config": config}).encode()


def _reports(sub: Collector) -> List[dict]:
    return sub.payloads("/config/reported")


def _wait_report(sub: Collector, version: Optional[int], scope: str = "device", timeout: float = 60) -> dict:
    ok = sub.wait_for(lambda ms: any(r.get("version") == version and r.get("scope") == scope for r in _reports(sub)), timeout)
    assert ok, f"no report for v{version}; got {_reports(sub)[-3:]}"
    return [r for r in _reports(sub) if r.get("version") == version and r.get("scope") == scope][-1]


def _stats(sub: Collector) -> List[dict]:
    return sub.payloads("/stats")


def _events(out: ProcessOutput) -> List[dict]:
    return [json.loads(ln) for ln in list(out.stdout) if ln.startswith("{")]


def test_live_update_changes_behaviour_with_no_restart_and_no_churn(tmp_path, broker, demo_video):
    sub = Collector(broker.port, f"edged/{DEVICE}/#")
    out = _spawn(_config(tmp_path, broker.port, demo_video))
    topic = f"edged/{DEVICE}/config/desired"
    try:
        # Tracks live: persons entered and have not exited.
        def live_ids() -> set:
            evs = _events(out)
            return {e["track_id"] for e in evs if e["type"] == "enter"} - {e["track_id"] for e in evs if e["type"] == "exit"}

        assert out.wait_for(lambda: len(live_ids()) >= 1, 90), out.stderr[-20:]
        n_before = len(_events(out))
        entered_before = {e["track_id"] for e in _events(out) if e["type"] == "enter"}
        _publish(broker.port, topic, _desired(1, {"events": {"zones": [
            {"name": "everywhere", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}]}}))
        report = _wait_report(sub, 1)
        assert report["status"] == "applied" and report["changed"] == ["events.zones"], report
        # The new zone produces zone events on the next frames, for tracks that were already live.
        assert out.wait_for(lambda: any(e["type"] == "zone_enter" for e in _events(out)[n_before:]), 30)
        after = _events(out)[n_before:]
        zone_ids = {e["track_id"] for e in after if e["type"] == "zone_enter"}
        assert zone_ids & entered_before, "a track live before the change entered the new zone"
        for tid in zone_ids & entered_before:
            assert not any(e["type"] in ("exit", "enter") and e["track_id"] == tid
                           for e in after if e["seq"] < min(z["seq"] for z in after if z.get("track_id") == tid)), \
                f"track {tid} churned (exit/enter) at the change"

        # A higher score threshold removes the detections on the next frames.
        _publish(broker.port, topic, _desired(2, {"detector": {"score_threshold": 0.995}, "events": {"zones": [
            {"name": "everywhere", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}]}}))
        assert _wait_report(sub, 2)["status"] == "applied"
        n_stats = len(_stats(sub))
        assert sub.wait_for(lambda ms: len(_stats(sub)) >= n_stats + 4, 30)
        s = _stats(sub)
        assert s[-1]["detections"] == s[-3]["detections"], "no detection passes a 0.995 threshold"
        assert s[-1]["frames_processed"] > s[-3]["frames_processed"], "frames keep flowing"
        # Back to the file's threshold (desired state: leave the key out).
        _publish(broker.port, topic, _desired(3, {}))
        assert _wait_report(sub, 3)["status"] == "applied"
        n_stats = len(_stats(sub))
        assert sub.wait_for(lambda ms: len(_stats(sub)) >= n_stats + 4 and
                            _stats(sub)[-1]["detections"] > _stats(sub)[n_stats]["detections"], 60)
        # One process, one session all along: no restart, no `offline`.
        assert out.proc.poll() is None
        assert not any(m.payload == b"offline" for m in sub.on("/availability"))
        overlay = json.loads((tmp_path / "state" / OVERLAY_FILE).read_text())
        assert overlay["scopes"]["device"] == {"version": 3, "config": {}}
    finally:
        out.stop()
        sub.close()


def test_an_unhealthy_change_is_rolled_back_and_the_daemon_keeps_running(tmp_path, broker, demo_video):
    sub = Collector(broker.port, f"edged/{DEVICE}/#")
    out = _spawn(_config(tmp_path, broker.port, demo_video))
    try:
        assert sub.wait_for(lambda ms: len(_stats(sub)) >= 2 and _stats(sub)[-1]["frames_processed"] > 0, 90)
        closed = free_port()
        _publish(broker.port, f"edged/{DEVICE}/config/desired",
                 _desired(1, {"capture": {"source": f"rtsp://127.0.0.1:{closed}/cam", "timeout_s": 1.0}}))
        report = _wait_report(sub, 1, timeout=90)
        assert report["status"] == "failed", report
        assert "unhealthy after the change" in report["errors"][0] and "no frame processed" in report["errors"][0]
        assert report["applied"]["device"] == 0
        # Back on the video: frames flow again, same process.
        n = _stats(sub)[-1]["frames_processed"]
        assert sub.wait_for(lambda ms: _stats(sub)[-1]["frames_processed"] > n + 5, 60)
        assert str(demo_video) in _stats(sub)[-1]["capture"]["source"]
        assert out.proc.poll() is None and not (tmp_path / "state" / OVERLAY_FILE).exists()
    finally:
        out.stop()
        sub.close()


def test_a_retained_old_version_replayed_after_a_restart_changes_nothing(tmp_path, broker, demo_video):
    cfg = _config(tmp_path, broker.port, demo_video)
    topic = f"edged/{DEVICE}/config/desired"
    sub = Collector(broker.port, f"edged/{DEVICE}/#")
    out = _spawn(cfg)
    try:
        _publish(broker.port, topic, _desired(7, {"tracker": {"max_age": 40}}))
        assert _wait_report(sub, 7)["status"] == "applied"
        applied_hash = _reports(sub)[-1]["effective_hash"]
        assert out.stop() == 0
        persisted = (tmp_path / "state" / OVERLAY_FILE).read_bytes()
        # While it is down, an old message (reordered, or an operator's stale copy) becomes the retained one.
        _publish(broker.port, topic, _desired(5, {"tracker": {"max_age": 10}}))
        out = _spawn(cfg)
        report = _wait_report(sub, 5)
        assert report["status"] == "ignored" and report["effective_hash"] == applied_hash
        assert report["applied"]["device"] == 7
        assert (tmp_path / "state" / OVERLAY_FILE).read_bytes() == persisted
        shown = subprocess.run([sys.executable, "-m", "edged", "config", "show", "--effective", "--config", str(cfg)],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert f"# effective_hash: {applied_hash}" in shown.stdout
        assert yaml.safe_load(shown.stdout)["tracker"]["max_age"] == 40
    finally:
        out.stop()
        sub.close()


def test_config_push_round_trip_signed_accepted_tampered_rejected(tmp_path, broker, demo_video):
    secret = tmp_path / "hmac.key"
    secret.write_text("a shared secret only the operator and the device know\n")
    cfg = _config(tmp_path, broker.port, demo_video, remote_config={"hmac_secret_file": str(secret)})
    sub = Collector(broker.port, f"edged/{DEVICE}/#")
    out = _spawn(cfg)
    try:
        assert sub.wait_for(lambda ms: any(m.payload == b"online" for m in sub.on("/availability")), 90)
        overlay = tmp_path / "overlay.yaml"
        overlay.write_text("tracker:\n  n_init: 4\n")
        push = subprocess.run([sys.executable, "-m", "edged", "config", "push", "--config", str(cfg), str(overlay)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert push.returncode == 0, push.stderr
        report = json.loads(push.stdout)
        assert report["status"] == "applied" and report["changed"] == ["tracker.n_init"] and report["version"] == 1
        assert "(signed)" in push.stderr
        # A second push takes the next version by itself.
        overlay.write_text("tracker:\n  n_init: 5\n")
        push = subprocess.run([sys.executable, "-m", "edged", "config", "push", "--config", str(cfg), str(overlay)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert push.returncode == 0 and json.loads(push.stdout)["version"] == 2
        # Tampered: the body changed after signing.
        key = secret.read_text().strip().encode()
        env = json.loads(signed_envelope(_desired(3, {"tracker": {"n_init": 6}}), key))
        env["body"] = env["body"].replace('"n_init": 6', '"n_init": 9')
        _publish(broker.port, f"edged/{DEVICE}/config/desired", json.dumps(env).encode())
        report = _wait_report(sub, None)
        assert report["status"] == "rejected" and "bad signature" in report["errors"][0]
        _publish(broker.port, f"edged/{DEVICE}/config/desired", _desired(4, {"tracker": {"n_init": 9}}))
        assert sub.wait_for(lambda ms: any("unsigned" in (r.get("errors") or [""])[0] for r in _reports(sub)), 30)
        assert json.loads((tmp_path / "state" / OVERLAY_FILE).read_text())["scopes"]["device"]["config"] == \
            {"tracker": {"n_init": 5}}
        # A push the device rejects exits non-zero with the reasons.
        overlay.write_text("tracker:\n  n_init: many\n")
        push = subprocess.run([sys.executable, "-m", "edged", "config", "push", "--config", str(cfg), str(overlay)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert push.returncode == 1 and json.loads(push.stdout)["status"] == "rejected"
        assert "tracker.n_init" in json.loads(push.stdout)["errors"][0]
    finally:
        out.stop()
        sub.close()


def test_fleet_overlay_applies_and_the_device_overlay_wins(tmp_path, broker, demo_video):
    cfg = _config(tmp_path, broker.port, demo_video)
    sub = Collector(broker.port, "edged/#")
    out = _spawn(cfg)
    try:
        assert sub.wait_for(lambda ms: any(m.payload == b"online" for m in sub.on("/availability")), 90)
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text("tracker:\n  max_age: 20\n  n_init: 4\n")
        push = subprocess.run([sys.executable, "-m", "edged", "config", "push", "--config", str(cfg), "--fleet",
                               str(fleet)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert push.returncode == 0, push.stderr
        report = json.loads(push.stdout)
        assert (report["scope"], report["status"], report["applied"]) == ("fleet", "applied", {"fleet": 1, "device": 0})
        _publish(broker.port, f"edged/{DEVICE}/config/desired", _desired(1, {"tracker": {"max_age": 55}}))
        assert _wait_report(sub, 1)["changed"] == ["tracker.max_age"]
        effective = sub.payloads("/config/effective")[-1]
        assert (effective["tracker"]["max_age"], effective["tracker"]["n_init"]) == (55, 4)
    finally:
        out.stop()
        sub.close()


# ---------------------------------------------------------------------------------------------- fuzzing
class FuzzTarget:
    """One daemon and broker for the whole fuzz run (hypothesis calls the test body 1,000 times)."""

    def __init__(self, video: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="edged-fuzz-"))
        (self.dir / "broker").mkdir()
        self.broker = Broker(workdir=self.dir / "broker", port=free_port())
        self.broker.start()
        self.sub = Collector(self.broker.port, f"edged/{DEVICE}/#")
        self.out = _spawn(_config(self.dir, self.broker.port, video, mqtt={"stats_interval_s": 2.0}))
        assert self.sub.wait_for(lambda ms: any(m.payload == b"online" for m in self.sub.on("/availability")), 90)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", self.broker.port)
        self.client.loop_start()
        self.sent = 0

    def send(self, payload: bytes) -> dict:
        seen = len(_reports(self.sub))
        self.client.publish(f"edged/{DEVICE}/config/desired", payload, qos=1).wait_for_publish(60)
        self.sent += 1
        assert self.sub.wait_for(lambda ms: len(_reports(self.sub)) > seen, 60), \
            f"no report for payload {self.sent}: {payload[:120]!r}\n" + "\n".join(self.out.stderr[-10:])
        return _reports(self.sub)[seen]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.out.stop()
        self.sub.close()
        self.broker.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def fuzz_target(demo_video):
    target = FuzzTarget(demo_video)
    yield target
    target.close()


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(payload=hostile_payloads())
def test_fuzz_1000_hostile_payloads_against_the_running_daemon(fuzz_target, payload):
    report = fuzz_target.send(payload)
    assert report["status"] == "rejected" and report["errors"], report
    assert fuzz_target.out.proc.poll() is None


def test_after_the_fuzzing_the_daemon_still_runs_and_nothing_was_persisted(fuzz_target):
    assert fuzz_target.sent >= 1000
    n = len(_stats(fuzz_target.sub))
    assert fuzz_target.sub.wait_for(lambda ms: len(_stats(fuzz_target.sub)) >= n + 2, 30), "still publishing"
    last = _stats(fuzz_target.sub)[-1]
    outcomes = last["remote_config"]["outcomes"]
    assert outcomes["rejected"] >= 1000 and outcomes["applied"] == 0
    assert last["remote_config"]["applied_versions"] == {"fleet": 0, "device": 0}
    assert not (fuzz_target.dir / "state" / OVERLAY_FILE).exists()
