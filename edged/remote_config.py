"""Remote configuration: desired overlays over MQTT, validated, versioned, applied, persisted, reported.

Operators publish (retained) `{"version": N, "config": {...}}` on `<prefix>/<device>/config/desired`
(this device) or `<prefix>/fleet/config/desired` (every device). Each message carries the whole desired
overlay of its scope (desired-state semantics: a key left out goes back to the file's value), except a
message with `"merge": true`, which is merged into the scope's current overlay (Home Assistant controls
send those). The effective config is

    config file (+ command-line overrides)  <  fleet overlay  <  device overlay

The device answers every message on `<prefix>/<device>/config/reported` (retained) with `applied`,
`rejected` (the message itself is bad: errors name the key path), `failed` (valid, but applying it, or the
pipeline afterwards, failed: the previous config was restored) or `ignored` (not newer than what is
applied: retained replays and reordering are harmless).

This module is the logic only: parsing and checking payloads, the version rules, the atomic overlay file
and the report. The daemon (edged/service.py) supplies how to apply a config to the running parts and how
to tell whether the pipeline is healthy; see docs/remote-config.md.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from edged.config import (
    ConfigError, EdgedConfig, changed_paths, config_to_dict, deep_merge, load_config, read_secret,
)
from edged.events import iso_utc
from edged.statefiles import write_private_atomic

log = logging.getLogger("edged.remote_config")

SCOPES = ("fleet", "device")  # later scopes win
OVERLAY_FILE = "remote-config.json"
MAX_DEPTH = 12  # deepest legitimate overlay: events.zones.<i>.polygon.<j>.<k> is 6 levels
MAX_VERSION = 2**63 - 1  # fits every consumer's integer type

# Keys a remote overlay may not set: a wrong value could cut the device off from its broker (and so from
# any remote fix), move its identity or state, or weaken the remote-config checks themselves.
LOCAL_ONLY: Tuple[str, ...] = (
    "device_id", "state_dir", "remote_config",
    "mqtt.enabled", "mqtt.host", "mqtt.port", "mqtt.client_id", "mqtt.topic_prefix", "mqtt.site", "mqtt.protocol",
    "mqtt.tls",
    "mqtt.username", "mqtt.password", "mqtt.password_file", "mqtt.password_env",
    "capture.username", "capture.password_file", "capture.password_env",
    "web.username", "web.password_file",
)
# Keys that only take effect at the next start (persisted now, listed in `restart_required`).
RESTART_REQUIRED: Tuple[str, ...] = (
    "mqtt.keepalive", "mqtt.reconnect_min_s", "mqtt.reconnect_max_s", "mqtt.max_inflight", "mqtt.max_rate",
    "mqtt.position_expiry_s",
    "mqtt.outbox", "logging.format",
)


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def leaf_paths(data: Any, prefix: str = "") -> List[str]:
    """Dotted paths of the leaves of a nested mapping (lists are leaves)."""
    if isinstance(data, dict) and data:
        out: List[str] = []
        for key, value in data.items():
            out += leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [prefix] if prefix else []


def config_hash(cfg: EdgedConfig) -> str:
    """Identity of an effective config (secrets redacted before hashing): `edged config show --effective`
    prints the same value as `effective_hash` in the device's reports."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- parsing
class Rejected(Exception):
    """The message itself is unusable; `errors` are one line each, naming the key path when there is one."""

    def __init__(self, errors: List[str], version: Optional[int] = None):
        super().__init__("; ".join(errors))
        self.errors = errors
        self.version = version


@dataclass(frozen=True)
class Desired:
    scope: str
    version: int
    overlay: Dict[str, Any]
    merge: bool = False


