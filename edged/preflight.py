"""Start-up checks of a valid config: can `edged run` actually use what it names?

`preflight(cfg, config_path)` loads the models with the daemon's own loaders, builds the TLS context,
reads the password file, and checks the source and the state directory, so that `edged check-config`
refuses exactly what `edged run` would refuse at start-up. It has no side effects (nothing is created
or written) so `edged run` can call it before building anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Union

from edged import exitcodes
from edged.config import ConfigError, EdgedConfig, read_password, resolve_path, resolve_state_dir

ConfigPath = Union[str, Path, None]


@dataclass(frozen=True)
class Problem:
    key: str  # config key path, e.g. "detector.model"
    message: str  # names the file and what is wrong with it
    exit_code: int  # what `edged run` exits with for it (edged.exitcodes)

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def preflight(cfg: EdgedConfig, config_path: ConfigPath = None) -> List[Problem]:
    """Every problem that would stop `edged run` with this config; empty when it can start."""
    checks: List[Callable[[EdgedConfig, ConfigPath], List[Problem]]] = [
        _check_detector, _check_encoder, _check_mqtt, _check_source, _check_state_dir,
    ]
    return [p for check in checks for p in check(cfg, config_path)]


def exit_code(problems: List[Problem]) -> int:
    """The exit code for a list of problems: a config problem wins (a restart cannot fix any of them,
    but the operator has to edit the config first)."""
    if not problems:
        return exitcodes.OK
    codes = [p.exit_code for p in problems]
    return exitcodes.CONFIG if exitcodes.CONFIG in codes else codes[0]


# ---------------------------------------------------------------------------------------------- models
def _check_detector(cfg: EdgedConfig, config_path: ConfigPath) -> List[Problem]:
    from edged.inference.backends import CONFIG_KEY as BACKEND_KEY
    from edged.inference.runtime import DelegateError, ModelError
    from edged.inference.yolo import YoloDetector

    try:
        YoloDetector.from_config(cfg.detector, config_path)
    except ValueError as exc:
        # The loader's ValueError for a valid config is the class allow-list not matching the model.
        key = "detector.classes" if "classes" in str(exc) else "detector.model"
        if str(exc).startswith(BACKEND_KEY):
            key = BACKEND_KEY
        return [Problem(key, str(exc), exitcodes.CONFIG)]
    except DelegateError as exc:  # the model is fine; the accelerator the backend needs is not there
        return [Problem(BACKEND_KEY, str(exc), exitcodes.CONFIG)]
    except (ModelError, OSError) as exc:
        return [Problem("detector.model", _with_path(exc, cfg.detector.model, config_path), exitcodes.CONFIG)]
    return []


def _check_encoder(cfg: EdgedConfig, config_path: ConfigPath) -> List[Problem]:
    if not (cfg.encoder.enabled and cfg.tracker.use_appearance):  # the daemon loads it only then
        return []
    from edged.inference.encoder import AppearanceEncoder
    from edged.inference.runtime import ModelError

    try:
        AppearanceEncoder.from_config(cfg.encoder, config_path)
    except (ModelError, ValueError, OSError) as exc:
        return [Problem("encoder.model", _with_path(exc, cfg.encoder.model, config_path), exitcodes.CONFIG)]
    return []


def _with_path(exc: Exception, value: str, config_path: ConfigPath) -> str:
    """The loader's message, prefixed with the resolved file when it does not name it already."""
    path = str(resolve_path(value, config_path))
    text = str(exc)
    return text if path in text else f"{path}: {text}"


# ---------------------------------------------------------------------------------------------- mqtt
def _check_mqtt(cfg: EdgedConfig, config_path: ConfigPath) -> List[Problem]:
    m = cfg.mqtt
    if not m.enabled:
        return []
    problems = []
    if m.password_file:
        try:
            read_password(m, config_path)
        except ConfigError as exc:
            problems.append(Problem("mqtt.password_file", _strip_key(exc.problems[0], "mqtt.password_file"),
                                    exitcodes.CONFIG))
    if m.tls.enabled:
        from edged.mqtt.client import MqttSetupError, build_tls_context

        try:
            build_tls_context(m, config_path)
        except MqttSetupError as exc:
            key, _, message = str(exc).partition(": ")
            if not key.startswith("mqtt."):
                key, message = "mqtt.tls", str(exc)
            problems.append(Problem(key, message, exitcodes.CONFIG))
    return problems


def _strip_key(text: str, key: str) -> str:
    return text[len(key) + 2:] if text.startswith(key + ": ") else text


# ---------------------------------------------------------------------------------------------- source
def _check_source(cfg: EdgedConfig, config_path: ConfigPath) -> List[Problem]:
    """The capture module's own verdict (edged.capture.check_source): a video file that is missing or
    cannot be decoded, or the demo without its photographs, can never deliver; a camera may be plugged in
    later and a stream may come back, so those are only parsed, not opened."""
    from edged.capture import SourceSpecError, check_source

    try:
        why = check_source(cfg.capture, config_path)
    except SourceSpecError as exc:
        message = "; ".join(_strip_key(text, "capture.source") for text in exc.problems)
        return [Problem("capture.source", message, exitcodes.CONFIG)]
    except ConfigError as exc:
        return [Problem(exc.source, "; ".join(_strip_key(t, exc.source) for t in exc.problems), exitcodes.CONFIG)]
    if not why:
        return []
    key = "capture.source"
    message = why[len(key):].lstrip(": ") if why.startswith(key) else why
    return [Problem(key, message, exitcodes.NO_INPUT)]


# ---------------------------------------------------------------------------------------------- state
def _check_state_dir(cfg: EdgedConfig, config_path: ConfigPath) -> List[Problem]:
    """The state directory exists and is writable, or its nearest existing parent is (so it can be
    created): checked without creating anything."""
    state = resolve_state_dir(cfg, config_path)
    existing: Optional[Path] = state
    while existing is not None and not existing.exists():
        existing = existing.parent if existing.parent != existing else None
    if existing is None:  # pragma: no cover - "/" always exists
        return []
    if not existing.is_dir():
        what = "is not a directory" if existing == state else f"cannot be created: {existing} is not a directory"
        return [Problem("state_dir", f"{state} {what}", exitcodes.CANT_CREATE)]
    if not os.access(existing, os.W_OK | os.X_OK):
        # Says whose view this is: the service may run as another user (edged) than check-config.
        who = f"by user {_user_name()}"
        what = f"is not writable {who}" if existing == state else f"cannot be created: {existing} is not writable {who}"
        return [Problem("state_dir", f"{state} {what}", exitcodes.CANT_CREATE)]
    return []


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())
