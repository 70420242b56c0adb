"""`edged run`: the daemon. Builds the parts from the config, runs them under a supervisor, handles
signals and talks to systemd.

    capture -> [inference stage] -> [tracking stage] -> outbox (SQLite) -> publisher -> MQTT
                                         |                                    debug HTTP server

The stage loops live in edged/pipeline.py; this module decides which parts to build, routes records to
topics (edged/mqtt/topics.py owns the routing table), supervises every thread (edged/supervisor.py),
feeds the systemd watchdog only while the pipeline and the publisher make progress, and publishes stats.
Exit codes: edged/exitcodes.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

from edged import __version__, exitcodes
from edged.config import (
    ConfigError, EdgedConfig, deep_merge, load_config, parse_assignment, read_password, resolve_state_dir,
)
from edged.logs import setup_logging
from edged.events import iso_utc
from edged.pipeline import Pipeline
from edged.sdnotify import Notifier, watchdog_interval_s
from edged.statefiles import ensure_private_dir
from edged.supervisor import Supervisor
from edged.types import Detections, Frame, TrackerStep

log = logging.getLogger("edged.service")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument("--source", help="override capture.source (camera index, /dev/videoN, file, URL, demo)")
    p.add_argument("--no-mqtt", action="store_true", help="do not connect to a broker (events still logged)")
    p.add_argument("--mot-out", help="write confirmed tracks per frame in MOTChallenge format to this file")
    p.add_argument("--print-events", action="store_true", help="print every event as a JSON line on stdout")
    p.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0 = no limit)")
    p.add_argument("--state-dir", help="override state_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set tracker.max_age=50 (repeatable; YAML values)")


class StartupError(Exception):
    """A start-up failure: one line for the log, and the exit code it maps to."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run(args: argparse.Namespace) -> int:
    try:
        overlay: Dict[str, Any] = {}
        if args.state_dir:
            # A --state-dir on the command line is relative to where the command runs.
            overlay["state_dir"] = str(Path(args.state_dir).expanduser().absolute())
        if args.source is not None:
            overlay["capture"] = {"source": args.source}
        if args.no_mqtt:
            overlay["mqtt"] = {"enabled": False}
        for item in args.set:
            overlay = deep_merge(overlay, parse_assignment(item))
        base_cfg = load_config(args.config, overlay=overlay or None)
    except ConfigError as exc:
        setup_logging()
        log.error("%s", exc)
        return exitcodes.CONFIG
    setup_logging(base_cfg.logging.level, base_cfg.logging.format)
    from edged.preflight import exit_code, preflight

    replay = getattr(args, "replay", None)
    cfg, store, remote_problem = effective_at_start(base_cfg, args.config, overlay)
    # A replay uses neither the camera nor the models: nothing of theirs to check.
    problems = preflight(cfg, args.config) if replay is None else []
    if problems and cfg is not base_cfg and replay is None and not preflight(base_cfg, args.config):
        # What the remote overlay names cannot be used any more (a model file removed...): start on the
        # config file rather than not at all, and say so in the log and in config/reported.
        remote_problem = "remote overlay not used at start: " + "; ".join(str(p) for p in problems)
        log.error("%s", remote_problem)
        cfg, problems = base_cfg, []
    if problems:
        for p in problems:
            log.error("cannot start: %s", p)
        return exit_code(problems)
    if cfg.logging != base_cfg.logging:
        setup_logging(cfg.logging.level, cfg.logging.format)
    daemon = Daemon(
        cfg,
        config_path=args.config,
        mot_out=args.mot_out,
        print_events=args.print_events,
        max_frames=args.max_frames,
        base_overlay=overlay,
        remote_store=store,
        remote_problem=remote_problem,
        replay=replay,
    )
    stop = daemon.stop_event

    def on_signal(signum, _frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return exc.exit_code


def effective_at_start(base_cfg: EdgedConfig, config_path: Optional[str], base_overlay: Dict[str, Any]
                       ) -> Tuple[EdgedConfig, Optional[Any], Optional[str]]:
    """The config to start on: the file (+ command line) with the remote overlay persisted in state_dir.
    An overlay that no longer validates (the file changed under it) is left out, never fatal."""
    from edged.remote_config import OVERLAY_FILE, OverlayStore, effective_config

    path = resolve_state_dir(base_cfg, config_path) / OVERLAY_FILE
    try:
        store = OverlayStore.load(path)
    except ConfigError as exc:
        log.error("%s", exc)
        return base_cfg, OverlayStore(path), f"remote overlay unreadable: {'; '.join(exc.problems)}"
    if not store.combined():
        return base_cfg, store, None
    try:
        cfg = effective_config(config_path, base_overlay, store)
    except ConfigError as exc:
        problem = "remote overlay not used at start, it no longer validates: " + "; ".join(exc.problems)
        log.error("%s", problem)
        return base_cfg, store, problem
    log.info("remote overlay applied at start: versions %s", store.versions)
    return cfg, store, None


def startup_error(exc: BaseException) -> Optional[StartupError]:
    """The exit code and one line for an exception raised while building the parts; None when it is
    not a known start-up failure (a bug: the traceback is worth having)."""
    from edged.inference.runtime import ModelError
    from edged.mqtt.client import MqttSetupError
    from edged.mqtt.outbox import OutboxError

    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, ConfigError):
        return StartupError(" ".join(str(exc).split()), exitcodes.CONFIG)
    if isinstance(exc, (ModelError, MqttSetupError)):
        return StartupError(str(exc), exitcodes.CONFIG)
    if isinstance(exc, OutboxError):
        return StartupError(str(exc), exitcodes.CANT_CREATE)
    from edged.web import WebBindError

    if isinstance(exc, WebBindError):
        return StartupError(str(exc), exitcodes.TEMP_FAIL)
    if isinstance(exc, (ValueError, OSError)):
        return StartupError(str(exc), exitcodes.CONFIG)
    return None


