"""The MQTT topic layout of one device, and builders for the payloads this package defines.

Everything a device writes lives under `<prefix>/<device_id>/` so that one broker ACL line
(`pattern write edged/%u/#` style, or `topic write edged/<device>/#`) covers a device.
The contract (retain, QoS, schema of each topic) is documented in docs/mqtt.md.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Dict, Mapping, Optional

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

    def __getattr__(self, name: str) -> str:
        # Only reached for unknown attributes: resolve the registered sub-topics.
        sub = SUBTOPICS.get(name)
        if sub is None:
            raise AttributeError(name)
        return f"{self.base}/{sub}"

    # Explicit properties for the fixed layout (IDE/type-checker friendly).
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


def utc_now_iso() -> str:
    """UTC timestamp in RFC 3339 with milliseconds and a 'Z', as used in every payload."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def state_payload(
    *,
    device: str,
    camera: str,
    counts: Mapping[str, int],
    zones: Optional[Mapping[str, Mapping[str, int]]] = None,
    updated_at: Optional[str] = None,
) -> dict:
    """The retained `state` message (schemas/state.schema.json): live tracks per class and per zone.

    `counts` = {class: live confirmed tracks}; `zones` = {zone: {class: tracks inside}}.
    Classes with zero live tracks may be omitted or given as 0; consumers treat missing as 0.
    """
    counts = {str(k): int(v) for k, v in counts.items()}
    zones_out = {str(z): {str(k): int(v) for k, v in per.items()} for z, per in (zones or {}).items()}
    return {
        "device": device,
        "camera": camera,
        "updated_at": updated_at or utc_now_iso(),
        "total": sum(counts.values()),
        "counts": counts,
        "zones": {z: {"total": sum(per.values()), "counts": per} for z, per in zones_out.items()},
    }


def stats_payload(
    *,
    device: str,
    uptime_s: float,
    capture_fps: float,
    inference_fps: float,
    stage_ms: Mapping[str, float],
    dropped_frames: int,
    outbox_depth: int,
    cpu_temp_c: Optional[float],
    extra: Optional[Mapping[str, object]] = None,
) -> dict:
    """The periodic `stats` message (schemas/stats.schema.json).

    `stage_ms` = mean milliseconds per frame of each stage since the last stats message, e.g.
    {"capture": 1.2, "detect": 48.0, "encode": 9.5, "track": 1.1, "events": 0.2}.
    `cpu_temp_c` is None where the temperature is not readable. `extra` adds free-form fields
    (e.g. "mqtt": MqttPublisher.stats()) which the schema allows.
    """
    out = {
        "device": device,
        "at": utc_now_iso(),
        "uptime_s": round(float(uptime_s), 3),
        "capture_fps": round(float(capture_fps), 3),
        "inference_fps": round(float(inference_fps), 3),
        "stage_ms": {str(k): round(float(v), 3) for k, v in stage_ms.items()},
        "dropped_frames": int(dropped_frames),
        "outbox_depth": int(outbox_depth),
        "cpu_temp_c": None if cpu_temp_c is None else round(float(cpu_temp_c), 1),
    }
    if extra:
        for k, v in extra.items():
            out.setdefault(k, v)
    return out
