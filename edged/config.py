"""The one configuration schema of edged.

The effective configuration is an immutable value (`EdgedConfig`) built from the YAML file plus an
optional remote overlay (a partial mapping of the same shape, sent over MQTT). Rebuilding and comparing
two values tells which parts of the running daemon must be reconfigured (`changed_paths`).

Every error names the key path, the YAML line where known, and what was expected.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edged.secrets import REDACTED, redact_text, redact_url, register_secret, split_userinfo

# Topic-safe identifier: no MQTT wildcards, no slashes, no spaces.
IDENT_RE = r"^[A-Za-z0-9_-]{1,64}$"
PACKAGE_DIR = Path(__file__).resolve().parent
# The source checkout (bench/, config/ ...); not part of an installed wheel.
PROJECT_ROOT = PACKAGE_DIR.parent


class _Section(BaseModel):
    # NaN / infinity are never a meaningful setting (and slip through `gt=0` bounds): refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- capture
class CaptureConfig(_Section):
    source: Union[int, str] = Field(
        "demo",
        description="Camera index (0 -> /dev/video0), a /dev/videoN path, a video file, an rtsp:// or "
        "http(s):// URL, or 'demo' for the built-in synthetic scene.",
    )
    name: str = Field("cam0", pattern=IDENT_RE, description="Camera name carried in every event.")
    width: Optional[int] = Field(None, ge=16, le=8192, description="Requested capture width (cameras).")
    height: Optional[int] = Field(None, ge=16, le=8192, description="Requested capture height (cameras).")
    fps_cap: float = Field(0.0, ge=0.0, le=240.0, description="Max frames per second processed; 0 = no cap.")
    loop: bool = Field(False, description="Restart a video file at its end instead of stopping.")
    reconnect_min_s: float = Field(1.0, gt=0.0, le=60.0)
    reconnect_max_s: float = Field(30.0, gt=0.0, le=3600.0)
    queue_size: int = Field(2, ge=1, le=64, description="Frames buffered between capture and detection.")
    live: Optional[bool] = Field(
        None,
        description="Frame policy: true = keep only the newest frame (drops counted), false = every frame "
        "with backpressure. Default: true for cameras, streams and 'demo' (paced in real time), false for files.",
    )
    timeout_s: float = Field(10.0, gt=0.0, le=300.0, description="Open/read timeout of network streams.")
    # Stream credentials kept out of the URL (and so out of the config file). They take the place of a
    # user / password written in the URL; the URL with them is built only when the stream is opened.
    username: Optional[str] = Field(None, description="User name for an rtsp:// or http(s):// source.")
    password_file: Optional[str] = Field(
        None, description="File holding only the stream password; $VARIABLES are expanded, so "
        "$CREDENTIALS_DIRECTORY/camera works with systemd's LoadCredential=.",
    )
    password_env: Optional[str] = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the stream password."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> "CaptureConfig":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @model_validator(mode="after")
    def _credentials(self) -> "CaptureConfig":
        if self.password_file and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        if not (self.username or self.password_file or self.password_env):
            return self
        if not (isinstance(self.source, str) and "://" in self.source):
            raise ValueError("username, password_file and password_env apply to a network stream source "
                             "(rtsp://, http(s)://, ...)")
        if (self.password_file or self.password_env) and not self.username:
            _, userinfo, _ = split_userinfo(self.source.strip())
            if not userinfo or not userinfo.partition(":")[0]:
                raise ValueError("a stream password needs a user: set username (or user@ in source)")
        return self


# ---------------------------------------------------------------------------------------------- models
Delegate = Literal["cpu", "edgetpu"]


class MotionConfig(_Section):
    """Motion-gated, region-based detection (edged/motion.py): the model looks only where something moved
    or a live track is due for a look, on a canvas into which those regions are packed."""

    enabled: bool = Field(True, description="false = the model looks at every whole frame (letterboxed).")
    width: int = Field(160, ge=32, le=1920, description="Motion is measured on a grey copy this many pixels wide.")
    threshold: float = Field(16.0, gt=0.0, le=255.0, description="Grey levels a pixel must differ from the background.")
    background_alpha: float = Field(
        0.02, gt=0.0, le=1.0, description="How fast the background follows the scene (per frame; larger = "
        "something that stops moving becomes background sooner)."
    )
    min_area: float = Field(0.0005, ge=0.0, le=1.0, description="Smallest moving blob, as a fraction of the frame.")
    region_margin: float = Field(0.4, ge=0.0, le=2.0, description="Regions grow by this fraction of their size on each side.")
    track_interval_s: float = Field(
        0.12, ge=0.0, le=60.0,
        description="A moving track is looked at again after this long (the Kalman filter predicts it in "
        "between); 0 = on every frame. New motion is always looked at at once.",
    )
    refresh_s: float = Field(
        3.0, gt=0.0, le=3600.0, description="A still track is looked at again at least this often (it is kept "
        "meanwhile: a frame that does not look at a track is not a miss for it)."
    )
    scan_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="The whole frame is looked at at least this often (and at the "
        "start): finds what is there without having been seen to move."
    )
    motion_interval_s: float = Field(
        0.5, ge=0.0, le=60.0, description="Motion no track explains, in a place just looked at without finding "
        "anything (leaves, a screen), is looked at again only after this long."
    )
    max_scale: float = Field(
        2.0, gt=0.0, le=4.0, description="A small (far-away) object's region is enlarged on the model's canvas "
        "up to this many canvas pixels per frame pixel (never fewer than in a whole-frame letterbox)."
    )


class DetectorConfig(_Section):
    model: str = Field("models/yolov3-tiny-416-int8.tflite", description="TFLite detector file.")
    input_size: Optional[int] = Field(
        None, ge=32, le=1536, description="Expected network input size; None = take it from the model."
    )
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    nms_iou: float = Field(0.45, gt=0.0, le=1.0)
    classes: List[str] = Field(["person"], description="Class allow-list by name; empty = all classes.")
    max_detections: int = Field(100, ge=1, le=1000)
    threads: int = Field(2, ge=1, le=64)
    backend: str = Field(
        "tflite", description="What runs the network: tflite (CPU, XNNPACK) or edgetpu (TFLite + the Edge TPU "
        "delegate, a model compiled by edgetpu_compiler); docs/detector-backends.md adds others.",
    )
    edgetpu_device: str = Field("usb:0", description="Edge TPU device, e.g. usb:0 or pci:0.")
    motion: MotionConfig = MotionConfig()

    @model_validator(mode="before")
    @classmethod
    def _old_delegate_key(cls, data: Any) -> Any:
        # detector.delegate (cpu | edgetpu) was replaced by detector.backend: configs written for an older
        # edged still start (a device upgraded in the field must not stop on it), with a warning.
        if not isinstance(data, dict) or "delegate" not in data:
            return data
        data = dict(data)
        old = data.pop("delegate")
        new = {"cpu": "tflite", "edgetpu": "edgetpu"}.get(old) if isinstance(old, str) else None
        if new is None:
            raise ValueError(f"detector.delegate: {old!r} is not cpu or edgetpu (and the key is now detector.backend: "
                             "tflite | edgetpu)")
        if "backend" in data and data["backend"] != new:
            raise ValueError(f"detector.delegate ({old}) contradicts detector.backend ({data['backend']}): "
                             "delegate is the old name of backend, remove it")
        data["backend"] = new
        logging.getLogger("edged.config").warning(
            "detector.delegate: %s is deprecated, write detector.backend: %s instead", old, new)
        return data

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        from edged.inference import backends  # numpy only: no runtime is imported

        if name not in backends.REGISTRY:
            raise ValueError(f"unknown detector backend {name!r}; known backends: {', '.join(backends.known())}")
        return name


class EncoderConfig(_Section):
    enabled: bool = True
    mode: Literal["always", "ambiguous"] = Field(
        "ambiguous",
        description="always = describe every detection; ambiguous = only those whose association needs "
        "appearance (more than one gated candidate, none, a track returning after a miss, or a track whose "
        "appearance is older than tracker.appearance_refresh_frames).",
    )
    model: str = Field("models/encoder.tflite", description="TFLite appearance (re-ID) encoder file.")
    threads: int = Field(2, ge=1, le=64)
    delegate: Delegate = "cpu"
    edgetpu_device: str = "usb:0"
    batch_size: int = Field(16, ge=1, le=256)


# ---------------------------------------------------------------------------------------------- tracker
DEFAULT_MAX_COSINE_DISTANCE = 0.2  # DeepSORT's value, for encoders that do not say what suits them


class TrackerConfig(_Section):
    max_age: int = Field(
        70, ge=1, le=10000,
        description="Misses before a confirmed track is deleted (the original DeepSORT paper code used 30, "
        "its later default is 70: with appearance, a person can be re-found after ~3 s at 25 fps).",
    )
    n_init: int = Field(3, ge=1, le=100, description="Consecutive hits before a track is confirmed.")
    max_iou_distance: float = Field(0.7, gt=0.0, le=1.0)
    max_cosine_distance: Optional[float] = Field(
        None, gt=0.0, le=2.0,
        description="Appearance gate (cosine distance). null = the value the encoder was calibrated for "
        "(its metadata: 0.12 for the default encoder), 0.2 (the DeepSORT paper's) when it has none.",
    )
    nn_budget: Optional[int] = Field(100, ge=1, le=10000, description="Features kept per track.")
    min_confidence: float = Field(0.3, ge=0.0, le=1.0, description="Detections below are not tracked.")
    gating_threshold: float = Field(
        18.4668, gt=0.0,
        description="Squared-Mahalanobis gate for appearance matches: chi-square 0.999, 4 dof (the original "
        "uses 0.95: 9.4877). Appearance decides; the gate only has to reject implausible jumps.",
    )
    use_appearance: bool = Field(True, description="False = motion + IoU only.")
    # Improvements over the original DeepSORT; each one measured alone in docs/tracker.md.
    feature_ema: float = Field(
        0.9, ge=0.0, lt=1.0,
        description="Track appearance as an exponential moving average with this momentum (StrongSORT: "
        "0.9); 0 = the original gallery of the last nn_budget features (nearest-neighbour distance).",
    )
    appearance_prototypes: int = Field(
        4, ge=1, le=64,
        description="With feature_ema: EMA prototypes kept per track (1 = one EMA vector). A feature far "
        "(> max_cosine_distance) from all of them starts a new one, replacing the stalest; matching uses "
        "the nearest prototype.",
    )
    ema_gallery_fallback: bool = Field(
        False,
        description="With feature_ema: also keep the nn_budget gallery; a pair the EMA rejects is re-checked "
        "against the gallery's nearest view (admissible pairs only), so EMA speed with gallery robustness.",
    )
    nsa_kalman: bool = Field(
        False, description="Scale the measurement noise by (1 - detection score) (NSA Kalman, GIAOTracker)."
    )
    matching_cascade: bool = Field(
        True, description="Match confirmed tracks by recency (DeepSORT cascade); False = one global assignment."
    )
    motion_weight: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Appearance cost fused with the squared Mahalanobis distance with this weight "
        "(StrongSORT: 0.02); 0 = appearance only, motion only gates.",
    )
    second_association: bool = Field(
        False,
        description="ByteTrack: detections scored in [low_score, high_score) are only matched (by IoU) to "
        "tracks seen in the previous frame, after the main association; they start no tracks.",
    )
    high_score: float = Field(0.6, ge=0.0, le=1.0, description="ByteTrack split between high and low detections.")
    low_score: float = Field(0.1, ge=0.0, le=1.0, description="ByteTrack: lower detections are ignored.")
    gate_position_only: bool = Field(
        True,
        description="Gate appearance matches on the box centre only (gating_threshold's chi-square quantile "
        "taken at 2 dof) instead of centre, aspect and height: a partly visible person changes aspect a lot.",
    )
    iou_stage_max_cosine: float = Field(
        0.4, ge=0.0, le=2.0,
        description="In the IoU association, a confirmed track only takes a detection within this cosine "
        "distance of its appearance; 2 = off (original: IoU alone).",
    )
    observation_reupdate: bool = Field(
        False,
        description="OC-SORT: when a lost track is found again, replay the Kalman filter along a straight "
        "virtual path from its last observation instead of trusting the drifted prediction.",
    )

    appearance_refresh_frames: int = Field(
        10, ge=1, le=10000,
        description="With lazy appearance (encoder.mode: ambiguous), a track's appearance is refreshed at "
        "least every this many frames even when its association is unambiguous.",
    )

    exit_outside_frame: bool = Field(
        False, description="Delete a missed track as soon as its predicted box has left the frame "
        "(prompt exit events) instead of after max_age misses; off, a person who steps out and back in "
        "within max_age keeps their id. Needs the frame size (the daemon has it).",
    )

    def resolved(self, encoder_suggestion: Optional[float] = None) -> "TrackerConfig":
        """A copy with a concrete appearance gate: the configured one, else the encoder's, else 0.2."""
        if self.max_cosine_distance is not None:
            return self
        value = encoder_suggestion if encoder_suggestion else DEFAULT_MAX_COSINE_DISTANCE
        return self.model_copy(update={"max_cosine_distance": float(value)})