# ---------------------------------------------------------------------------------------------- sink
class OutboxSink:
    """The pipeline's sink in the daemon: one frame's events (and the changed state) routed by the
    Router and committed to the outbox in one transaction; then logged, printed and handed on (what a
    consumer sees here survives a crash)."""

    def __init__(self, outbox: Any, router: Any, *, print_events: bool = False,
                 on_event: Optional[Callable[[dict], None]] = None):
        self.outbox = outbox
        self.router = router
        self.print_events = print_events
        self.on_event = on_event

    def emit(self, events: List[dict], state: Optional[dict]) -> None:
        if self.outbox is not None:
            rows = [self.router.event(ev["type"]).row(_json(ev)) for ev in events]
            if state is not None:
                rows.append(self.router.state.row(_json(state)))
            if rows:
                self.outbox.put_many(rows)
        for ev in events:
            if ev["type"] != "position":
                log.info("event %s track=%s class=%s%s", ev["type"], ev.get("track_id"), ev.get("class"),
                         f" reason={ev['reason']}" if "reason" in ev else "")
            if self.print_events:
                print(json.dumps(ev), flush=True)
            if self.on_event is not None:
                self.on_event(ev)


def _json(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class MotWriter:
    """--mot-out: confirmed tracks matched in each frame, MOTChallenge format (frame ids 1-based)."""

    def __init__(self, fh: TextIO):
        self.fh = fh

    def __call__(self, frame: Frame, step: TrackerStep, _dets: Detections) -> None:
        for t in step.tracks:
            if t.time_since_update == 0:
                x1, y1, x2, y2 = (float(v) for v in t.box)
                self.fh.write(f"{frame.index + 1},{t.track_id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},1,-1,-1,-1\n")


class FullFrameDetector:
    """The pipeline's detector part without motion gating: the model on every whole frame."""

    last_calls = 1

    def __init__(self, model: Any):
        self.model = model
        self.macs_per_call = int(getattr(model, "macs", 0) or 0)

    def detect_frame(self, frame: Frame) -> Detections:
        return self.model.detect(frame.image)

    @property
    def last_invoke_ms(self) -> float:
        return float(getattr(self.model, "last_timing", {}).get("invoke_ms", 0.0))


def frame_detector(model: Any, cfg: EdgedConfig, view: Callable[[], Any]) -> Any:
    """The detector part the config asks for: motion-gated regions (detector.motion.enabled) or the
    model on every whole frame."""
    m = cfg.detector.motion
    if not m.enabled:
        return FullFrameDetector(model)
    from edged.motion import GatedDetector, MotionDetector, RegionPlanner

    return GatedDetector(
        model, view,
        motion=MotionDetector(width=m.width, threshold=m.threshold, alpha=m.background_alpha, min_area=m.min_area),
        planner=RegionPlanner(region_margin=m.region_margin, track_interval_s=m.track_interval_s,
                              refresh_s=m.refresh_s, motion_interval_s=m.motion_interval_s, scan_s=m.scan_s),
        max_scale=m.max_scale,
    )


class CaptureFeed:
    """The capture thread as the pipeline's FrameSource."""

    def __init__(self, capture: Any):
        self.capture = capture

    def get(self, timeout: Optional[float] = None) -> Optional[Frame]:
        return self.capture.get(timeout)

    @property
    def finished(self) -> bool:
        return self.capture.ended.is_set()


# ---------------------------------------------------------------------------------------------- daemon
class Daemon:
    def __init__(
        self,
        cfg: EdgedConfig,
        *,
        config_path: Optional[str] = None,
        mot_out: Optional[str] = None,
        print_events: bool = False,
        max_frames: int = 0,
        on_event: Optional[Callable[[dict], None]] = None,
        fatal_exit: Callable[[int], None] = os._exit,
        base_overlay: Optional[Dict[str, Any]] = None,
        remote_store: Optional[Any] = None,
        remote_problem: Optional[str] = None,
        replay: Optional[argparse.Namespace] = None,
    ):
        self.cfg = cfg
        self.replay = replay
        self.base_overlay = base_overlay or {}
        self._remote_store = remote_store
        self._remote_problem = remote_problem
        self.remote = None  # RemoteConfigStage when remote configuration is on
        self._frame_tick = threading.Condition()
        self.config_path = config_path
        self.mot_out = mot_out
        self.print_events = print_events
        self.max_frames = max_frames
        self.on_event = on_event
        self._fatal_exit = fatal_exit
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._fatal: Optional[Tuple[str, BaseException]] = None
        self.started_at = time.time()
        self._run_started = time.monotonic()
        self._rate_mark = (time.monotonic(), 0)
        self.outbox = None
        self.publisher = None
        self.web = None
        self.capture = None
        self.pipeline: Optional[Pipeline] = None
        self._stats_errors = 0
        sv = cfg.supervisor
        self.supervisor = Supervisor(
            self.stop_event, on_fatal=self._on_fatal, max_restarts=sv.max_restarts,
            window_s=sv.restart_window_s, backoff_min_s=sv.backoff_min_s, backoff_max_s=sv.backoff_max_s,
        )
        # The publisher and the web server outlive the pipeline's stop (they drain / serve to the end).
        self._service_stop = threading.Event()

    # ------------------------------------------------------------------------------------ building
    def source_text(self) -> str:
        """The source as it may be shown (credentials redacted)."""
        if self.capture is not None:
            return self.capture.source.description
        return "(not opened)"

    def _build(self) -> None:
        try:
            self._build_parts()
        except Exception as exc:
            err = startup_error(exc)
            if err is None:
                raise
            raise err from None

    def _build_parts(self) -> None:
        cfg = self.cfg
        from edged.events import EventEngine
        from edged.mqtt.topics import Router, Topics
        from edged.seqcounter import IdReservation, SequenceCounter
        from edged.tracking.tracker import Tracker

        self.state_dir = _state_dir(cfg, self.config_path)
        self.encoder = None
        if self.replay is not None:
            from edged.replay import build_replay

            self.detector, self.capture = build_replay(self.replay, cfg)
            self.source = self.capture.source
            detector_part: Any = self.detector
        else:
            from edged.capture import CaptureThread, open_source
            from edged.inference.yolo import YoloDetector

            self.detector = YoloDetector.from_config(cfg.detector, self.config_path)
            detector_part = frame_detector(self.detector, cfg, self.track_view)
            if cfg.encoder.enabled and cfg.tracker.use_appearance:
                from edged.inference.encoder import AppearanceEncoder

                self.encoder = AppearanceEncoder.from_config(cfg.encoder, self.config_path)
        suggestion = getattr(self.encoder, "suggested_max_cosine_distance", None)
        tracker_cfg = cfg.tracker.resolved(suggestion)
        self.track_ids = IdReservation(self.state_dir / "track_ids")
        self.tracker = Tracker(tracker_cfg, first_id=self.track_ids.start())
        log.info("tracker: appearance gate %.3f%s", tracker_cfg.max_cosine_distance,
                 " (from the encoder's calibration)" if cfg.tracker.max_cosine_distance is None and suggestion else "")
        if self.replay is None:
            self.source = open_source(cfg.capture, self.config_path)
            self.capture = CaptureThread(self.source, cfg.capture)
        self.seq = SequenceCounter(self.state_dir / "sequence")
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id, cfg.mqtt.site)
        self.router = Router(self.topics, qos_events=cfg.mqtt.qos_events, qos_tracks=cfg.mqtt.qos_tracks)
        if cfg.mqtt.enabled:
            from edged.mqtt.client import MqttPublisher

            from edged.mqtt.outbox import Outbox

            self.outbox = Outbox.open_or_recover(self.state_dir / "outbox.sqlite3", cfg.mqtt.outbox)
            self.publisher = MqttPublisher(
                cfg.mqtt, device_id=cfg.device_id, outbox=self.outbox, topics=self.topics,
                password=read_password(cfg.mqtt, self.config_path), config_path=self.config_path,
            )
        observers: list = [self._tick]
        self.mot_fh = open(self.mot_out, "w") if self.mot_out else None
        if self.mot_fh is not None:
            observers.append(MotWriter(self.mot_fh))

        def make_engine(frame: Frame, fps: Optional[float]) -> EventEngine:
            c = self.cfg  # the config current when the first frame arrives
            return EventEngine(
                c.events, device_id=c.device_id, camera=c.capture.name,
                class_names=list(self.detector.class_names), frame_size=frame.size, fps=fps,
                next_seq=self.seq, track_classes=list(c.detector.classes),
            )

        def source_fps() -> Optional[float]:
            fps = getattr(self.source, "fps", None)
            return fps if fps and fps > 0 else None

        self.sink = OutboxSink(self.outbox, self.router, print_events=self.print_events, on_event=self.on_event)
        self.pipeline = Pipeline(
            source=CaptureFeed(self.capture), detector=detector_part, encoder=self.encoder,
            encode_lazily=cfg.encoder.mode == "ambiguous",
            tracker=self.tracker, make_engine=make_engine, sink=self.sink, source_fps=source_fps,
            observers=observers, max_frames=self.max_frames,
        )
        if self.publisher is not None and cfg.remote_config.enabled:
            self._build_remote_config()

    def _tick(self, frame: Frame, _step: TrackerStep, _dets: Detections) -> None:
        with self._frame_tick:
            self._frame_tick.notify_all()

    def track_view(self) -> Any:
        """The live tracks for planning the frame being detected (as of the frame detected before it, edged.pipeline)."""
        from edged.types import TrackView

        return self.pipeline.track_view() if self.pipeline is not None else TrackView.empty()

    def _build_remote_config(self) -> None:
        from edged.remote_config import (
            OVERLAY_FILE, OverlayStore, RemoteConfigManager, RemoteConfigStage, read_hmac_secret,
        )

        store = self._remote_store or OverlayStore(self.state_dir / OVERLAY_FILE)
        manager = RemoteConfigManager(
            config_path=self.config_path, base_overlay=self.base_overlay, store=store, current=self.cfg,
            apply=self.apply_config, health=self.health_after_change,
            secret=read_hmac_secret(self.cfg, self.config_path),
        )
        self.remote = RemoteConfigStage(manager, self._publish_outcome)
        self.publisher.subscribe(self.topics.config_desired, lambda _t, payload, _r: self.remote.offer("device", payload))
        if self.cfg.remote_config.follow_fleet:
            self.publisher.subscribe(self.topics.fleet_config_desired,
                                     lambda _t, payload, _r: self.remote.offer("fleet", payload))

    # ------------------------------------------------------------------------------------ debug view
    @property
    def device_id(self) -> str:
        return self.cfg.device_id

    def latest(self) -> Tuple[Optional[Frame], list]:
        got = self.pipeline.latest() if self.pipeline is not None else None
        return (got[0], got[1]) if got else (None, [])

    def overlays(self) -> Tuple[list, list, list]:
        ev = self.cfg.events
        names = list(getattr(getattr(self, "detector", None), "class_names", ()))
        return list(ev.zones), list(ev.lines), names

    # ------------------------------------------------------------------------------------ health
    def health(self) -> Tuple[bool, str]:
        """For /healthz and the watchdog's view: (ok, why)."""
        if self._fatal is not None:
            return False, f"stage {self._fatal[0]} failed for good"
        problems = []
        for name, rec in self.supervisor.stats().items():
            if rec["state"] in ("backoff", "failed"):
                problems.append(f"stage {name} {rec['state']}: {rec['last_error']}")
        flowing, why = self._frames_flowing()
        if not flowing:
            problems.append(why)
        if self.publisher is not None:
            ok, pwhy = self.publisher.health()
            if not ok:
                problems.append(pwhy)
        return (False, "; ".join(problems)) if problems else (True, "ok")

    def _frames_flowing(self, start_grace: bool = False) -> Tuple[bool, str]:
        """Frames processed recently (within supervisor.stall_s). Before the first frame: not yet, unless
        `start_grace` (the watchdog's view: a model may take a while to load, a camera to open)."""
        if self.capture is None or self.pipeline is None:
            return False, "not started"
        cap = self.capture.stats()
        state = cap.get("state")
        last = self.pipeline.counters.last_frame_at
        if state in ("reconnecting", "failed", "stopped"):
            return False, f"source {state}: {cap.get('last_error')}"
        if state == "ended":
            return True, "ok"
        if not last:
            age = time.monotonic() - self._run_started
            if start_grace and age <= self.cfg.supervisor.stall_s:
                return True, "starting"
            return False, f"no frame processed yet ({age:.0f} s after start)"
        age = time.monotonic() - last
        if age > self.cfg.supervisor.stall_s:
            return False, f"no frame processed for {age:.0f} s"
        return True, "ok"

    def watchdog_ok(self) -> bool:
        """Feed systemd's watchdog only while nothing is stuck: the pipeline processes frames (or the
        source is honestly reconnecting, or a failed stage is being restarted) and the publisher is
        not wedged. A hung stage stops the feeding and systemd restarts the service."""
        if self._fatal is not None:
            return False
        if self.publisher is not None and not self.publisher.health()[0]:
            return False
        if self.capture is not None and self.capture.stats().get("state") in ("starting", "reconnecting", "ended"):
            return True
        if not self.supervisor.healthy(["inference", "tracking"]):
            return True  # being restarted with backoff; the supervisor gives up (exits) if it keeps failing
        return self._frames_flowing(start_grace=True)[0]

    # ------------------------------------------------------------------------------------ stats
    def stats(self) -> Dict[str, Any]:
        cap = self.capture.stats() if self.capture is not None else {}
        counters = self.pipeline.counters if self.pipeline is not None else None
        processed = counters.frames_processed if counters else 0
        now = time.monotonic()
        prev_t, prev_n = self._rate_mark
        inference_fps = (processed - prev_n) / (now - prev_t) if now > prev_t else 0.0
        if now - prev_t >= 1.0:
            self._rate_mark = (now, processed)
        ok, why = self.health()
        out: Dict[str, Any] = {
            "device": self.cfg.device_id,
            "version": __version__,
            "ts": iso_utc(time.time()),
            "uptime_s": round(time.time() - self.started_at, 1),
            "healthy": ok,
            "health": why,
            "capture_fps": round(float(cap.get("fps", 0.0) or 0.0), 2),
            "inference_fps": round(max(0.0, inference_fps), 2),
            "dropped_frames": int(cap.get("dropped", 0) or 0),
            "frames_processed": processed,
            "events": counters.events if counters else 0,
            "detections": counters.detections if counters else 0,
            "detector_calls": counters.detector_calls if counters else 0,
            "encoded_crops": counters.encoded if counters else 0,
            # Device-independent cost: multiply-accumulates executed per frame (docs/performance.md turns it
            # into the fps to expect on a Raspberry Pi or a Coral).
            "gmac_per_frame": round(counters.macs / processed / 1e9, 3) if counters and processed else 0.0,
            "model_ms_per_frame": round(counters.model_ms / processed, 2) if counters and processed else 0.0,
            # Frames per second over the whole run so far (first to last processed frame).
            "processing_fps": round((processed - 1) / (counters.last_frame_at - counters.first_frame_at), 2)
            if counters and processed > 1 and counters.last_frame_at > counters.first_frame_at else 0.0,
            "capture": cap,
            "stage_ms": {k: round(v, 2) for k, v in (counters.stage_ms.items() if counters else ())},
            "stages": self.supervisor.stats(),
            "stage_failures": self.supervisor.total_failures,
            "outbox_depth": self.outbox.depth() if self.outbox is not None else 0,
            "cpu_temperature_c": cpu_temperature(),
        }
        if self.publisher is not None:
            out["mqtt"] = self.publisher.stats()
            out["outbox_oldest_age_s"] = out["mqtt"].get("oldest_undelivered_age_s")
        if self.remote is not None:
            m = self.remote.manager
            out["remote_config"] = {"applied_versions": m.store.versions, "effective_hash": m.effective_hash,
                                    "outcomes": dict(m.counts), "dropped": self.remote.dropped}
        recovered = getattr(self.outbox, "recovered", None)
        if recovered:
            out["outbox_recovered"] = recovered
        return out

    def _publish_stats(self) -> None:
        if self.outbox is None:
            return
        try:
            self.outbox.put_many([self.router.stats.row(_json(self.stats()))])
        except Exception as exc:  # stats are best effort; the stages' own failures are supervised
            self._stats_errors += 1
            if self._stats_errors == 1 or self._stats_errors % 20 == 0:
                log.warning("stats not queued (%d times): %s", self._stats_errors, exc)

    # ------------------------------------------------------------------------------------ remote config
    REBUILD_ENCODER_KEYS = ("encoder.model", "encoder.threads", "encoder.delegate", "encoder.edgetpu_device",
                            "encoder.batch_size")

    def apply_config(self, old: EdgedConfig, new: EdgedConfig, changed: List[str]) -> None:
        """Bring the running parts from `old` to `new` (the key paths in `changed` differ). Parts that
        need rebuilding (a model, the source) are built here first, off the stage threads; then each
        stage swaps or reconfigures its own parts between two frames. Raises when a part refuses."""
        from edged.remote_config import _under

        def touched(*prefixes: str) -> bool:
            return any(_under(c, prefixes) for c in changed)

        p = self.pipeline
        assert p is not None
        from edged.inference.yolo import split_changes

        # 1. Build, off the stage threads (model loading and opening a source take time).
        live_detector, rebuild_detector = split_changes(old.detector, new.detector)
        motion_changed = "motion" in rebuild_detector  # the detector part changes, not the model
        rebuild_detector = [k for k in rebuild_detector if k != "motion"]
        new_model = None
        if rebuild_detector and self.replay is None:
            from edged.inference.yolo import YoloDetector

            new_model = YoloDetector.from_config(new.detector, self.config_path)
            if list(new_model.class_names) != list(self.detector.class_names):
                raise ValueError("detector.model: the new model has other classes than the running one; "
                                 "set it in the config file and restart edged")
        encoder_wanted = new.encoder.enabled and new.tracker.use_appearance and self.replay is None
        new_encoder = self.encoder if encoder_wanted else None
        encoder_swapped = encoder_wanted and self.encoder is not None and touched(*self.REBUILD_ENCODER_KEYS)
        if encoder_wanted and (self.encoder is None or encoder_swapped):
            from edged.inference.encoder import AppearanceEncoder

            new_encoder = AppearanceEncoder.from_config(new.encoder, self.config_path)
        new_capture = new_source = None
        if any(_under(c, ("capture",)) and c != "capture.name" for c in changed):
            from edged.capture import CaptureThread, open_source

            new_source = open_source(new.capture, self.config_path)
            problem = new_source.check()
            if problem:
                raise ValueError(problem)
            new_capture = CaptureThread(new_source, new.capture)
        suggestion = getattr(new_encoder, "suggested_max_cosine_distance", None)
        tracker_cfg = new.tracker.resolved(suggestion)

        # 2. The inference stage's parts.
        def on_inference() -> None:
            if new_model is not None:
                self.detector = new_model
            elif live_detector:
                self.detector.configure(**live_detector)
            if (new_model is not None or motion_changed) and self.replay is None:
                p.detector = frame_detector(self.detector, new, self.track_view)
            self.encoder = p.encoder = new_encoder
            p.encode_lazily = new.encoder.mode == "ambiguous"
            if new_capture is not None:
                old_capture = self.capture
                old_capture.stop()
                new_capture.start()
                self.capture, self.source = new_capture, new_source
                p.source = CaptureFeed(new_capture)

        # 3. The tracking stage's parts.
        def on_tracking() -> None:
            if touched("tracker", "encoder") or tracker_cfg != self.tracker.cfg:
                self.tracker.set_config(tracker_cfg)
            if encoder_swapped:
                self.tracker.forget_appearance()  # features of another model cannot be compared
            if touched("mqtt.qos_events", "mqtt.qos_tracks"):
                from edged.mqtt.topics import Router

                self.router = self.sink.router = Router(self.topics, qos_events=new.mqtt.qos_events,
                                                        qos_tracks=new.mqtt.qos_tracks)
            engine = p.engine
            if engine is not None:
                if touched("capture.name"):
                    engine.set_camera(new.capture.name)
                if touched("detector.classes"):
                    engine.set_track_classes(list(new.detector.classes))
                if touched("events"):
                    p.deliver(engine.set_config(new.events))

        self._run_on_stage(p.inference_commands, "inference", on_inference, p.inference_done)
        self._run_on_stage(p.tracking_commands, "tracking", on_tracking, p.tracking_done)
        # 4. Parts with their own threads and locks.
        if touched("web") and self.web is not None:
            self.web.reconfigure(new.web)
        elif touched("web") and new.web.enabled:
            self.cfg = new
            self._start_web()
        if touched("logging.level"):
            from edged.logs import set_level

            set_level(new.logging.level)
        if touched("supervisor"):
            sv = new.supervisor
            self.supervisor.max_restarts, self.supervisor.window_s = sv.max_restarts, sv.restart_window_s
            self.supervisor.backoff_min_s, self.supervisor.backoff_max_s = sv.backoff_min_s, sv.backoff_max_s
        self.cfg = new
        if new.mqtt.homeassistant.enabled and touched("mqtt.homeassistant", "events.zones", "detector.classes"):
            self._queue_discovery()

    def _run_on_stage(self, commands: Any, stage: str, fn: Callable[[], None], loop_ended: bool,
                      timeout: float = 30.0) -> None:
        """Run `fn` on the stage's thread between frames and wait for it; directly when the stage loop has
        ended (nothing else touches its parts then)."""
        if loop_ended or not self.supervisor.alive(stage):
            fn()
            return
        cmd = commands.submit(f"config:{stage}", fn)
        if not cmd.wait(timeout):
            raise TimeoutError(f"the {stage} stage did not take the change within {timeout:.0f} s")
        cmd.result()

    def health_after_change(self, timeout: float) -> Optional[str]:
        """None when frames flow (two more processed within `timeout`), else why not. timeout 0: is the
        pipeline healthy right now."""
        p = self.pipeline
        if p is None or p.tracking_done or p.inference_done:
            return None  # the stream has ended: nothing left to judge
        if timeout <= 0:
            ok, why = self._frames_flowing()
            return None if ok else why
        start = p.counters.frames_processed
        deadline = time.monotonic() + timeout
        with self._frame_tick:
            while p.counters.frames_processed < start + 2:
                left = deadline - time.monotonic()
                if left <= 0 or self.stop_event.is_set():
                    state = self.capture.stats() if self.capture is not None else {}
                    return (f"no frame processed within {timeout:.0f} s (source {state.get('state')}: "
                            f"{state.get('last_error') or 'no error'})")
                self._frame_tick.wait(min(left, 0.5))
        return None

    def _publish_outcome(self, outcome: Any) -> None:
        rows = [self._report_row(outcome)]
        if outcome.status == "applied":
            rows.append(self._effective_row())
        self.outbox.put_many(rows)

    def _effective_row(self) -> tuple:
        from edged.config import config_to_dict
        from edged.remote_config import config_hash

        body = config_to_dict(self.cfg)
        body["effective_hash"] = config_hash(self.cfg)
        return self.router.config_effective.row(_json(body))

    def _report_row(self, outcome: Any) -> tuple:
        assert self.remote is not None
        manager = self.remote.manager
        return self.router.config_reported.row(_json(outcome.report(manager.effective_hash, manager.store.versions)))

    def _publish_remote_start(self) -> None:
        """At start: the effective config (retained, for dashboards), and a `failed` report when the
        persisted overlay could not be used."""
        rows = [self._effective_row()]
        if self._remote_problem and self.remote is not None:
            from edged.remote_config import Outcome

            rows.append(self._report_row(Outcome("failed", "device", None, [self._remote_problem])))
        self.outbox.put_many(rows)

    # ------------------------------------------------------------------------------------ failure
    def _on_fatal(self, stage: str, exc: BaseException) -> None:
        self._fatal = (stage, exc)
        self._wake.set()

    def _die(self, notifier: Notifier) -> None:
        """A stage kept failing: exit non-zero at once, without a clean MQTT DISCONNECT, so the broker
        publishes the last will (`offline`) and systemd restarts us. The outbox is already durable."""
        stage, exc = self._fatal  # type: ignore[misc]
        log.critical("exiting: stage %s kept failing (%s: %s); queued messages stay in the outbox",
                     stage, type(exc).__name__, exc)
        notifier.status(f"failed: stage {stage} kept failing")
        for h in logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:
                pass
        sys.stdout.flush()
        self._fatal_exit(exitcodes.STAGE_FAILED)

    # ------------------------------------------------------------------------------------ run
    def run(self) -> int:
        notifier = Notifier()
        self._build()
        assert self.pipeline is not None and self.capture is not None
        pipeline, stop = self.pipeline, self.stop_event
        if self.publisher is not None:
            if self.cfg.mqtt.homeassistant.enabled:
                self._queue_discovery()
            if self.remote is not None:
                self._publish_remote_start()
            self.publisher.start(spawn=lambda name, body: self.supervisor.spawn(name, body, stop=self._service_stop))
        if self.cfg.web.enabled:
            self._start_web()
        self.capture.start()
        self._run_started = time.monotonic()
        self.supervisor.spawn("tracking", lambda: pipeline.run_tracking(stop))
        self.supervisor.spawn("inference", lambda: pipeline.run_inference(stop))
        if self.remote is not None:
            remote = self.remote
            self.supervisor.spawn("remote-config", lambda: remote.run(self._service_stop), stop=self._service_stop)
        source = self.source_text()
        notifier.ready(f"running on {source}")
        log.info("edged %s running: device=%s source=%s mqtt=%s", __version__, self.cfg.device_id, source,
                 "on" if self.publisher else "off")
        wd = watchdog_interval_s()
        next_stats = time.monotonic() + self.cfg.mqtt.stats_interval_s
        exit_code = exitcodes.OK
        while not stop.is_set():
            self._wake.wait(min(1.0, wd or 1.0))
            self._wake.clear()
            if self._fatal is not None:
                self._die(notifier)
                return exitcodes.STAGE_FAILED  # only reached when fatal_exit returns (in-process tests)
            if pipeline.tracking_done:
                break  # the file ended (or max_frames): everything is processed
            if self.capture.failed and pipeline.inference_done:
                exit_code = exitcodes.NO_INPUT
                break
            if wd and self.watchdog_ok():
                notifier.watchdog()
            self.track_ids.ensure(self.tracker.next_id)
            if time.monotonic() >= next_stats:
                next_stats += self.cfg.mqtt.stats_interval_s
                self._publish_stats()
        return self._shutdown(notifier, exit_code)

    def _shutdown(self, notifier: Notifier, exit_code: int) -> int:
        notifier.stopping()
        log.info("stopping")
        pipeline = self.pipeline
        assert pipeline is not None
        self.stop_event.set()
        self.capture.stop()
        self.supervisor.join("inference", timeout=15)
        tracking_ended = self.supervisor.join("tracking", timeout=15)
        if self._fatal is not None:
            self._die(notifier)
            return exitcodes.STAGE_FAILED
        if tracking_ended:
            try:
                pipeline.finish()
            except Exception as exc:
                log.error("final exit events not queued: %s", exc)
            self.track_ids.close(self.tracker.next_id)
        else:
            log.error("tracking stage did not stop in time; final exit events not queued")
        if self.mot_fh is not None:
            self.mot_fh.close()
        if self.web is not None:
            self.web.stop()
        if self.publisher is not None:
            self._publish_stats()
            self.publisher.stop(timeout=5.0)
        self._service_stop.set()
        if self.outbox is not None:
            left = self.outbox.depth()
            if left:
                log.info("%d messages kept in the outbox for the next start", left)
        notifier.close()
        counters = pipeline.counters
        log.info("stopped after %d frames, %d events", counters.frames_processed, counters.events)
        if exit_code == exitcodes.OK and self.supervisor.total_failures and pipeline.undelivered:
            exit_code = exitcodes.STAGE_FAILED
        return exit_code

    def _queue_discovery(self) -> None:
        from edged.mqtt.homeassistant import discovery_messages, queue_discovery

        classes = list(self.cfg.detector.classes) or list(self.detector.class_names)
        rc = self.cfg.remote_config
        # Dashboard controls send unsigned remote-config messages: only where those are accepted.
        controls = self.remote is not None and not (rc.hmac_secret_file or rc.hmac_secret_env)
        queue_discovery(self.outbox, discovery_messages(
            self.cfg.mqtt, topics=self.topics, class_names=classes, zones=[z.name for z in self.cfg.events.zones],
            camera=self.cfg.capture.name, sw_version=__version__, controls=controls))

    def _start_web(self) -> None:
        from edged.web import DebugServer

        self.web = DebugServer(self.cfg.web, self, config_path=self.config_path)
        try:
            self.web.start(spawn=lambda name, body: self.supervisor.spawn(name, body, stop=self._service_stop,
                                                                          critical=False))
        except Exception as exc:
            err = startup_error(exc)
            if err is None:
                raise
            raise err from None


def _state_dir(cfg: EdgedConfig, config_path: Optional[str]) -> Path:
    """The state directory (relative paths follow the config file), created private (0700)."""
    path = resolve_state_dir(cfg, config_path)
    try:
        ensure_private_dir(path)
    except OSError as exc:
        raise StartupError(f"state_dir: cannot create {path}: {exc.strerror or exc}", exitcodes.CANT_CREATE) from None
    return path


def cpu_temperature() -> Optional[float]:
    """SoC temperature in degrees C where the kernel exposes it (Raspberry Pi, most ARM boards)."""
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")):
        try:
            return round(int(zone.read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            continue
    return None
