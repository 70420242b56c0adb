"""Frame sources (V4L2 camera, video file, RTSP/HTTP stream, the demo scene) and the capture thread.

Policies of `CaptureThread`:
- live sources (cameras, streams, the paced demo) keep only the newest frame: a single-slot mailbox;
  a frame overwritten before the consumer took it is counted as dropped, so a slow detector always
  works on the present, never on a backlog, and memory stays flat;
- files deliver every frame through a bounded buffer (`queue_size`) with a blocking put (backpressure,
  no drops) and then signal end-of-stream (`ended`), unless `loop`;
- `fps_cap` throttles: live frames arriving sooner than 1/fps_cap after the last delivered one are
  skipped (counted), files are paced to at most fps_cap;
- a source that cannot be opened or stops delivering is reopened with jittered exponential backoff
  between reconnect_min_s and reconnect_max_s; every attempt is logged and counted; the thread never
  dies of a source error;
- except a source that can never deliver (`SourceUnavailableError`: a video file that does not exist or
  cannot be decoded, the demo scene without scikit-image): one error line, state "failed", `failed` holds
  the reason and `ended` is set so consumers stop waiting. `check_source` tells the same up front.

Secrets: a stream URL is shown everywhere (description, stats, errors, logs) with its password and
credential-like query parameters redacted (edged.secrets); the URL with the password from
capture.password_file / capture.password_env is built only inside `OpenCvSource.open`. FFmpeg and OpenCV
print the URL they open, password included, at their verbose log levels on stderr, out of reach of any
redaction: edged sets OPENCV_FFMPEG_LOGLEVEL=-8 (quiet) when this module loads and OpenCV's log level to
ERROR before opening a stream, unless the user set OPENCV_FFMPEG_LOGLEVEL / OPENCV_LOG_LEVEL (then, for
debugging, they may print it). A failed open says why in edged's own words instead (refused, no answer,
unknown host, the server answers but the stream does not open).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, Optional, Union
from urllib.parse import quote, unquote, urlsplit

import cv2

from edged.config import CaptureConfig, ConfigError, camera_index, read_stream_password, resolve_path
from edged.secrets import redact_text, redact_url, register_secret, split_userinfo
from edged.types import Frame

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".flv", ".wmv",
    ".mjpg", ".mjpeg", ".h264", ".264", ".h265", ".hevc", ".gif", ".y4m", ".ogv",
}
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


DEMO_NEEDS_SKIMAGE = "'demo' needs scikit-image: pip install 'edged[demo]'"
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "http": 80, "https": 443}


class SourceError(Exception):
    """A source that cannot be opened right now (retried by the capture thread)."""


class SourceUnavailableError(SourceError):
    """A source that can never deliver frames (a missing video file, the demo without scikit-image): the
    capture thread stops with state "failed" instead of retrying; `edged run` exits with NO_INPUT (66)."""


class SourceSpecError(ConfigError, ValueError):
    """A `capture.source` value that names no known kind of source (a configuration error: the daemon
    reports it like any other invalid key and exits non-zero)."""

    def __init__(self, message: str):
        super().__init__("capture.source", [message])


# ---------------------------------------------------------------------------------------------- sources
class FrameSource:
    """One producer of `Frame`s. `read()` returns None when no frame came: check `at_end`."""

    kind = "source"
    live = False

    def __init__(self, description: str):
        self.description = description  # shown in logs, stats and errors: never holds a secret
        self.config_key = "capture.source"  # named in errors ("--source" when overridden)
        self.fps: Optional[float] = None
        self.at_end = False  # True after the last frame of a finite source (not an error)
        self._index = 0
        self._stop: Optional[threading.Event] = None  # set by CaptureThread: interrupts pacing waits

    def bind_stop(self, stop: threading.Event) -> None:
        self._stop = stop

    def check(self) -> Optional[str]:
        """Why this source can never deliver (one line naming the config key), or None."""
        return None

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> Optional[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


class OpenCvSource(FrameSource):
    """A cv2.VideoCapture: camera (V4L2), file, or network stream (FFmpeg)."""

    def __init__(self, target: Union[int, str], kind: str, *, live: bool, backend: int = cv2.CAP_ANY,
                 loop: bool = False, width: Optional[int] = None, height: Optional[int] = None,
                 fps: Optional[float] = None, timeout_s: float = 10.0, username: Optional[str] = None,
                 password: Optional[Callable[[], Optional[str]]] = None):
        shown = target
        if isinstance(target, str) and kind == "url":  # as opened, the password (any one) redacted
            shown = redact_url(with_credentials(target, username, "redacted" if password else None))
        super().__init__(f"{kind} {shown}")
        self.target = shown  # what may be shown; the URL opened (with credentials) is built in open()
        self._url = target
        self._username = username
        self._password = password  # called at every open: a rotated password file is picked up
        self.kind = kind
        self.live = live
        self.backend = backend
        self.loop = loop
        self.req_width, self.req_height, self.req_fps = width, height, fps
        self.timeout_s = timeout_s
        self._cap: Optional[cv2.VideoCapture] = None
        self._t0 = 0.0
        self._pos = 0  # frame position in the file (for stream_time)
        self._loop_offset = 0.0

    def check(self) -> Optional[str]:
        if self.kind != "file":
            return None  # cameras get plugged in, streams come back: never hopeless
        problem = self._file_problem()
        if problem is None:
            cap = cv2.VideoCapture(str(self._url), self.backend)
            opened = cap.isOpened()
            cap.release()
            if not opened:
                problem = self._undecodable()
        return f"{self.config_key}: {problem}" if problem else None

    def _undecodable(self) -> str:
        return f"cannot decode video file {self._url} (not a video, or a codec OpenCV lacks)"

    def _file_problem(self) -> Optional[str]:
        path = Path(str(self._url))
        if "%" in path.name:  # an image sequence (frame%06d.jpg): OpenCV finds the first file
            return None if path.parent.is_dir() else f"folder {path.parent} of image sequence {path.name} does not exist"
        if not path.exists():
            return f"video file {path} does not exist"
        if not path.is_file():
            return f"{path} is not a file"
        return None

    def _open_target(self) -> Union[int, str]:
        """The URL with the configured credentials, URL-encoded (only ever held by open())."""
        if self.kind != "url" or (self._username is None and self._password is None):
            return self._url
        try:
            password = self._password() if self._password is not None else None
        except ConfigError as exc:  # the password file vanished: maybe a rotation in progress
            raise SourceError(str(exc).replace("\n", " ")) from None
        return with_credentials(str(self._url), self._username, password)

    def open(self) -> None:
        self.close()
        self.at_end = False
        params = []
        if self.kind == "file":
            problem = self._file_problem()
            if problem:
                raise SourceUnavailableError(f"{self.config_key}: {problem}")
        elif self.kind == "url":
            _quiet_opencv_logs()
            ms = int(self.timeout_s * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        target = self._open_target()
        cap = cv2.VideoCapture(target, self.backend, params) if params else cv2.VideoCapture(target, self.backend)
        del target
        if not cap.isOpened():
            cap.release()
            if self.kind == "file":
                raise SourceUnavailableError(f"{self.config_key}: {self._undecodable()}")
            if self.kind == "url":
                raise SourceError(f"OpenCV cannot open the stream: {_why_unreachable(str(self._url), self.timeout_s)}")
            raise SourceError(f"OpenCV cannot open the {self.kind}")
        if self.kind == "camera":
            if self.req_width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.req_width)
            if self.req_height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.req_height)
            if self.req_fps:
                cap.set(cv2.CAP_PROP_FPS, self.req_fps)
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else self.fps
        self._cap = cap
        if not self._t0:  # live stream time keeps running across reconnects (durations stay right)
            self._t0 = time.monotonic()
        self._pos = 0
        self._loop_offset = 0.0

    def read(self) -> Optional[Frame]:
        if self._cap is None:
            return None
        ok, image = self._cap.read()
        if not ok and self.kind == "file" and self._pos > 0:
            if not self.loop:
                self.at_end = True
                return None
            # Rewind: indices and stream time keep increasing so the tracker sees one continuous stream.
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self._loop_offset += self._pos / (self.fps or 25.0)
            self._pos = 0
            ok, image = self._cap.read()
        if not ok or image is None:
            return None
        now = time.time()
        if self.kind == "file":
            stream_time = self._loop_offset + self._pos / (self.fps or 25.0)
        else:
            stream_time = time.monotonic() - self._t0
        frame = Frame(image=image, index=self._index, timestamp=now, stream_time=stream_time)
        self._index += 1
        self._pos += 1
        return frame

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class DemoSource(FrameSource):
    """The synthetic scene (edged.scene). Live: paced at the scene's fps in real time."""

    kind = "demo"

    def __init__(self, spec: Any = None, *, live: bool = True, loop: bool = False):
        from edged.scene import Scene, default_scene

        self.scene = Scene(spec if spec is not None else default_scene())
        super().__init__(f"demo scene ({self.scene.spec.n_frames} frames @ {self.scene.spec.fps:g} fps)")
        self.live = live
        self.loop = loop
        self.fps = float(self.scene.spec.fps)
        self._pos = 0
        self._t0 = 0.0
        self._start_index = 0

    def check(self) -> Optional[str]:
        problem = _demo_problem()
        return f"{self.config_key} {problem}" if problem else None

    def open(self) -> None:
        problem = self.check()
        if problem:
            raise SourceUnavailableError(problem)
        self.at_end = False
        self._pos = 0
        self._t0 = time.monotonic()
        self._start_index = self._index

    def read(self) -> Optional[Frame]:
        n = self.scene.spec.n_frames
        if self._pos >= n:
            if not self.loop:
                self.at_end = True
                return None
            self._pos = 0
        if self.live:
            due = self._t0 + (self._index - self._start_index) / self.fps
            delay = due - time.monotonic()
            if delay > 0:
                if self._stop is not None:
                    if self._stop.wait(delay):
                        return None
                else:
                    time.sleep(delay)
        image, _ = self.scene.frame(self._pos)
        frame = Frame(image=image, index=self._index, timestamp=time.time(), stream_time=self._index / self.fps)
        self._pos += 1
        self._index += 1
        return frame