# ---------------------------------------------------------------------------------------------- events
Point = Tuple[float, float]


def _check_normalised(points: Sequence[Point], what: str) -> None:
    for x, y in points:
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"{what} coordinates are normalised to the frame: 0..1, got ({x}, {y})")


class ZoneConfig(_Section):
    name: str = Field(..., pattern=IDENT_RE)
    polygon: List[Point] = Field(..., min_length=3, description="Normalised (x, y) vertices, 0..1.")
    classes: List[str] = Field([], description="Classes counted in the zone; empty = all tracked.")

    @field_validator("polygon")
    @classmethod
    def _norm(cls, v: List[Point]) -> List[Point]:
        _check_normalised(v, "polygon")
        return v


class LineConfig(_Section):
    name: str = Field(..., pattern=IDENT_RE)
    points: Tuple[Point, Point] = Field(..., description="Normalised endpoints (x1, y1), (x2, y2).")
    classes: List[str] = []

    @field_validator("points")
    @classmethod
    def _norm(cls, v: Tuple[Point, Point]) -> Tuple[Point, Point]:
        _check_normalised(v, "line")
        if v[0] == v[1]:
            raise ValueError("line endpoints must differ")
        return v


class EventsConfig(_Section):
    position_interval_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="A live track reports its position at least this often."
    )
    position_min_interval_s: float = Field(
        0.5, ge=0.0, le=3600.0, description="...and at most this often, even when moving."
    )
    position_min_move: float = Field(
        0.05, ge=0.0, le=1.0, description="Movement (fraction of frame diagonal) that triggers an update."
    )
    edge_margin: float = Field(
        0.03, ge=0.0, le=0.5, description="An exit this close to the frame border is reason 'left_frame'."
    )
    include_embedding: bool = Field(False, description="Add the mean appearance embedding to exit events.")
    line_hysteresis: float = Field(
        0.01, ge=0.0, le=0.5,
        description="A line crossing counts only once the point is this far (fraction of frame diagonal) "
        "beyond the line, so a track jittering on the line is not counted twice.",
    )
    zones: List[ZoneConfig] = []
    lines: List[LineConfig] = []

    @model_validator(mode="after")
    def _unique_names(self) -> "EventsConfig":
        names = [z.name for z in self.zones] + [ln.name for ln in self.lines]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"zone/line names must be unique, repeated: {', '.join(dup)}")
        return self


