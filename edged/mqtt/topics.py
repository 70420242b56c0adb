"""The MQTT topic layout of one device.

Everything a device writes lives under `<prefix>/<device_id>/` so that one broker ACL line
(`pattern write edged/%u/#` style, or `topic write edged/<device>/#`) covers a device.
The contract (retain, QoS, schema of each topic) is documented in docs/mqtt.md.
"""

from __future__ import annotations

import re
from typing import Dict

ONLINE = "online"
OFFLINE = "offline"

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64})*$")

# name -> sub-topic under the device base. The config-over-MQTT issue adds
# "config_set": "config/set" and "config_effective": "config/effective" here.
SUBTOPICS: Dict[str, str] = {
    "availability": "availability",
    "events": "events",
    "tracks": "tracks",
    "state": "state",
    "stats": "stats",
}


class Topics:
    """Topic names for one device: `Topics("edged", "cam-hall").events == "edged/cam-hall/events"`."""

    def __init__(self, prefix: str, device_id: str):
        if not _PREFIX_RE.match(prefix or ""):
            raise ValueError(f"mqtt.topic_prefix {prefix!r}: use letters, digits, '_', '-' and single '/'")
        if not _SEGMENT_RE.match(device_id or ""):
            raise ValueError(f"device_id {device_id!r}: use 1-64 letters, digits, '_' or '-'")
        self.prefix = prefix
        self.device_id = device_id
        self.base = f"{prefix}/{device_id}"

    def sub(self, name: str) -> str:
        """Any topic under the device base, e.g. `sub("config/set")`."""
        name = name.strip("/")
        if not name or any(c in name for c in "+#") or "//" in name:
            raise ValueError(f"bad sub-topic {name!r}")
        return f"{self.base}/{name}"

    def as_dict(self) -> Dict[str, str]:
        """Every registered topic by name (docs, `edged config show`, ACL hints)."""
        return {name: f"{self.base}/{sub}" for name, sub in SUBTOPICS.items()}

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def tracks(self) -> str:
        return f"{self.base}/tracks"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def all(self) -> str:
        """Subscription filter for everything this device writes (and the ACL pattern)."""
        return f"{self.base}/#"

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r}, {self.device_id!r})"