def sign(body: bytes, secret: bytes) -> str:
    """HMAC-SHA256 of the exact body bytes, hex."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def signed_envelope(body: bytes, secret: bytes) -> bytes:
    """A signed desired message: `{"hmac_sha256": <hex>, "body": <the exact desired JSON text>}`. The MAC
    covers the body's exact UTF-8 bytes, so any change to it (or to the version inside) is detected."""
    return json.dumps({"hmac_sha256": sign(body, secret), "body": body.decode("utf-8")}).encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a config can hold")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth, stopping early beyond `limit` (no recursion on hostile input)."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _decode(payload: bytes) -> Any:
    """JSON, else YAML with the safe loader (no Python object tags); NaN/Infinity refused."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected([f"(payload): not valid UTF-8 at byte {exc.start}"]) from None
    if "\x00" in text:
        raise Rejected(["(payload): contains NUL characters"])
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            raise Rejected([f"(payload): nested deeper than {MAX_DEPTH} levels"]) from None
        except ValueError as exc:
            raise Rejected([f"(payload): not valid JSON: {exc}"]) from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise Rejected([f"(payload): nested deeper than {MAX_DEPTH} levels"]) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise Rejected([f"(payload): neither JSON nor safe YAML: {problem}"]) from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise Rejected([f"(payload): {exc}"]) from None


def parse_desired(payload: bytes, scope: str, *, max_bytes: int = 65536,
                  secret: Optional[bytes] = None) -> Desired:
    """Check one desired message; raises Rejected with the reasons. Validation of the overlay against the
    config schema happens later, on the combined effective config (errors name the key path there)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    if len(payload) > max_bytes:
        raise Rejected([f"(payload): {len(payload)} bytes, more than remote_config.max_payload_bytes={max_bytes}"])
    data = _decode(payload)
    if secret is not None:
        if not (isinstance(data, dict) and set(data) == {"hmac_sha256", "body"}
                and isinstance(data["hmac_sha256"], str) and isinstance(data["body"], str)):
            raise Rejected(["(payload): unsigned; this device requires {\"hmac_sha256\": ..., \"body\": ...} "
                            "(remote_config.hmac_secret_file is set)"])
        body = data["body"].encode("utf-8")
        if not hmac.compare_digest(sign(body, secret), data["hmac_sha256"].strip().lower()):
            raise Rejected(["(payload): bad signature (hmac_sha256 does not match the body and the shared secret)"])
        data = _decode(body)
    if not isinstance(data, dict):
        raise Rejected([f"(payload): expected a mapping {{\"version\": N, \"config\": {{...}}}}, got {type(data).__name__}"])
    if _depth(data, MAX_DEPTH + 2) > MAX_DEPTH + 2:
        raise Rejected([f"(payload): nested deeper than {MAX_DEPTH} levels"])
    errors: List[str] = []
    version = data.get("version")
    if "version" not in data:
        errors.append("version: missing")
        version = None
    elif isinstance(version, bool) or not isinstance(version, int):
        errors.append(f"version: must be an integer, got {type(version).__name__} {_short(version)}")
        version = None
    elif not 1 <= version <= MAX_VERSION:
        errors.append(f"version: must be between 1 and {MAX_VERSION}, got {_short(version)}")
        version = None
    overlay = data.get("config")
    if "config" not in data:
        errors.append("config: missing (use {} to go back to the config file's values)")
    elif not isinstance(overlay, dict):
        errors.append(f"config: must be a mapping of sections, got {type(overlay).__name__}")
    merge = data.get("merge", False)
    if not isinstance(merge, bool):
        errors.append(f"merge: must be true or false, got {_short(merge)}")
    unknown = sorted(set(map(str, data)) - {"version", "config", "merge"})
    if unknown:
        errors.append(f"(payload): unknown keys {', '.join(_short(u) for u in unknown)}; expected version, config, merge")
    if not errors:
        assert isinstance(overlay, dict)
        paths = leaf_paths(overlay)
        bad_keys = [p for p in paths if not all(isinstance(k, str) for k in p.split("."))]
        errors += [f"{p}: keys must be strings" for p in bad_keys]
        local = sorted({p for p in paths if _under(p, LOCAL_ONLY)})
        errors += [f"{p}: can only be set in the config file on the device (a remote change could cut it off)"
                   for p in local]
        errors += _non_finite(overlay)
    if errors:
        raise Rejected(errors, version if isinstance(version, int) else None)
    return Desired(scope, int(version), overlay, merge)  # type: ignore[arg-type]