# ---------------------------------------------------------------------------------------------- mqtt
class TlsConfig(_Section):
    enabled: bool = False
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    verify_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> "TlsConfig":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self


class OutboxConfig(_Section):
    max_rows: int = Field(100_000, ge=10, le=10_000_000, description="Queued messages kept at most.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Queued payload bytes kept at most.")
    drop: Literal["oldest_position_first", "oldest"] = Field(
        "oldest_position_first",
        description="When full: drop position updates first, then the oldest messages.",
    )
    synchronous: Literal["normal", "full"] = Field(
        "normal",
        description="SQLite sync: 'normal' survives a daemon crash (SIGKILL); 'full' also a power cut, slower.",
    )


class HomeAssistantConfig(_Section):
    enabled: bool = False
    discovery_prefix: str = "homeassistant"


class MqttConfig(_Section):
    enabled: bool = True
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    client_id: Optional[str] = Field(None, description="Default: edged-<device_id>, or edged-<site>-<device_id> with a site.")
    username: Optional[str] = None
    password: Optional[str] = Field(None, repr=False)
    password_file: Optional[str] = Field(None, description="File holding the password (preferred).")
    password_env: Optional[str] = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the password."
    )
    topic_prefix: str = Field("edged", pattern=r"^[A-Za-z0-9_/-]{1,128}$")
    site: Optional[str] = Field(
        None, pattern=IDENT_RE,
        description="Optional site level: topics become <topic_prefix>/<site>/<device_id>/... ('fleet' is reserved).",
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto",
        description="MQTT protocol version. auto: MQTT 5, falling back to 3.1.1 for the rest of the run when the "
        "broker refuses version 5 (RabbitMQ, NATS, Azure IoT Hub...).",
    )
    position_expiry_s: float = Field(
        60.0, ge=0.0, le=86400.0,
        description="Position updates older than this are not sent; on MQTT 5 the broker also drops them for "
        "subscribers that have not received them within the rest of this time. 0 = never expire.",
    )
    keepalive: int = Field(30, ge=5, le=3600)
    qos_events: Literal[0, 1, 2] = 1
    qos_tracks: Literal[0, 1, 2] = 0
    reconnect_min_s: float = Field(1.0, gt=0.0, le=60.0)
    reconnect_max_s: float = Field(30.0, gt=0.0, le=3600.0)
    stats_interval_s: float = Field(30.0, gt=0.0, le=86400.0)
    max_inflight: int = Field(
        20, ge=1, le=1000, description="Unacknowledged QoS 1/2 publishes at once (capped by the broker's limit)."
    )
    max_rate: float = Field(
        0.0, ge=0.0, le=100000.0,
        description="Publishes per second at most, 0 = unlimited. Paces the backlog sent after an outage so "
        "slow subscribers keep up (mosquitto drops beyond max_queued_messages, default 1000, per subscriber).",
    )
    tls: TlsConfig = TlsConfig()
    outbox: OutboxConfig = OutboxConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> Any:
        # YAML reads `protocol: 5` as a number.
        return "5" if v == 5 and not isinstance(v, bool) else v

    @field_validator("site")
    @classmethod
    def _site(cls, v: Optional[str]) -> Optional[str]:
        if v == "fleet":
            raise ValueError("'fleet' is reserved for fleet-wide topics (<topic_prefix>/fleet/config/desired)")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or v.endswith("/") or "//" in v:
            raise ValueError("topic_prefix must not start or end with '/' or contain '//'")
        return v

    @model_validator(mode="after")
    def _secrets(self) -> "MqttConfig":
        if sum(1 for v in (self.password, self.password_file, self.password_env) if v) > 1:
            raise ValueError("give only one of password, password_file, password_env")
        return self


