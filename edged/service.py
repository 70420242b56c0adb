"""`edged run`: the daemon.

Stages run in their own threads, joined by bounded queues, data flowing one way:

    capture -> [frames] -> detect+encode -> [detections] -> track+events -> outbox (SQLite) -> publisher -> MQTT

A live camera keeps only its newest frame (drops are counted), a file delivers every frame; a slow stage
or a down broker never blocks capture, and memory stays flat. The supervisor loop watches the stages,
feeds the systemd watchdog and publishes stats.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional


from edged import __version__
from edged.config import ConfigError, EdgedConfig, deep_merge, load_config, parse_assignment, read_password
from edged.logs import setup_logging
from edged.sdnotify import Notifier, watchdog_interval_s
from edged.types import Detections, Frame, TrackerStep

log = logging.getLogger("edged.service")

_END = object()  # end-of-stream marker passed down the queues


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


def run(args: argparse.Namespace) -> int:
    try:
        overlay: Dict[str, Any] = {}
        if args.state_dir:
            overlay["state_dir"] = args.state_dir
        for item in args.set:
            overlay = deep_merge(overlay, parse_assignment(item))
        cfg = load_config(args.config, overlay=overlay or None)
    except ConfigError as exc:
        setup_logging()
        log.error("%s", exc)
        return 2
    setup_logging(cfg.logging.level, cfg.logging.format)
    daemon = Daemon(
        cfg,
        config_path=args.config,
        source_override=args.source,
        mqtt_enabled=cfg.mqtt.enabled and not args.no_mqtt,
        mot_out=args.mot_out,
        print_events=args.print_events,
        max_frames=args.max_frames,
    )
    stop = daemon.stop_event

    def on_signal(signum, _frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:  # a model, source or state file that cannot be used: say which, no traceback
        from edged.inference.runtime import ModelError

        if isinstance(exc, (ModelError, OSError, ValueError)):
            log.error("cannot start: %s", exc)
            return 2
        raise


@dataclass
class _Detected:
    frame: Frame
    detections: Detections


class StageTimer:
    """Exponential moving averages of per-stage milliseconds, for stats and /metrics."""

    def __init__(self) -> None:
        self.ms: Dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            prev = self.ms.get(stage)
            self.ms[stage] = ms if prev is None else 0.9 * prev + 0.1 * ms

    def snapshot(self) -> Dict[str, float]:
        with self._lock:
            return {k: round(v, 2) for k, v in self.ms.items()}


class Daemon:
    def __init__(
        self,
        cfg: EdgedConfig,
        *,
        config_path: Optional[str] = None,
        source_override: Optional[str] = None,
        mqtt_enabled: bool = True,
        mot_out: Optional[str] = None,
        print_events: bool = False,
        max_frames: int = 0,
        on_event: Optional[Callable[[dict], None]] = None,
    ):
        self.cfg = cfg
        self.config_path = config_path
        self.source_override = source_override
        self.mqtt_enabled = mqtt_enabled
        self.mot_out = mot_out
        self.print_events = print_events
        self.max_frames = max_frames
        self.on_event = on_event
        self.stop_event = threading.Event()
        self.timer = StageTimer()
        self.started_at = time.time()
        self.frames_processed = 0
        self.events_emitted = 0
        self.last_frame_at = 0.0
        self.errors: List[str] = []
        self.latest: Dict[str, Any] = {}  # newest frame + tracks for the debug web view
        self._rate_mark = (time.monotonic(), 0)
        self._track_thread: Optional[threading.Thread] = None
        self._run_started = time.monotonic()

    # ------------------------------------------------------------------------------------ building
    def _build(self) -> None:
        cfg = self.cfg
        from edged.capture import CaptureThread, open_source
        from edged.events import EventEngine
        from edged.inference.yolo import YoloDetector
        from edged.tracking.tracker import Tracker
        from edged.seqcounter import IdReservation, SequenceCounter

        self.state_dir = Path(cfg.state_dir).expanduser()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.detector = YoloDetector.from_config(cfg.detector, self.config_path)
        self.encoder = None
        if cfg.encoder.enabled and cfg.tracker.use_appearance:
            from edged.inference.encoder import AppearanceEncoder

            self.encoder = AppearanceEncoder.from_config(cfg.encoder, self.config_path)
        suggestion = getattr(self.encoder, "suggested_max_cosine_distance", None)
        self.tracker_cfg = cfg.tracker.resolved(suggestion)
        self.track_ids = IdReservation(self.state_dir / "track_ids")
        self.tracker = Tracker(self.tracker_cfg, first_id=self.track_ids.start())
        log.info("tracker: appearance gate %.3f%s", self.tracker_cfg.max_cosine_distance,
                 " (from the encoder's calibration)" if cfg.tracker.max_cosine_distance is None and suggestion else "")
        self.source = open_source(cfg.capture, self.config_path, self.source_override)
        self.capture = CaptureThread(self.source, cfg.capture)
        self.seq = SequenceCounter(self.state_dir / "sequence")
        self.engine_factory = lambda size, fps: EventEngine(
            cfg.events,
            device_id=cfg.device_id,
            camera=cfg.capture.name,
            class_names=list(self.detector.class_names),
            frame_size=size,
            fps=fps,
            next_seq=self.seq,
            track_classes=list(cfg.detector.classes),
        )
        self.engine = None
        self.outbox = None
        self.publisher = None
        from edged.mqtt.topics import Topics

        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        if self.mqtt_enabled:
            from edged.mqtt.client import MqttPublisher
            from edged.mqtt.outbox import Outbox

            self.outbox = Outbox.from_config(cfg.mqtt.outbox, self.state_dir / "outbox.sqlite3")
            self.publisher = MqttPublisher(
                cfg.mqtt,
                device_id=cfg.device_id,
                outbox=self.outbox,
                password=read_password(cfg.mqtt, self.config_path),
                config_path=self.config_path,
            )
        self.det_queue: "queue.Queue[Any]" = queue.Queue(maxsize=4)
        self.mot_fh = open(self.mot_out, "w") if self.mot_out else None

    # ------------------------------------------------------------------------------------ output
    def _emit(self, topic: str, payload: dict, qos: int, kind: str, retain: bool = False, coalesce: Optional[str] = None) -> None:
        if self.outbox is not None:
            data = json.dumps(payload, separators=(",", ":")).encode()
            self.outbox.put(topic, data, qos=qos, retain=retain, kind=kind, coalesce_key=coalesce)

    def _emit_events(self, events: List[dict]) -> None:
        """One frame's events: queued in one outbox transaction (one commit, not one per event)."""
        cfg = self.cfg.mqtt
        rows = []
        for ev in events:
            self.events_emitted += 1
            if ev["type"] == "position":
                topic, qos, kind = self.topics.tracks, cfg.qos_tracks, "position"
            else:
                topic, qos, kind = self.topics.events, cfg.qos_events, "event"
                log.info("event %s track=%s class=%s%s", ev["type"], ev.get("track_id"), ev.get("class"),
                         f" reason={ev['reason']}" if "reason" in ev else "")
            if self.outbox is not None:
                rows.append((topic, json.dumps(ev, separators=(",", ":")).encode(), qos, False, kind, None))
        if rows:
            self.outbox.put_many(rows)
        # Printed / handed on only once committed: what a consumer sees here survives a crash.
        for ev in events:
            if self.print_events:
                print(json.dumps(ev), flush=True)
            if self.on_event is not None:
                self.on_event(ev)

    def _emit_state(self) -> None:
        if self.engine is None:
            return
        body = self.engine.state()
        self._emit(self.topics.state, body, 1, "state", retain=True, coalesce="state")

    def stats(self) -> Dict[str, Any]:
        cap = self.capture.stats() if hasattr(self, "capture") else {}
        pub = self.publisher.stats() if self.publisher is not None else None
        now = time.monotonic()
        prev_t, prev_n = self._rate_mark
        inference_fps = (self.frames_processed - prev_n) / (now - prev_t) if now > prev_t else 0.0
        if now - prev_t >= 1.0:
            self._rate_mark = (now, self.frames_processed)
        out = {
            "device": self.cfg.device_id,
            "version": __version__,
            "ts": _iso_now(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "capture_fps": round(float(cap.get("fps", 0.0) or 0.0), 2),
            "inference_fps": round(max(0.0, inference_fps), 2),
            "dropped_frames": int(cap.get("dropped", 0) or 0),
            "frames_processed": self.frames_processed,
            "events": self.events_emitted,
            "capture": cap,
            "stage_ms": self.timer.snapshot(),
            "outbox_depth": self.outbox.depth() if self.outbox is not None else 0,
            "cpu_temperature_c": cpu_temperature(),
        }
        if pub is not None:
            out["mqtt"] = pub
        return out

    # ------------------------------------------------------------------------------------ stages
    def _inference_loop(self) -> None:
        enc = self.encoder
        try:
            while not self.stop_event.is_set():
                frame = self.capture.get(timeout=0.2)
                if frame is None:
                    if self.capture.ended.is_set():
                        break
                    continue
                t0 = time.perf_counter()
                dets = self.detector.detect(frame.image)
                dets.frame_size = frame.size
                t1 = time.perf_counter()
                if enc is not None and len(dets):
                    dets.features = enc.encode(frame.image, dets.boxes)
                t2 = time.perf_counter()
                self.timer.add("detect", (t1 - t0) * 1e3)
                if enc is not None:
                    self.timer.add("encode", (t2 - t1) * 1e3)
                self._handoff(_Detected(frame, dets))
                if self.max_frames and frame.index + 1 >= self.max_frames:
                    break
        except Exception as exc:  # a stage that dies must stop the daemon loudly, not hang it
            log.exception("inference stage failed")
            self.errors.append(f"inference: {exc}")
            self.stop_event.set()
        finally:
            self._handoff(_END)

    def _handoff(self, item: Any) -> None:
        """Queue for the tracking stage; blocks (backpressure) only while that stage is alive."""
        while True:
            try:
                self.det_queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._track_thread is not None and not self._track_thread.is_alive():
                    return  # tracking died: nobody will ever take it; the supervisor stops the daemon

    def _pipeline_healthy(self, infer: threading.Thread, track: threading.Thread) -> bool:
        """For the systemd watchdog: stages alive, and frames flowing or the source honestly
        reconnecting. A hung stage stops the feeding and systemd restarts the service."""
        if not (infer.is_alive() and track.is_alive()):
            return False
        state = self.capture.stats().get("state")
        if state in ("starting", "reconnecting", "ended"):
            return True
        return time.monotonic() - (self.last_frame_at or self._run_started) < 30.0

    def _tracking_loop(self) -> None:
        published_state = -1
        try:
            while True:
                item = self.det_queue.get()
                if item is _END:
                    break
                frame: Frame = item.frame
                if self.engine is None:
                    fps = getattr(self.source, "fps", None)
                    self.engine = self.engine_factory(frame.size, fps if fps and fps > 0 else None)
                t0 = time.perf_counter()
                step: TrackerStep = self.tracker.update(item.detections)
                t1 = time.perf_counter()
                events = self.engine.process(step, frame_index=frame.index, timestamp=frame.timestamp, stream_time=frame.stream_time)
                self._emit_events(events)
                if self.engine.state_version != published_state:
                    published_state = self.engine.state_version
                    self._emit_state()
                self.timer.add("track", (t1 - t0) * 1e3)
                self.timer.add("events", (time.perf_counter() - t1) * 1e3)
                if self.mot_fh is not None:
                    for t in step.tracks:
                        if t.time_since_update == 0:
                            x1, y1, x2, y2 = (float(v) for v in t.box)
                            self.mot_fh.write(f"{frame.index + 1},{t.track_id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},1,-1,-1,-1\n")
                self.frames_processed += 1
                self.last_frame_at = time.monotonic()
                self.latest = {"frame": frame, "tracks": step.tracks, "detections": item.detections}
        except Exception as exc:
            log.exception("tracking stage failed")
            self.errors.append(f"tracking: {exc}")
            self.stop_event.set()
        finally:
            self._finish_tracks()

    def _finish_tracks(self) -> None:
        """Exit events for every live track (reason 'shutdown'), then the final state."""
        if self.engine is None:
            return
        latest = self.latest.get("frame")
        events = self.engine.shutdown(
            frame_index=latest.index if latest else 0,
            timestamp=time.time(),
            stream_time=latest.stream_time if latest else 0.0,
            tracks=self.tracker.live_tracks(),
        )
        self._emit_events(events)
        self._emit_state()

    # ------------------------------------------------------------------------------------ run
    def _start_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        return t

    def run(self) -> int:
        notifier = Notifier()
        self._build()
        if self.publisher is not None:
            if self.cfg.mqtt.homeassistant.enabled:
                from edged.mqtt.homeassistant import discovery_messages, queue_discovery

                classes = list(self.cfg.detector.classes) or list(self.detector.class_names)
                queue_discovery(self.outbox, discovery_messages(
                    self.cfg.mqtt, device_id=self.cfg.device_id, class_names=classes,
                    zones=[z.name for z in self.cfg.events.zones], camera=self.cfg.capture.name,
                    sw_version=__version__))
            self.publisher.start()
        web = None
        if self.cfg.web.enabled:
            from edged.web import DebugServer

            web = DebugServer(self, self.cfg.web)
            web.start()
        self.capture.start()
        self._run_started = time.monotonic()
        track = self._track_thread = self._start_thread(self._tracking_loop, "edged-track")
        infer = self._start_thread(self._inference_loop, "edged-infer")
        # The description, not the configured value: a stream URL's password is redacted there.
        notifier.ready(f"running on {self.source.description}")
        log.info("edged %s running: device=%s source=%s mqtt=%s", __version__, self.cfg.device_id,
                 self.source.description, "on" if self.publisher else "off")
        wd = watchdog_interval_s()
        next_stats = time.monotonic() + self.cfg.mqtt.stats_interval_s
        while not self.stop_event.is_set():
            self.stop_event.wait(min(1.0, wd or 1.0))
            if not track.is_alive():
                break  # a file ended (or a stage failed): everything is processed
            if wd and self._pipeline_healthy(infer, track):
                notifier.watchdog()
            self.track_ids.ensure(self.tracker.next_id)
            if time.monotonic() >= next_stats:
                next_stats += self.cfg.mqtt.stats_interval_s
                self._emit(self.topics.stats, self.stats(), 0, "stats", coalesce="stats")
        notifier.stopping()
        log.info("stopping")
        self.stop_event.set()
        self.capture.stop()
        infer.join(timeout=10)
        track.join(timeout=10)
        if not track.is_alive():
            self.track_ids.close(self.tracker.next_id)
        if self.mot_fh is not None:
            self.mot_fh.close()
        if web is not None:
            web.stop()
        if self.publisher is not None:
            self._emit(self.topics.stats, self.stats(), 0, "stats", coalesce="stats")
            self.publisher.stop(timeout=5.0)
        if self.outbox is not None:
            left = self.outbox.depth()
            if left:
                log.info("%d messages kept in the outbox for the next start", left)
        notifier.close()
        log.info("stopped after %d frames, %d events", self.frames_processed, self.events_emitted)
        if self.capture.failed:  # the source can never deliver: a restart cannot help
            from edged.exitcodes import NO_INPUT

            return NO_INPUT
        return 1 if self.errors else 0


def _iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def cpu_temperature() -> Optional[float]:
    """SoC temperature in degrees C where the kernel exposes it (Raspberry Pi, most ARM boards)."""
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")):
        try:
            return round(int(zone.read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            continue
    return None