def _demo_problem() -> Optional[str]:
    """Why the demo scene cannot render, or None: its photographs ship inside scikit-image."""
    from edged import scene

    try:
        folder = scene.skimage_data_dir()
    except (ImportError, ValueError, RuntimeError):  # not installed, or made unimportable
        return DEMO_NEEDS_SKIMAGE
    # The sprites and the background's brick wall (scene._background).
    files = sorted({s.file for s in scene.SPRITES.values()} | {"brick.png"})
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        return f"'demo' cannot find {', '.join(missing)} in {folder} (broken scikit-image install?)"
    return None


def with_credentials(url: str, username: Optional[str], password: Optional[str]) -> str:
    """`url` with its userinfo replaced: `username` / `password` (percent-encoded) where given, the URL's
    own user / password otherwise."""
    prefix, userinfo, rest = split_userinfo(url)
    url_user, _, url_password = (userinfo or "").partition(":")
    user = quote(username, safe="") if username is not None else url_user
    secret = quote(password, safe="") if password is not None else url_password
    return f"{prefix}{user}{':' + secret if secret else ''}@{rest}" if user or secret else url


def _quiet_opencv_logs() -> None:
    """OpenCV's INFO/DEBUG lines name the URL being opened (measured: with another backend than FFmpeg,
    opencv-python-headless 4.14): ERROR only, unless the user set OPENCV_LOG_LEVEL. OpenCV reads that
    variable only when cv2 loads, hence the call."""
    utils_logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if "OPENCV_LOG_LEVEL" not in os.environ and utils_logging is not None:
        utils_logging.setLogLevel(utils_logging.LOG_LEVEL_ERROR)