def default_client_id(device_id: str, site: Optional[str] = None) -> str:
    """edged-<device_id>; with a site edged-<site>-<device_id>: device ids may repeat across sites, client
    ids on one broker must not (a broker disconnects the older of two clients with the same id)."""
    return f"edged-{site}-{device_id}" if site else f"edged-{device_id}"


# ---------------------------------------------------------------------------------------------- rest
class WebConfig(_Section):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="Bind address of the debug HTTP server; beyond loopback, set "
                      "username and password_file (anyone who reaches it sees the camera).")
    port: int = Field(8080, ge=0, le=65535, description="0 = pick a free port.")
    mjpeg_fps: float = Field(5.0, gt=0.0, le=60.0)
    jpeg_quality: int = Field(70, ge=10, le=100)
    username: Optional[str] = Field(None, description="HTTP Basic auth user (with password_file); /healthz stays open.")
    password_file: Optional[str] = Field(None, description="File holding only the HTTP Basic auth password.")
    max_stream_clients: int = Field(4, ge=1, le=64, description="Simultaneous /stream.mjpg viewers; more get 503.")
    max_connections: int = Field(16, ge=2, le=256, description="Simultaneous connections (one thread each); more get 503.")
    client_timeout_s: float = Field(
        10.0, gt=0.0, le=600.0, description="Drop a client that sends nothing, or stops reading, for this long."
    )

    @field_validator("username")
    @classmethod
    def _user(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not v or ":" in v):
            raise ValueError("must be non-empty and contain no ':' (HTTP Basic auth)")
        return v

    @model_validator(mode="after")
    def _auth_and_caps(self) -> "WebConfig":
        if (self.username is None) != (self.password_file is None):
            raise ValueError("give both username and password_file (HTTP Basic auth), or neither")
        if self.max_stream_clients >= self.max_connections:
            raise ValueError("max_stream_clients must be below max_connections (the page and status need a connection too)")
        return self


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "text", "journal"] = Field(
        "auto", description="auto = journald priorities under systemd, plain lines on a terminal."
    )


