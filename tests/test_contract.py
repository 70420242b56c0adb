"""The MQTT contract has one owner (edged/mqtt/topics.py with edged.types.EVENT_TYPES): the schemas, the
docs, the routing table and Home Assistant discovery agree with it."""

from __future__ import annotations

import json

import pytest

from edged.mqtt.homeassistant import EVENT_TYPES as HA_EVENT_TYPES
from edged.mqtt.topics import EVENTS_TOPIC_TYPES, SUBTOPICS, Router, Topics, subscription
from edged.types import EVENT_TYPES, POSITION
from tests.conftest import ROOT

SCHEMAS = ROOT / "edged" / "mqtt" / "schemas"


def test_event_schema_lists_exactly_the_event_types():
    schema = json.loads((SCHEMAS / "event.schema.json").read_text())
    assert sorted(schema["properties"]["type"]["enum"]) == sorted(EVENT_TYPES)
    branches = {b["if"]["properties"]["type"]["const"] for b in schema["allOf"]}
    assert branches == set(EVENT_TYPES)


def test_docs_describe_every_event_type_and_topic():
    events_doc = (ROOT / "docs" / "events.md").read_text()
    mqtt_doc = (ROOT / "docs" / "mqtt.md").read_text()
    for t in EVENT_TYPES:
        assert f"`{t}`" in events_doc, f"docs/events.md does not describe {t}"
    for sub in SUBTOPICS.values():
        assert f"<prefix>/<device>/{sub}`" in mqtt_doc, f"docs/mqtt.md has no row for {sub}"


def test_routing_table_and_home_assistant_follow_the_one_list():
    topics = Topics("edged", "cam1")
    router = Router(topics, qos_events=1, qos_tracks=0)
    assert router.event(POSITION).topic == topics.tracks and router.event(POSITION).qos == 0
    for t in EVENTS_TOPIC_TYPES:
        route = router.event(t)
        assert (route.topic, route.qos, route.retain) == (topics.events, 1, False)
    with pytest.raises(ValueError):
        router.event("teleport")
    assert HA_EVENT_TYPES == list(EVENTS_TOPIC_TYPES) and POSITION not in HA_EVENT_TYPES
    assert router.state.retain and router.config_reported.retain and not router.stats.retain


def test_topics_layout_with_and_without_site():
    plain, sited = Topics("edged", "cam1"), Topics("edged", "cam1", site="shop-7")
    assert plain.events == "edged/cam1/events" and sited.events == "edged/shop-7/cam1/events"
    assert plain.fleet_config_desired == sited.fleet_config_desired == "edged/fleet/config/desired"
    assert subscription("edged", "+", "events") == "edged/+/events"
    assert subscription("edged", "+", "#", site="+") == "edged/+/+/#"
    for bad in ("a/b", "+", "fleet", ""):
        with pytest.raises(ValueError):
            Topics("edged", bad)
