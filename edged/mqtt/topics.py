"""The MQTT contract of one device, owned here and nowhere else: topic names, and which record goes to
which topic with which QoS / retain flag (the routing table).

Everything a device writes lives under `<prefix>/<device_id>/` (or `<prefix>/<site>/<device_id>/` with a
site level) so that one broker ACL line (`pattern write edged/%u/#` style, or
`topic write edged/<device>/#`) covers a device. The daemon builds one `Topics` and one `Router` at
start-up and hands them to every part that publishes. The contract (retain, QoS, schema of each topic)
is documented in docs/mqtt.md; tests check the docs and schemas against `SUBTOPICS` and `EVENT_TYPES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from edged.types import EVENT_TYPES, POSITION

ONLINE = "online"
OFFLINE = "offline"

# Event types published on the `events` topic (Home Assistant's event entity lists these).
EVENTS_TOPIC_TYPES = tuple(t for t in EVENT_TYPES if t != POSITION)

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64})*$")

# name -> sub-topic under the device base
SUBTOPICS: Dict[str, str] = {
    "availability": "availability",
    "events": "events",
    "tracks": "tracks",
    "state": "state",
    "stats": "stats",
    "config_desired": "config/desired",
    "config_reported": "config/reported",
    "config_effective": "config/effective",
}
FLEET_SEGMENT = "fleet"  # <prefix>/fleet/config/desired: followed by every device under the prefix


class Topics:
    """Topic names for one device: `Topics("edged", "cam-hall").events == "edged/cam-hall/events"`."""

    def __init__(self, prefix: str, device_id: str, site: Optional[str] = None):
        if not _PREFIX_RE.match(prefix or ""):
            raise ValueError(f"mqtt.topic_prefix {prefix!r}: use letters, digits, '_', '-' and single '/'")
        if not _SEGMENT_RE.match(device_id or ""):
            raise ValueError(f"device_id {device_id!r}: use 1-64 letters, digits, '_' or '-'")
        if site is not None and not _SEGMENT_RE.match(site):
            raise ValueError(f"mqtt.site {site!r}: use 1-64 letters, digits, '_' or '-'")
        if device_id == FLEET_SEGMENT or site == FLEET_SEGMENT:
            raise ValueError(f"'{FLEET_SEGMENT}' is reserved for fleet-wide topics; pick another device_id / site")
        self.prefix = prefix
        self.device_id = device_id
        self.site = site
        self.base = f"{prefix}/{site}/{device_id}" if site else f"{prefix}/{device_id}"
        for name, sub in SUBTOPICS.items():
            setattr(self, name, f"{self.base}/{sub}")
        self.fleet_config_desired = f"{prefix}/{FLEET_SEGMENT}/config/desired"

    # Declared for type checkers; set in __init__ from SUBTOPICS.
    availability: str
    events: str
    tracks: str
    state: str
    stats: str
    config_desired: str
    config_reported: str
    config_effective: str

    def sub(self, name: str) -> str:
        """Any topic under the device base, e.g. `sub("config/desired")`."""
        name = name.strip("/")
        if not name or any(c in name for c in "+#") or "//" in name:
            raise ValueError(f"bad sub-topic {name!r}")
        return f"{self.base}/{name}"

    def as_dict(self) -> Dict[str, str]:
        """Every registered topic by name (docs, `edged config show`, ACL hints)."""
        out = {name: f"{self.base}/{sub}" for name, sub in SUBTOPICS.items()}
        out["fleet_config_desired"] = self.fleet_config_desired
        return out

    @property
    def all(self) -> str:
        """Subscription filter for everything this device writes (and the ACL pattern)."""
        return f"{self.base}/#"

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r}, {self.device_id!r}{', ' + repr(self.site) if self.site else ''})"


def subscription(prefix: str, device: str = "+", sub: str = "#", site: Optional[str] = None) -> str:
    """A subscription filter over the same layout as `Topics` (device and site may be the wildcard
    `+`), e.g. `subscription("edged", "+", "events")` == "edged/+/events"."""
    parts = [prefix] + ([site] if site else []) + [device, sub.strip("/") or "#"]
    return "/".join(parts)


@dataclass(frozen=True)
class Route:
    """Where and how one record is published (and how the outbox treats it)."""

    topic: str
    qos: int
    retain: bool
    kind: str  # outbox kind: the drop policy and the stats count by it
    coalesce_key: Optional[str] = None  # a newer queued row with the same key replaces the older one

    def row(self, payload: Union[bytes, str]) -> Tuple[str, Union[bytes, str], int, bool, str, Optional[str]]:
        """The outbox row (Outbox.put_many) that publishes `payload` this way."""
        return (self.topic, payload, self.qos, self.retain, self.kind, self.coalesce_key)


class Router:
    """The routing table: record -> Route. The only place that decides topics, QoS and retain."""

    def __init__(self, topics: Topics, *, qos_events: int = 1, qos_tracks: int = 0):
        self.topics = topics
        self.qos_events = int(qos_events)
        self.qos_tracks = int(qos_tracks)
        self._position = Route(topics.tracks, self.qos_tracks, False, "position")
        self._event = Route(topics.events, self.qos_events, False, "event")

    def event(self, record_type: str) -> Route:
        """`position` records go to `tracks`, every other event type to `events`."""
        if record_type == POSITION:
            return self._position
        if record_type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {record_type!r}; known: {', '.join(EVENT_TYPES)}")
        return self._event

    @property
    def state(self) -> Route:
        return Route(self.topics.state, 1, True, "state", "state")

    @property
    def stats(self) -> Route:
        return Route(self.topics.stats, 0, False, "stats", "stats")

    @property
    def config_reported(self) -> Route:
        return Route(self.topics.config_reported, 1, True, "config", "config_reported")

    @property
    def config_effective(self) -> Route:
        return Route(self.topics.config_effective, 1, True, "config", "config_effective")

    @staticmethod
    def discovery(topic: str) -> Route:
        return Route(topic, 1, True, "discovery", f"ha:{topic}")