class SupervisorConfig(_Section):
    max_restarts: int = Field(
        5, ge=0, le=1000,
        description="A stage (capture, inference, tracking, publisher, web) that fails more often than this "
        "within restart_window_s makes the daemon exit non-zero (the broker publishes `offline` from the "
        "last will, systemd restarts the service).",
    )
    restart_window_s: float = Field(300.0, gt=0.0, le=86400.0)
    backoff_min_s: float = Field(0.5, gt=0.0, le=60.0, description="First wait before restarting a failed stage.")
    backoff_max_s: float = Field(30.0, gt=0.0, le=3600.0, description="The wait doubles up to this.")
    stall_s: float = Field(
        30.0, gt=0.0, le=3600.0,
        description="No processed frame for this long while the source delivers: unhealthy (systemd "
        "watchdog not fed, /healthz 503).",
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> "SupervisorConfig":
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must be >= backoff_min_s")
        return self


class RemoteConfigConfig(_Section):
    enabled: bool = Field(
        True, description="Follow <prefix>/<device>/config/desired (and the fleet topic): operators change "
        "this config over MQTT; each change is validated, applied live, persisted in state_dir, reported.",
    )
    follow_fleet: bool = Field(True, description="Also follow <prefix>/fleet/config/desired (the device topic wins).")
    max_payload_bytes: int = Field(65536, ge=1024, le=1048576, description="Larger desired messages are rejected.")
    hmac_secret_file: Optional[str] = Field(
        None, description="File holding a shared secret: desired messages must then be signed (HMAC-SHA256, "
        "see docs/remote-config.md); unsigned or tampered ones are rejected.",
    )
    hmac_secret_env: Optional[str] = Field(None, description="...or the environment variable holding it.")
    health_timeout_s: float = Field(
        15.0, gt=0.0, le=600.0,
        description="After a change, frames must flow again within this time, or the previous config is "
        "restored and the change reported `failed`.",
    )

    @model_validator(mode="after")
    def _one_secret(self) -> "RemoteConfigConfig":
        if self.hmac_secret_file and self.hmac_secret_env:
            raise ValueError("give hmac_secret_file or hmac_secret_env, not both")
        return self


class EdgedConfig(_Section):
    device_id: str = Field("edged", pattern=IDENT_RE, description="Unique per device; part of every topic.")
    state_dir: str = Field("state", description="Outbox, remote config and track ids live here.")
    capture: CaptureConfig = CaptureConfig()
    detector: DetectorConfig = DetectorConfig()
    encoder: EncoderConfig = EncoderConfig()
    tracker: TrackerConfig = TrackerConfig()
    events: EventsConfig = EventsConfig()
    mqtt: MqttConfig = MqttConfig()
    web: WebConfig = WebConfig()
    logging: LoggingConfig = LoggingConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    remote_config: RemoteConfigConfig = RemoteConfigConfig()


# ---------------------------------------------------------------------------------------------- loading
class ConfigError(Exception):
    """A configuration that cannot be used. `problems` lists one readable line per error."""

    def __init__(self, source: str, problems: List[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def __str__(self) -> str:
        return f"invalid configuration {self.source}:\n" + "\n".join(f"  - {p}" for p in self.problems)


def _line_of(node: Optional[yaml.Node], loc: Sequence[Union[str, int]]) -> Optional[int]:
    """1-based YAML line of the key (or item) at `loc`, the deepest one that exists."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _model_for(loc: Sequence[Union[str, int]]) -> Optional[type]:
    """The pydantic model class that owns the key at `loc` (for 'did you mean')."""
    model: Any = EdgedConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann] + list(inner or [])
        nxt = None
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                nxt = c
            for cc in getattr(c, "__args__", ()) or ():
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        if nxt is None:
            return None
        model = nxt
    return model


def format_errors(exc: ValidationError, root: Optional[yaml.Node] = None) -> List[str]:
    problems = []
    for err in exc.errors():
        loc = [p for p in err["loc"]]
        path = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc) if root is not None else None
        where = f"{path} (line {line})" if line else path
        kind = err["type"]
        if kind == "extra_forbidden":
            model = _model_for(loc)
            known = list(model.model_fields) if model else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; known keys: {', '.join(known)}" if known else "")
            problems.append(f"{where}: unknown key{hint}")
            continue
        msg = err["msg"]
        if kind.startswith("value_error"):
            msg = msg.replace("Value error, ", "")
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {redact_text(repr(value))})"
        if "password" in path:
            shown = ""
        problems.append(f"{where}: {msg}{shown}")
    return problems


def deep_merge(base: Dict[str, Any], overlay: Dict[str, Any]) -> Dict[str, Any]:
    """`overlay` on top of `base`: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_yaml(text: str, source: str) -> Tuple[Dict[str, Any], Optional[yaml.Node]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections (capture:, detector:, ...)"])
    return data, root


def build_config(data: Dict[str, Any], source: str = "<config>", root: Optional[yaml.Node] = None) -> EdgedConfig:
    try:
        return EdgedConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_errors(exc, root)) from None


def load_config(path: Union[str, Path, None], overlay: Optional[Dict[str, Any]] = None) -> EdgedConfig:
    """Read the YAML file (None = defaults), apply `overlay`, validate. Raises ConfigError."""
    data: Dict[str, Any] = {}
    root = None
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
        data, root = parse_yaml(text, source)
    if overlay:
        # Errors in an overlay are reported by key path; lines refer to the file only.
        return build_config(deep_merge(data, overlay), source + " + overlay", None)
    return build_config(data, source, root)


def config_to_dict(cfg: EdgedConfig, *, redact: bool = True) -> Dict[str, Any]:
    """Plain (YAML/JSON-ready) mapping. Secrets are redacted unless asked otherwise: every password field,
    the credentials of every URL (capture.source: `rtsp://user:***@cam/x`) and every registered secret."""
    data = cfg.model_dump(mode="json")
    return _redacted(data) if redact else data


def _is_password_key(key: str) -> bool:
    # password_file / password_env name where the secret is, they are not secrets themselves.
    return "password" in key.lower() and not key.lower().endswith(("_file", "_env"))


def _redacted(node: Any, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _redacted(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_redacted(v, key) for v in node]
    if isinstance(node, str) and node:
        return REDACTED if _is_password_key(key) else redact_url(node) if "://" in node else redact_text(node)
    return node


def changed_paths(old: EdgedConfig, new: EdgedConfig) -> List[str]:
    """Dotted key paths whose value differs between two configs (leaf level for mappings)."""
    out: List[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            out.append(prefix)

    walk(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    return out


def resolve_path(value: str, config_path: Union[str, Path, None] = None) -> Path:
    """A relative path in the config: next to the config file, else the working directory, else the
    installed package (where the default models/ live, also in a wheel install)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    candidates = []
    if config_path is not None:
        candidates.append(Path(config_path).resolve().parent / p)
    candidates += [Path.cwd() / p, PACKAGE_DIR / p]
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def resolve_state_dir(cfg: EdgedConfig, config_path: Union[str, Path, None] = None) -> Path:
    """The state directory: a relative `state_dir` is next to the config file (as the config header
    says), else in the working directory. Unlike `resolve_path`, nothing is searched: the directory
    may not exist yet, and its place must not depend on what happens to exist."""
    p = Path(cfg.state_dir).expanduser()
    if p.is_absolute():
        return p
    base = Path(config_path).resolve().parent if config_path is not None else Path.cwd()
    return base / p


def read_secret(section: str, password_file: Optional[str], password_env: Optional[str],
                config_path: Union[str, Path, None] = None, *, name: str = "password") -> Optional[str]:
    """The secret named by `<section>.<name>_file` or `<section>.<name>_env` (None when neither is set),
    registered with edged.secrets so that no log line can show it. Raises ConfigError naming the key."""
    if password_file:
        key = f"{section}.{name}_file"
        path = resolve_path(os.path.expandvars(password_file), config_path)
        try:
            secret = path.read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise ConfigError(key, [f"{key}: cannot read {path}: {exc.strerror or exc}"]) from None
        except UnicodeDecodeError:
            raise ConfigError(key, [f"{key}: {path} is not UTF-8 text"]) from None
        if not secret:
            raise ConfigError(key, [f"{key}: {path} is empty"])
    elif password_env:
        key = f"{section}.{name}_env"
        secret = os.environ.get(password_env, "")
        if not secret:
            raise ConfigError(key, [f"{key}: environment variable {password_env} is not set or empty"])
    else:
        return None
    register_secret(secret)
    return secret


def read_password(cfg: MqttConfig, config_path: Union[str, Path, None] = None) -> Optional[str]:
    """The MQTT password: mqtt.password_file, mqtt.password_env or mqtt.password."""
    secret = read_secret("mqtt", cfg.password_file, cfg.password_env, config_path)
    if secret is None:
        secret = cfg.password
        register_secret(secret)
    return secret


def read_stream_password(cfg: CaptureConfig, config_path: Union[str, Path, None] = None) -> Optional[str]:
    """The stream password of capture.password_file / capture.password_env, or None (a password written in
    capture.source is used as it is)."""
    return read_secret("capture", cfg.password_file, cfg.password_env, config_path)


_SOURCE_DEV_RE = re.compile(r"^/dev/video(\d+)$")


def camera_index(source: Union[int, str]) -> Optional[int]:
    """V4L2 index for `0`, `"0"` or `/dev/video0`; None for files, URLs and 'demo'."""
    if isinstance(source, int):
        return source
    if source.isdigit():
        return int(source)
    m = _SOURCE_DEV_RE.match(source)
    return int(m.group(1)) if m else None


def parse_assignment(item: str) -> Dict[str, Any]:
    """`tracker.max_age=50` -> {"tracker": {"max_age": 50}} (the value is parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", [f"expected KEY=VALUE, got {item!r}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: Dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out