# FFmpeg prints the URL it opens, password included, at its debug level ("Opening 'http://user:pass@...'
# for reading") and its own chatter at others, on stderr where no redaction reaches: quiet (-8) unless the
# user set it. OpenCV reads this once, at the process's first FFmpeg use (reader or writer), so it is set
# when this module loads, before any source opens.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def _why_unreachable(url: str, timeout_s: float) -> str:
    """FFmpeg is silenced (it would print the URL): say in our own words why a stream did not open."""
    prefix, _, rest = split_userinfo(url)
    scheme = prefix[:-3].lower()
    if scheme in ("udp", "srt"):  # connectionless: nothing to probe
        return "no stream received"
    try:
        parts = urlsplit(f"{scheme}://{re.split(r'[/?#]', rest, maxsplit=1)[0]}")
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return "the URL's host or port is not valid"
    if not host or not port:
        return "no answer"
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 5.0)):
            return f"{host}:{port} answers; check the path, the credentials and the stream format"
    except socket.gaierror:
        return f"cannot resolve host {host}"
    except ConnectionRefusedError:
        return f"connection to {host}:{port} refused"
    except socket.timeout:
        return f"no answer from {host}:{port}"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def describe_source_kinds() -> str:
    return ("a camera index (0), a /dev/videoN path, a video file (.mp4, .avi, ...), an rtsp:// or "
            "http(s):// URL, or 'demo'")