def _non_finite(data: Any, prefix: str = "") -> List[str]:
    out: List[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _non_finite(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _non_finite(v, f"{prefix}.{i}")
    elif isinstance(data, float) and not math.isfinite(data):
        out.append(f"{prefix}: {data} is not a usable number")
    return out


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------- storage
@dataclass
class ScopeState:
    version: int = 0  # the applied version (0: nothing applied yet)
    overlay: Dict[str, Any] = field(default_factory=dict)


class OverlayStore:
    """The applied overlays of every scope, in one JSON file in the state directory, replaced atomically:
    write a temporary file, fsync it, rename it over the old one, fsync the directory. A crash at any
    point leaves either the old or the new file, never a mix; leftover temporary files are ignored."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.scopes: Dict[str, ScopeState] = {s: ScopeState() for s in SCOPES}

    @classmethod
    def load(cls, path: Union[str, Path]) -> "OverlayStore":
        store = cls(path)
        try:
            raw = store.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return store
        try:
            data = json.loads(raw)
            for scope in SCOPES:
                entry = data.get("scopes", {}).get(scope)
                if entry is None:
                    continue
                version, overlay = entry["version"], entry["config"]
                if isinstance(version, bool) or not isinstance(version, int) or not isinstance(overlay, dict):
                    raise ValueError(f"scope {scope}: bad entry")
                store.scopes[scope] = ScopeState(version, overlay)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(str(store.path), [f"(file): unreadable remote overlay: {exc}"]) from None
        return store

    def combined(self) -> Dict[str, Any]:
        """The overlay to put over the config file: fleet first, the device's on top."""
        out: Dict[str, Any] = {}
        for scope in SCOPES:
            out = deep_merge(out, self.scopes[scope].overlay)
        return out

    def with_scope(self, scope: str, state: ScopeState) -> "OverlayStore":
        other = OverlayStore(self.path)
        other.scopes = {s: copy.deepcopy(v) for s, v in self.scopes.items()}
        other.scopes[scope] = state
        return other

    def to_json(self) -> bytes:
        body = {"format": 1, "scopes": {s: {"version": v.version, "config": v.overlay} for s, v in self.scopes.items()}}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    def save(self) -> None:
        write_private_atomic(self.path, self.to_json())

    @property
    def versions(self) -> Dict[str, int]:
        return {s: v.version for s, v in self.scopes.items()}


def effective_config(config_path: Union[str, Path, None], base_overlay: Optional[Dict[str, Any]],
                     store: OverlayStore) -> EdgedConfig:
    """Config file + command-line overlay + the stored remote overlays, validated (ConfigError)."""
    overlay = deep_merge(base_overlay or {}, store.combined())
    return load_config(config_path, overlay=overlay or None)


# ---------------------------------------------------------------------------------------------- manager
@dataclass
class Outcome:
    status: str  # applied | rejected | failed | ignored
    scope: str
    version: Optional[int]
    errors: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    restart_required: List[str] = field(default_factory=list)

    def report(self, effective_hash: str, applied: Dict[str, int]) -> Dict[str, Any]:
        return {
            "version": self.version,
            "scope": self.scope,
            "status": self.status,
            "errors": self.errors,
            "effective_hash": effective_hash,
            "changed": self.changed,
            "restart_required": self.restart_required,
            "applied": applied,
            "ts": iso_utc(time.time()),
        }


# (old config, new config, changed key paths) -> None; raises when the running parts cannot take it.
Applier = Callable[[EdgedConfig, EdgedConfig, List[str]], None]
# (seconds) -> None when the pipeline is healthy within them, else the reason it is not.
HealthCheck = Callable[[float], Optional[str]]


class RemoteConfigManager:
    """Takes desired messages one at a time (call `handle` from one thread) and returns the outcome.
    `current` is the effective config the daemon runs on."""

    def __init__(self, *, config_path: Union[str, Path, None], base_overlay: Optional[Dict[str, Any]],
                 store: OverlayStore, current: EdgedConfig, apply: Applier, health: HealthCheck,
                 secret: Optional[bytes] = None):
        self.config_path = config_path
        self.base_overlay = base_overlay or {}
        self.store = store
        self.current = current
        self._apply = apply
        self._health = health
        self.secret = secret
        self._last_payload: Dict[str, bytes] = {}
        self.counts: Dict[str, int] = {"applied": 0, "rejected": 0, "failed": 0, "ignored": 0}

    @property
    def effective_hash(self) -> str:
        return config_hash(self.current)

    def handle(self, scope: str, payload: bytes) -> Optional[Outcome]:
        """Process one desired message. None when it is the retained copy of what is already applied
        (re-delivered at every reconnect: nothing to say)."""
        outcome = self._handle(scope, payload)
        if outcome is not None:
            self.counts[outcome.status] += 1
            level = logging.INFO if outcome.status in ("applied", "ignored") else logging.WARNING
            log.log(level, "remote config (%s v%s): %s%s%s", scope, outcome.version, outcome.status,
                    f"; changed {', '.join(outcome.changed)}" if outcome.changed else "",
                    f"; {'; '.join(outcome.errors)}" if outcome.errors else "")
        return outcome

    def _handle(self, scope: str, payload: bytes) -> Optional[Outcome]:
        cfg_limits = self.current.remote_config
        try:
            desired = parse_desired(payload, scope, max_bytes=cfg_limits.max_payload_bytes, secret=self.secret)
        except Rejected as rej:
            return Outcome("rejected", scope, rej.version, rej.errors)
        applied = self.store.scopes[scope].version
        if desired.version <= applied:
            if desired.version == applied and self._last_payload.get(scope) in (None, payload):
                self._last_payload[scope] = payload
                return None  # the retained message of the applied version, seen again
            return Outcome("ignored", scope, desired.version,
                           [f"version: {desired.version} is not newer than the applied {applied}"])
        old_overlay = self.store.scopes[scope].overlay
        overlay = deep_merge(old_overlay, desired.overlay) if desired.merge else desired.overlay
        candidate_store = self.store.with_scope(scope, ScopeState(desired.version, overlay))
        try:
            new_cfg = effective_config(self.config_path, self.base_overlay, candidate_store)
        except ConfigError as exc:
            return Outcome("rejected", scope, desired.version, list(exc.problems))
        old_cfg = self.current

        changed = changed_paths(old_cfg, new_cfg)
        restart = [p for p in changed if _under(p, RESTART_REQUIRED)]
        live = [p for p in changed if p not in restart]
        if live:
            was_healthy = self._health(0.0) is None
            try:
                self._apply(old_cfg, new_cfg, live)
            except Exception as exc:
                return self._rollback(scope, desired, old_cfg, new_cfg, live, f"applying failed: {_reason(exc)}")
            self.current = new_cfg
            if was_healthy:
                problem = self._health(new_cfg.remote_config.health_timeout_s)
                if problem is not None:
                    return self._rollback(scope, desired, old_cfg, new_cfg, live, f"unhealthy after the change: {problem}")
        self.current = new_cfg
        try:
            candidate_store.save()
        except OSError as exc:
            return self._rollback(scope, desired, old_cfg, new_cfg, live, f"cannot persist the overlay: {_reason(exc)}")
        self.store = candidate_store
        self._last_payload[scope] = payload
        return Outcome("applied", scope, desired.version, [], changed, restart)

    def _rollback(self, scope: str, desired: Desired, old_cfg: EdgedConfig, new_cfg: EdgedConfig,
                  live: List[str], reason: str) -> Outcome:
        errors = [reason]
        try:
            self._apply(new_cfg, old_cfg, live)
        except Exception as exc:  # the parts keep what they could take; the report says so
            errors.append(f"rolling back failed too: {_reason(exc)}")
            log.error("remote config: rolling back failed: %s", exc)
        self.current = old_cfg
        return Outcome("failed", scope, desired.version, errors, live)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_hmac_secret(cfg: EdgedConfig, config_path: Union[str, Path, None]) -> Optional[bytes]:
    """The shared secret of remote_config.hmac_secret_file / _env (registered as a secret), or None."""

    rc = cfg.remote_config
    secret = read_secret("remote_config", rc.hmac_secret_file, rc.hmac_secret_env, config_path, name="hmac_secret")
    return secret.encode("utf-8") if secret else None


class RemoteConfigStage:
    """Desired messages from paho's thread to one worker: a bounded queue (a flood is dropped and
    counted, never buffered without limit) and the loop the supervisor runs."""

    def __init__(self, manager: RemoteConfigManager, publish: Callable[[Outcome], None], capacity: int = 64):
        self.manager = manager
        self._publish = publish
        self._queue: "queue.Queue[Tuple[str, bytes]]" = queue.Queue(maxsize=capacity)
        self.dropped = 0

    def offer(self, scope: str, payload: bytes) -> None:
        """Called from paho's network thread: only enqueue."""
        try:
            self._queue.put_nowait((scope, bytes(payload)))
        except queue.Full:
            self.dropped += 1

    def run(self, stop: "threading.Event", poll_s: float = 0.5) -> None:
        while not stop.is_set():
            try:
                scope, payload = self._queue.get(timeout=poll_s)
            except queue.Empty:
                continue
            outcome = self.manager.handle(scope, payload)
            if outcome is not None:
                self._publish(outcome)

