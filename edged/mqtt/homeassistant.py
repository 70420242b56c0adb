"""Optional Home Assistant MQTT discovery (mqtt.homeassistant.enabled, off by default).

Retained config messages under `<discovery_prefix>/<component>/<node_id>/<object_id>/config`
make Home Assistant create, for one edged device:
  - per tracked class: a count sensor and an occupancy binary_sensor (from the retained `state`);
  - per configured zone: a count sensor and an occupancy binary_sensor;
  - one event entity fed by the `events` topic (enter, exit, zone_enter, zone_exit, line_cross).
Every entity uses the device's `availability` topic, so Home Assistant shows it unavailable when
the daemon is offline. Payload structure: schemas/ha_{sensor,binary_sensor,event}.schema.json.
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

from edged.config import MqttConfig
from edged.mqtt.topics import EVENTS_TOPIC_TYPES, OFFLINE, ONLINE, Router, Topics

EVENT_TYPES = list(EVENTS_TOPIC_TYPES)  # what the `events` topic carries (edged.types.EVENT_TYPES minus position)
_OBJ_RE = re.compile(r"[^A-Za-z0-9_-]+")


def _object_id(*parts: str) -> str:
    return "_".join(_OBJ_RE.sub("_", p).strip("_") for p in parts if p)


def _jinja_str(value: str) -> str:
    """A Jinja string literal (class/zone names come from the user's config)."""
    return json.dumps(value)


def discovery_messages(
    cfg: MqttConfig,
    *,
    topics: Topics,
    class_names: Sequence[str],
    zones: Sequence[str] = (),
    camera: Optional[str] = None,
    sw_version: Optional[str] = None,
    force: bool = False,
    controls: bool = False,
) -> List[Tuple[str, bytes]]:
    """(topic, payload) pairs to publish retained (QoS 1); [] unless mqtt.homeassistant.enabled
    (or `force`). Class names are those the daemon tracks, zone names those of events.zones.
    `controls` adds dashboard controls backed by remote configuration (see `_controls`)."""
    if not (cfg.homeassistant.enabled or force):
        return []
    device_id = topics.device_id
    prefix = cfg.homeassistant.discovery_prefix.strip("/")
    node = _object_id("edged", topics.site or "", device_id)  # device ids may repeat across sites
    device = {
        "identifiers": [node],
        "name": f"edged {device_id}" + (f" ({camera})" if camera else ""),
        "manufacturer": "edged",
        "model": "edge tracking daemon",
    }
    if sw_version:
        device["sw_version"] = sw_version
    common = {
        "availability_topic": topics.availability,
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "device": device,
    }
    out: List[Tuple[str, Dict]] = []

    def add(component: str, object_id: str, payload: Dict) -> None:
        body = {"unique_id": f"{node}_{object_id}", "object_id": f"{node}_{object_id}", **payload, **common}
        out.append((f"{prefix}/{component}/{node}/{object_id}/config", body))

    for cls in class_names:
        lit = _jinja_str(cls)
        oid = _object_id(cls)
        count = f"value_json.classes.get({lit}, 0)"
        add("sensor", f"{oid}_count", {
            "name": f"{cls} count",
            "state_topic": topics.state,
            "value_template": "{{ " + count + " }}",
            "state_class": "measurement",
            "unit_of_measurement": cls,
            "icon": "mdi:counter",
        })
        add("binary_sensor", f"{oid}_occupancy", {
            "name": f"{cls} occupancy",
            "state_topic": topics.state,
            "value_template": "{{ 'ON' if " + count + " > 0 else 'OFF' }}",
            "payload_on": "ON",
            "payload_off": "OFF",
            "device_class": "occupancy",
        })
    for zone in zones:
        lit = _jinja_str(zone)
        oid = _object_id("zone", zone)
        total = f"value_json.zones.get({lit}, {{}}).get('total', 0)"
        add("sensor", f"{oid}_count", {
            "name": f"zone {zone} count",
            "state_topic": topics.state,
            "value_template": "{{ " + total + " }}",
            "state_class": "measurement",
            "icon": "mdi:counter",
        })
        add("binary_sensor", f"{oid}_occupancy", {
            "name": f"zone {zone} occupancy",
            "state_topic": topics.state,
            "value_template": "{{ 'ON' if " + total + " > 0 else 'OFF' }}",
            "payload_on": "ON",
            "payload_off": "OFF",
            "device_class": "occupancy",
        })
    # The event entity needs a JSON object with `event_type`; the other keys become attributes.
    add("event", "events", {
        "name": "tracking events",
        "state_topic": topics.events,
        "event_types": list(EVENT_TYPES),
        "value_template": (
            "{{ {'event_type': value_json.type, 'track_id': value_json.track_id, 'class': value_json['class'],"
            " 'zone': value_json.zone | default(none), 'line': value_json.line | default(none)} | tojson }}"
        ),
        "icon": "mdi:motion-sensor",
    })
    if controls:
        for component, object_id, payload in _controls(topics):
            add(component, object_id, payload)
    return [(t, json.dumps(p, separators=(",", ":")).encode()) for t, p in out]


# A control's command is a remote-config message: merged into the device's overlay (it changes only its
# own key), versioned by Home Assistant's clock in milliseconds (newer than any earlier command), and
# then validated, applied, persisted and reported like any other desired message. The state comes back
# from the retained config/effective, so the dashboard shows what the device really runs.
_VERSION_MS = "{{ (as_timestamp(now()) * 1000) | int }}"


def _command(section: str, key: str, value_expr: str) -> str:
    return ('{"version": ' + _VERSION_MS + ', "merge": true, "config": {"' + section + '": {"' + key + '": '
            + value_expr + '}}}')


def _controls(topics: Topics) -> List[Tuple[str, str, Dict]]:
    return [
        ("number", "score_threshold", {
            "name": "detection score threshold",
            "command_topic": topics.config_desired,
            "command_template": _command("detector", "score_threshold", "{{ value }}"),
            "state_topic": topics.config_effective,
            "value_template": "{{ value_json.detector.score_threshold }}",
            "min": 0.05, "max": 0.95, "step": 0.05, "mode": "slider",
            "entity_category": "config",
            "icon": "mdi:tune",
        }),
        ("switch", "debug_stream", {
            "name": "debug stream",
            "command_topic": topics.config_desired,
            "command_template": _command("web", "enabled", "{{ 'true' if value == 'ON' else 'false' }}"),
            "payload_on": "ON", "payload_off": "OFF",
            "state_topic": topics.config_effective,
            "value_template": "{{ 'ON' if value_json.web.enabled else 'OFF' }}",
            "entity_category": "config",
            "icon": "mdi:video",
        }),
    ]


def queue_discovery(outbox, messages: Sequence[Tuple[str, bytes]]) -> int:
    """Put discovery messages into the outbox in one transaction (routed by Router.discovery:
    retained, QoS 1, coalesced per topic)."""
    rows = []
    for topic, payload in messages:
        rows.append(Router.discovery(topic).row(payload))
    outbox.put_many(rows)
    return len(rows)