def _stream_credentials(cfg: CaptureConfig, config_path: Union[str, Path, None], url: str) -> Dict[str, Any]:
    """Register the URL's own password as a secret; validate capture.password_file / password_env now (a
    ConfigError naming the key) and hand the source a reader for them, called at every open."""
    _, userinfo, _ = split_userinfo(url)
    url_password = (userinfo or "").partition(":")[2]
    _, greedy_userinfo, _ = split_userinfo(url, greedy=True)  # a password with an unencoded '?' or '#'
    for secret in (url_password, (greedy_userinfo or "").partition(":")[2]):
        register_secret(secret)
        register_secret(unquote(secret))
    if cfg.password_file or cfg.password_env:
        read_stream_password(cfg, config_path)  # fails here, at start-up, when unreadable
        if url_password:
            log.warning("capture.%s replaces the password written in capture.source",
                        "password_file" if cfg.password_file else "password_env")
        return {"username": cfg.username, "password": lambda: read_stream_password(cfg, config_path)}
    return {"username": cfg.username} if cfg.username else {}


def open_source(cfg: CaptureConfig, config_path: Union[str, Path, None] = None,
                source_override: Union[str, int, None] = None) -> FrameSource:
    """The FrameSource for `capture.source` (or the override). Does not open it: the capture thread
    does, with retries. Raises SourceSpecError for a value that names no known kind of source."""
    source: Union[int, str] = cfg.source if source_override is None else source_override
    if isinstance(source, str):
        source = source.strip()
    where = "--source" if source_override is not None else "capture.source"
    if source == "":
        raise SourceSpecError(f"{where}: empty; expected {describe_source_kinds()}")
    made = _make_source(cfg, config_path, source, where)
    made.config_key = where
    return made


def check_source(cfg: CaptureConfig, config_path: Union[str, Path, None] = None,
                 source_override: Union[str, int, None] = None) -> Optional[str]:
    """Why the source can never deliver frames (one line naming the key: a missing or undecodable video
    file, the demo without scikit-image), or None when it can or may (cameras and streams may come back).
    Cheap: no network, no camera is opened. Raises SourceSpecError / ConfigError for configuration errors."""
    return open_source(cfg, config_path, source_override).check()


def _make_source(cfg: CaptureConfig, config_path: Union[str, Path, None], source: Union[int, str],
                 where: str) -> FrameSource:
    live_override = cfg.live
    common: Dict[str, Any] = dict(width=cfg.width, height=cfg.height, fps=None, timeout_s=cfg.timeout_s)
    if isinstance(source, str) and source.lower() == "demo":
        return DemoSource(live=True if live_override is None else live_override, loop=cfg.loop)
    index = camera_index(source)
    if index is not None:
        # V4L2 wants the index; /dev/videoN maps to N.
        return OpenCvSource(index, "camera", live=True if live_override is None else live_override,
                            backend=cv2.CAP_V4L2, **common)
    assert isinstance(source, str)
    lower = source.lower()
    if "://" in lower:
        if not lower.startswith(URL_SCHEMES):
            scheme = source.split("://", 1)[0]
            raise SourceSpecError(f"{where}: unsupported URL scheme {scheme!r} in {redact_url(source)!r}; "
                                  f"expected one of {', '.join(s[:-3] for s in URL_SCHEMES)}")
        if lower.startswith(("rtsp://", "rtsps://")):
            # TCP interleaving: UDP RTP loses packets (smeared frames) on Wi-Fi; the user's own setting wins.
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
        return OpenCvSource(source, "url", live=True if live_override is None else live_override,
                            backend=cv2.CAP_FFMPEG, **common, **_stream_credentials(cfg, config_path, source))
    if source.startswith("/dev/"):
        raise SourceSpecError(f"{where}: {source!r} is a device but not /dev/videoN; expected {describe_source_kinds()}")
    path = resolve_path(source, config_path)
    looks_like_video = path.suffix.lower() in VIDEO_SUFFIXES or "%0" in path.name  # %06d.jpg sequences
    if not looks_like_video and not path.is_file():
        raise SourceSpecError(
            f"{where}: {source!r} is not a known kind of source (no such file, and not a video file name); "
            f"expected {describe_source_kinds()}"
        )
    if path.is_dir():
        raise SourceSpecError(f"{where}: {path} is a folder, expected a video file")
    return OpenCvSource(str(path), "file", live=False if live_override is None else live_override,
                        loop=cfg.loop, **common)


