"""Home Assistant dashboard controls: their templates, rendered with Jinja2 as Home Assistant renders them,
produce remote-config messages the device applies, and read the state back from config/effective."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import yaml

from edged.config import EdgedConfig, MqttConfig, config_to_dict, load_config
from edged.mqtt.homeassistant import discovery_messages
from edged.mqtt.topics import Topics
from edged.remote_config import OVERLAY_FILE, OverlayStore, RemoteConfigManager
from tests.conftest import ROOT, need_module

TOPICS = Topics("edged", "hall")


_clock = [datetime.now(timezone.utc).timestamp()]


def _now() -> datetime:
    """Home Assistant's clock; one millisecond passes between two commands."""
    _clock[0] += 0.001
    return datetime.fromtimestamp(_clock[0], timezone.utc)


def _render(template: str, **variables) -> str:
    """Home Assistant's template environment, as far as these templates use it."""
    jinja2 = need_module("jinja2")
    env = jinja2.Environment()
    env.globals["now"] = _now
    env.globals["as_timestamp"] = lambda dt: dt.timestamp()
    return env.from_string(template).render(**variables)


def _controls(controls: bool = True) -> dict:
    cfg = MqttConfig(homeassistant={"enabled": True})
    msgs = discovery_messages(cfg, topics=TOPICS, class_names=["person"], controls=controls)
    return {t: json.loads(p) for t, p in msgs}


def test_controls_only_when_asked_and_valid_against_their_schemas():
    jsonschema = need_module("jsonschema")
    assert not any("/number/" in t or "/switch/" in t for t in _controls(False))
    got = _controls(True)
    number = got["homeassistant/number/edged_hall/score_threshold/config"]
    switch = got["homeassistant/switch/edged_hall/debug_stream/config"]
    for payload, name in ((number, "ha_number"), (switch, "ha_switch")):
        schema = json.loads((ROOT / "edged" / "mqtt" / "schemas" / f"{name}.schema.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(payload)
        assert payload["command_topic"] == TOPICS.config_desired
        assert payload["state_topic"] == TOPICS.config_effective


def test_a_dashboard_change_is_applied_through_remote_config(tmp_path):
    got = _controls(True)
    number = got["homeassistant/number/edged_hall/score_threshold/config"]
    switch = got["homeassistant/switch/edged_hall/debug_stream/config"]
    cfg_file = tmp_path / "edged.yaml"
    cfg_file.write_text(yaml.safe_dump({"device_id": "hall", "state_dir": str(tmp_path),
                                        "tracker": {"max_age": 50}}))
    applied = []
    mgr = RemoteConfigManager(config_path=str(cfg_file), base_overlay=None, store=OverlayStore(tmp_path / OVERLAY_FILE),
                              current=load_config(str(cfg_file)), apply=lambda o, n, c: applied.append(c),
                              health=lambda t: None)
    # An operator's overlay first; the dashboard's changes merge into it.
    assert mgr.handle("device", b'{"version": 3, "config": {"events": {"position_interval_s": 2.0}}}').status == "applied"
    out = mgr.handle("device", _render(number["command_template"], value=0.55).encode())
    assert out.status == "applied" and out.changed == ["detector.score_threshold"], out
    out = mgr.handle("device", _render(switch["command_template"], value="OFF").encode())
    assert out.status == "applied" and out.changed == ["web.enabled"], out
    cfg: EdgedConfig = mgr.current
    assert (cfg.detector.score_threshold, cfg.web.enabled, cfg.events.position_interval_s) == (0.55, False, 2.0)
    # The state Home Assistant shows comes from the retained config/effective payload.
    effective = config_to_dict(cfg)
    assert float(_render(number["value_template"], value_json=effective)) == 0.55
    assert _render(switch["value_template"], value_json=effective) == "OFF"
