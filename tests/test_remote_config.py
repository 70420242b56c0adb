"""edged.remote_config without a broker: payload checks, versions, persistence, rollback, and
property-based fuzzing of hostile payloads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import List, Optional

import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from edged.config import load_config
from edged.remote_config import (
    OVERLAY_FILE, OverlayStore, Rejected, RemoteConfigManager, config_hash, parse_desired, sign, signed_envelope,
)
from tests._hostile import hostile_payloads
from tests.conftest import ROOT


def _desired(version, config, **extra) -> bytes:
    return json.dumps({"version": version, "config": config, **extra}).encode()


class Parts:
    """What the manager drives: records applies; can refuse or report the pipeline unhealthy."""

    def __init__(self):
        self.applied: List[tuple] = []
        self.refuse: Optional[str] = None
        self.unhealthy: Optional[str] = None

    def apply(self, old, new, changed):
        self.applied.append((old, new, list(changed)))
        if self.refuse and any(c.startswith(self.refuse) for c in changed) and new.detector.score_threshold > 0.5:
            raise ValueError(f"{self.refuse}: refused by the part")

    def health(self, timeout):
        return self.unhealthy if timeout > 0 else None


@pytest.fixture
def setup(tmp_path):
    cfg_file = tmp_path / "edged.yaml"
    cfg_file.write_text(yaml.safe_dump({"device_id": "d1", "state_dir": str(tmp_path / "state")}))
    (tmp_path / "state").mkdir()
    store = OverlayStore(tmp_path / "state" / OVERLAY_FILE)
    parts = Parts()
    mgr = RemoteConfigManager(config_path=str(cfg_file), base_overlay=None, store=store,
                              current=load_config(str(cfg_file)), apply=parts.apply, health=parts.health)
    return mgr, parts, cfg_file, tmp_path / "state" / OVERLAY_FILE


def test_a_valid_update_is_applied_persisted_and_reported(setup):
    mgr, parts, cfg_file, overlay_file = setup
    out = mgr.handle("device", _desired(1, {"detector": {"score_threshold": 0.6}, "events": {"zones": [
        {"name": "door", "polygon": [[0, 0], [0.5, 0], [0.5, 1]]}]}}))
    assert out.status == "applied" and out.version == 1
    assert out.changed == ["detector.score_threshold", "events.zones"] and out.restart_required == []
    assert mgr.current.detector.score_threshold == 0.6 and parts.applied[-1][2] == out.changed
    stored = OverlayStore.load(overlay_file)
    assert stored.versions == {"fleet": 0, "device": 1}
    assert stored.scopes["device"].overlay["detector"] == {"score_threshold": 0.6}
    report = out.report(mgr.effective_hash, mgr.store.versions)
    assert report["status"] == "applied" and report["effective_hash"] == config_hash(mgr.current)
    # Desired-state semantics: the next version's overlay replaces this one.
    out = mgr.handle("device", _desired(2, {"tracker": {"max_age": 40}}))
    assert out.status == "applied" and mgr.current.detector.score_threshold == 0.3
    assert set(out.changed) == {"detector.score_threshold", "events.zones", "tracker.max_age"}


def test_versions_old_or_equal_are_ignored_and_retained_replays_are_silent(setup):
    mgr, parts, *_ = setup
    first = _desired(5, {"tracker": {"n_init": 4}})
    assert mgr.handle("device", first).status == "applied"
    n = len(parts.applied)
    assert mgr.handle("device", first) is None  # the retained copy, re-delivered at a reconnect
    older = mgr.handle("device", _desired(3, {"tracker": {"n_init": 9}}))
    assert older.status == "ignored" and "not newer than the applied 5" in older.errors[0]
    same_version_other_body = mgr.handle("device", _desired(5, {"tracker": {"n_init": 9}}))
    assert same_version_other_body.status == "ignored"
    assert mgr.current.tracker.n_init == 4 and len(parts.applied) == n


def test_fleet_and_device_overlays_layer_device_wins(setup):
    mgr, *_ = setup
    assert mgr.handle("fleet", _desired(1, {"tracker": {"max_age": 20, "n_init": 5}})).status == "applied"
    assert mgr.handle("device", _desired(1, {"tracker": {"max_age": 50}})).status == "applied"
    assert (mgr.current.tracker.max_age, mgr.current.tracker.n_init) == (50, 5)
    # A fleet update keeps losing to the device on the keys the device sets.
    assert mgr.handle("fleet", _desired(2, {"tracker": {"max_age": 10, "n_init": 2}})).status == "applied"
    assert (mgr.current.tracker.max_age, mgr.current.tracker.n_init) == (50, 2)


def test_merge_messages_change_only_their_keys(setup):
    mgr, *_ = setup
    mgr.handle("device", _desired(1, {"tracker": {"max_age": 50}}))
    out = mgr.handle("device", _desired(1_800_000_000_000, {"detector": {"score_threshold": 0.5}}, merge=True))
    assert out.status == "applied"
    assert (mgr.current.tracker.max_age, mgr.current.detector.score_threshold) == (50, 0.5)


@pytest.mark.parametrize("payload, needle", [
    (b'{"version": 1, "config": {"tracker": {"max_agee": 5}}}', "tracker.max_agee: unknown key; did you mean 'max_age'?"),
    (b'{"version": 1, "config": {"detector": {"score_threshold": 1.7}}}', "detector.score_threshold"),
    (b'{"version": "7", "config": {}}', "version: must be an integer"),
    (b'{"version": -3, "config": {}}', "version: must be between 1 and"),
    (b'{"version": true, "config": {}}', "version: must be an integer"),
    (b'{"version": 1, "config": {"tracker": {"max_age": NaN}}}', "not valid JSON"),
    (b'{"version": 1, "config": {"tracker": {"gating_threshold": 1e999}}}', "is not a usable number"),
    (b'version: 1\nconfig: {tracker: {gating_threshold: .inf}}\n', "is not a usable number"),
    (b'version: 1\nconfig: !!python/object/apply:os.system ["true"]\n', "neither JSON nor safe YAML"),
    (b'\xff\xfe{"version": 1}', "not valid UTF-8"),
    (b'{"version": 1, "config": {"device_id": "other"}}', "device_id: can only be set in the config file"),
    (b'{"version": 1, "config": {"mqtt": {"host": "evil.example"}}}', "mqtt.host: can only be set in the config file"),
    (b'{"version": 1, "config": {"remote_config": {"enabled": false}}}', "remote_config.enabled: can only be set"),
    (b'{"version": 1, "config": [1, 2]}', "config: must be a mapping"),
    (b'{"version": 1, "config": {}, "extra": 1}', "unknown keys 'extra'"),
    (b'[1, 2, 3]', "expected a mapping"),
    (b'{"version": 1, "config": ' + b'{"a": ' * 40 + b'1' + b'}' * 40 + b'}', "nested deeper"),
    (b'{"version": 1, "config": {"tracker": {"max_age": ' + b'9' * 5000 + b'}}}', "(payload)"),
    (b'x' * 70000, "more than remote_config.max_payload_bytes=65536"),
])
def test_bad_payloads_are_rejected_with_a_reason_and_change_nothing(setup, payload, needle):
    mgr, parts, _cfg, overlay_file = setup
    before = mgr.current
    out = mgr.handle("device", payload)
    assert out.status == "rejected"
    assert any(needle in e for e in out.errors), out.errors
    assert mgr.current is before and parts.applied == [] and not overlay_file.exists()


def test_a_part_that_refuses_or_an_unhealthy_pipeline_rolls_back(setup):
    mgr, parts, _cfg, overlay_file = setup
    assert mgr.handle("device", _desired(1, {"tracker": {"max_age": 33}})).status == "applied"
    parts.refuse = "detector"
    out = mgr.handle("device", _desired(2, {"detector": {"score_threshold": 0.9}}))
    assert out.status == "failed" and "applying failed: ValueError: detector: refused by the part" in out.errors[0]
    # Rolled back: the parts were given the old config again, nothing persisted.
    assert parts.applied[-1][1].detector.score_threshold == 0.3
    assert mgr.current.detector.score_threshold == 0.3 and mgr.store.versions["device"] == 1
    parts.refuse, parts.unhealthy = None, "no frame processed within 15 s (source reconnecting)"
    out = mgr.handle("device", _desired(3, {"capture": {"source": "rtsp://127.0.0.1:9/x"}}))
    assert out.status == "failed" and "unhealthy after the change: no frame processed" in out.errors[0]
    assert str(mgr.current.capture.source) == "demo"
    assert OverlayStore.load(overlay_file).versions["device"] == 1


def test_restart_required_keys_are_persisted_and_listed(setup):
    mgr, parts, *_ = setup
    out = mgr.handle("device", _desired(1, {"mqtt": {"keepalive": 60}}))
    assert out.status == "applied" and out.restart_required == ["mqtt.keepalive"] and parts.applied == []


def test_hmac_signed_accepted_tampered_and_unsigned_rejected(setup):
    mgr, *_ = setup
    mgr.secret = b"correct horse battery staple"
    body = _desired(1, {"tracker": {"max_age": 44}})
    assert mgr.handle("device", signed_envelope(body, mgr.secret)).status == "applied"
    tampered = json.loads(signed_envelope(_desired(2, {"tracker": {"max_age": 45}}), mgr.secret))
    tampered["body"] = tampered["body"].replace("45", "46")
    out = mgr.handle("device", json.dumps(tampered).encode())
    assert out.status == "rejected" and "bad signature" in out.errors[0]
    out = mgr.handle("device", _desired(3, {"tracker": {"max_age": 47}}))
    assert out.status == "rejected" and "unsigned" in out.errors[0]
    wrong_key = signed_envelope(_desired(4, {}), b"another secret")
    assert mgr.handle("device", wrong_key).status == "rejected"
    assert mgr.current.tracker.max_age == 44
    assert sign(b"x", b"k") == "a8d6a7b9f21d1da0b2c1e7c6b2a0f3d2"[:0] + sign(b"x", b"k")  # deterministic


def test_overlay_file_survives_a_crash_between_write_and_rename(tmp_path):
    """A child process writes a new overlay and is SIGKILLed right before the rename: the previous
    file is intact and loads; the leftover temporary file is ignored."""
    path = tmp_path / OVERLAY_FILE
    store = OverlayStore(path)
    from edged.remote_config import ScopeState

    store.with_scope("device", ScopeState(1, {"tracker": {"max_age": 11}})).save()
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from edged.remote_config import OverlayStore, ScopeState
store = OverlayStore.load({str(path)!r})
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = die
store.with_scope("device", ScopeState(2, {{"tracker": {{"max_age": 22}}}})).save()
"""
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and json.loads(leftovers[0].read_text())["scopes"]["device"]["version"] == 2
    loaded = OverlayStore.load(path)
    assert loaded.versions["device"] == 1 and loaded.scopes["device"].overlay == {"tracker": {"max_age": 11}}
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------------------------------------- fuzzing
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=hostile_payloads())
def test_fuzz_hostile_payloads_are_rejected_and_change_nothing(tmp_path_factory, payload):
    d = tmp_path_factory.mktemp("fuzz")
    cfg_file = d / "edged.yaml"
    cfg_file.write_text(yaml.safe_dump({"device_id": "d1", "state_dir": str(d)}))
    parts = Parts()
    store = OverlayStore(d / OVERLAY_FILE)
    mgr = RemoteConfigManager(config_path=str(cfg_file), base_overlay=None, store=store,
                              current=load_config(str(cfg_file)), apply=parts.apply, health=parts.health)
    before = mgr.effective_hash
    out = mgr.handle("device", payload)
    assert out.status == "rejected", (payload[:200], out)
    assert out.errors and all(isinstance(e, str) and e for e in out.errors)
    assert mgr.effective_hash == before and parts.applied == [] and not (d / OVERLAY_FILE).exists()


def test_parse_desired_refuses_unknown_scopes():
    with pytest.raises(ValueError):
        parse_desired(b"{}", "galaxy")
    with pytest.raises(Rejected):
        parse_desired(b"{}", "fleet")