# ---------------------------------------------------------------------------------------------- thread
@dataclass
class CaptureStats:
    state: str  # starting | ok | reconnecting | ended | stopped | failed (can never deliver)
    source: str  # the description: a URL's credentials redacted
    live: bool
    captured: int  # frames read from the source
    delivered: int  # frames taken by the consumer
    dropped: int  # live: overwritten in the mailbox before being taken
    skipped: int  # live: thrown away by fps_cap
    reconnects: int  # failed opens + lost sources (each backoff attempt)
    fps: float  # capture rate over the last frames
    last_error: Optional[str]
    last_index: int  # index of the newest captured frame (-1 before the first)


class CaptureThread:
    """Runs a FrameSource in a daemon thread; the consumer calls `get(timeout)`."""

    def __init__(self, source: FrameSource, cfg: Optional[CaptureConfig] = None, live: Optional[bool] = None,
                 *, rng: Optional[random.Random] = None):
        self.source = source
        self.cfg = cfg or CaptureConfig()
        self.live = source.live if live is None else live
        self.capacity = 1 if self.live else self.cfg.queue_size
        self.ended = threading.Event()  # end of a file, or failed: consumers stop waiting
        self.failed: Optional[str] = None  # why the source can never deliver (state "failed")
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._buf: Deque[Frame] = collections.deque()
        self._rng = rng or random.Random()
        self._thread: Optional[threading.Thread] = None
        self._times: Deque[float] = collections.deque(maxlen=30)
        self._state = "starting"
        self._captured = self._delivered = self._dropped = self._skipped = self._reconnects = 0
        self._last_error: Optional[str] = None
        self._last_index = -1
        self._last_out = 0.0
        source.bind_stop(self._stop)

    # -------------------------------------------------------------------------------- consumer side
    def start(self) -> "CaptureThread":
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.source.kind}", daemon=True)
        self._thread.start()
        return self

    def get(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next frame (live: the newest), or None on timeout / after the end of the stream."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._buf or self.ended.is_set() or self._stop.is_set(), timeout)
            if not ok or not self._buf:
                return None
            frame = self._buf.popleft()
            self._delivered += 1
            self._cond.notify_all()  # a blocked file producer may put again
            return frame

    def __iter__(self) -> Iterator[Frame]:
        """Every frame until the source ends or the thread stops."""
        while True:
            frame = self.get(timeout=0.5)
            if frame is not None:
                yield frame
            elif self.ended.is_set() or self._stop.is_set():
                return

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop and join; True when the thread has exited."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats_record(self) -> CaptureStats:
        with self._cond:
            return self._stats_locked()

    def stats(self) -> Dict[str, Any]:
        return asdict(self.stats_record())

    def wait_for(self, predicate: Callable[[CaptureStats], bool], timeout: float) -> bool:
        """Block until `predicate(stats)` holds (re-checked at every change), or timeout -> False."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._stats_locked()), timeout)

    def _stats_locked(self) -> CaptureStats:
        fps = 0.0
        if len(self._times) >= 2 and self._times[-1] > self._times[0]:
            fps = (len(self._times) - 1) / (self._times[-1] - self._times[0])
        return CaptureStats(self._state, self.source.description, self.live, self._captured, self._delivered,
                            self._dropped, self._skipped, self._reconnects, round(fps, 3), self._last_error,
                            self._last_index)

    # -------------------------------------------------------------------------------- producer side
    def _set(self, **changes: Any) -> None:
        with self._cond:
            for key, value in changes.items():
                setattr(self, "_" + key, value)
            self._cond.notify_all()

    def _backoff(self, delay: float, reason: str) -> float:
        """Count, log, wait (interruptibly) `delay` with jitter; return the next delay."""
        wait = min(self.cfg.reconnect_max_s, delay * self._rng.uniform(0.8, 1.2))
        reason = redact_text(reason)  # OpenCV/FFmpeg texts may quote the URL
        with self._cond:
            self._reconnects += 1
            self._state = "reconnecting"
            self._last_error = reason
            n = self._reconnects
            self._cond.notify_all()
        log.warning("capture %s: %s; attempt %d, retrying in %.2f s", self.source.description, reason, n, wait)
        self._stop.wait(wait)
        return min(self.cfg.reconnect_max_s, delay * 2.0)

    def _fail(self, reason: str) -> None:
        """The source can never deliver: one error line, state "failed", consumers released."""
        reason = redact_text(reason)
        log.error("%s", reason)
        with self._cond:
            self.failed = self._last_error = reason
            self._state = "failed"
            self._cond.notify_all()
        self.ended.set()

    def _run(self) -> None:
        delay = self.cfg.reconnect_min_s
        opened = False
        period = 1.0 / self.cfg.fps_cap if self.cfg.fps_cap > 0 else 0.0
        try:
            while not self._stop.is_set():
                if not opened:
                    try:
                        self.source.open()
                    except SourceUnavailableError as exc:
                        self._fail(str(exc))
                        break
                    except SourceError as exc:
                        delay = self._backoff(delay, str(exc))
                        continue
                    except Exception as exc:  # a broken backend must not kill capture for good
                        log.exception("capture %s: unexpected error while opening", self.source.description)
                        delay = self._backoff(delay, f"{type(exc).__name__}: {exc}")
                        continue
                    opened = True
                    log.info("capture %s: opened (%s)", self.source.description, "live" if self.live else "every frame")
                try:
                    frame = self.source.read()
                except Exception as exc:
                    log.exception("capture %s: read failed", self.source.description)
                    frame, self.source.at_end = None, False
                    self._last_error = redact_text(f"{type(exc).__name__}: {exc}")
                if frame is None:
                    if self._stop.is_set():
                        break
                    if self.source.at_end:
                        log.info("capture %s: end of stream after %d frames", self.source.description, self._captured)
                        self._set(state="ended")
                        self.ended.set()
                        break
                    self.source.close()
                    opened = False
                    delay = self._backoff(self.cfg.reconnect_min_s, "source stopped delivering frames")
                    continue
                delay = self.cfg.reconnect_min_s  # healthy again: the next outage starts the backoff over
                self._deliver(frame, period)
        finally:
            self.source.close()
            with self._cond:
                if self._state not in ("ended", "failed"):
                    self._state = "stopped"
                self._cond.notify_all()

    def _deliver(self, frame: Frame, period: float) -> None:
        now = time.monotonic()
        with self._cond:
            self._captured += 1
            self._last_index = frame.index
            self._times.append(now)
            if self._state != "ok":
                self._state = "ok"
                self._last_error = None
            self._cond.notify_all()  # stats changed (wait_for watchers)
            if self.live:
                if period and self._last_out and now - self._last_out < period:
                    self._skipped += 1
                    return
                if self._buf:
                    self._dropped += len(self._buf)
                    self._buf.clear()
                self._buf.append(frame)
                self._last_out = now
                self._cond.notify_all()
                return
        if period and self._last_out:
            # Files: every frame, but not faster than fps_cap.
            wait = self._last_out + period - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
        with self._cond:
            # Backpressure: block while the buffer is full (the consumer's get() notifies).
            self._cond.wait_for(lambda: len(self._buf) < self.capacity or self._stop.is_set())
            if self._stop.is_set():
                return
            self._buf.append(frame)
            self._last_out = time.monotonic()
            self._cond.notify_all()
