"""Supervised stage threads: a stage that raises is logged, counted and restarted with backoff; a stage
that keeps failing is fatal.

Every long-running thread of the daemon (capture, inference, tracking, publisher, web) runs its body
through `Supervisor.spawn`. The body is called again after a failure on the same thread, so all state it
needs must live on its object (the pipeline and the publisher are written that way). "Keeps failing"
means more than `max_restarts` failures within `window_s`: then `on_fatal(stage, error)` is called once
and the daemon exits non-zero (see service.py: without a clean MQTT DISCONNECT, so the broker publishes
the last will `offline`, and systemd restarts the service).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional

log = logging.getLogger("edged.supervisor")


@dataclass
class StageRecord:
    name: str
    state: str = "starting"  # starting | running | backoff | finished | failed | stopped
    failures: int = 0  # total since start
    last_error: Optional[str] = None
    started_at: float = 0.0  # monotonic, of the current run
    recent: Deque[float] = field(default_factory=collections.deque)  # failure times within the window
    thread: Optional[threading.Thread] = None


class Supervisor:
    def __init__(
        self,
        stop: threading.Event,
        *,
        on_fatal: Callable[[str, BaseException], None],
        max_restarts: int = 5,
        window_s: float = 300.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ):
        self.stop = stop
        self.on_fatal = on_fatal
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._stages: Dict[str, StageRecord] = {}
        self._lock = threading.Lock()
        self._fatal_sent = False

    def spawn(self, name: str, body: Callable[[], None], stop: Optional[threading.Event] = None,
              critical: bool = True) -> threading.Thread:
        """Run `body()` in a daemon thread named edged-<name>, restarting it when it raises. A body
        that returns has finished (end of stream, or it saw the stop event). `stop` (default: the
        supervisor's) ends the restarts and interrupts a backoff wait. A stage that is not `critical`
        (the debug web server) is left failed when it keeps failing, instead of ending the daemon."""
        with self._lock:
            if name in self._stages and self._stages[name].state in ("starting", "running", "backoff"):
                raise RuntimeError(f"stage {name!r} is already running")
            rec = self._stages[name] = StageRecord(name)
        t = threading.Thread(target=self._run, args=(rec, body, stop or self.stop, critical), name=f"edged-{name}", daemon=True)
        rec.thread = t
        t.start()
        return t

    def _run(self, rec: StageRecord, body: Callable[[], None], stop: threading.Event, critical: bool) -> None:
        delay = self.backoff_min_s
        while True:
            rec.state, rec.started_at = "running", time.monotonic()
            try:
                body()
                rec.state = "finished" if not stop.is_set() else "stopped"
                return
            except Exception as exc:
                now = time.monotonic()
                with self._lock:
                    rec.failures += 1
                    rec.last_error = f"{type(exc).__name__}: {exc}"
                    rec.recent.append(now)
                    while rec.recent and now - rec.recent[0] > self.window_s:
                        rec.recent.popleft()
                    give_up = len(rec.recent) > self.max_restarts
                if give_up:
                    rec.state = "failed"
                    log.critical("stage %s failed %d times within %.0f s, giving up%s: %s", rec.name,
                                 len(rec.recent), self.window_s, "" if critical else " (the daemon goes on without it)",
                                 rec.last_error, exc_info=exc)
                    if critical:
                        self._fatal(rec.name, exc)
                    return
                # A stage that ran fine for a while starts its backoff over.
                if now - rec.started_at > 2 * self.backoff_max_s:
                    delay = self.backoff_min_s
                log.error("stage %s failed (%d within %.0f s), restarting in %.1f s: %s",
                          rec.name, len(rec.recent), self.window_s, delay, rec.last_error, exc_info=exc)
                rec.state = "backoff"
                if stop.wait(delay):
                    rec.state = "stopped"
                    return
                delay = min(self.backoff_max_s, delay * 2.0)

    def _fatal(self, name: str, exc: BaseException) -> None:
        with self._lock:
            if self._fatal_sent:
                return
            self._fatal_sent = True
        self.on_fatal(name, exc)

    # ------------------------------------------------------------------------------------ views
    def state(self, name: str) -> Optional[str]:
        rec = self._stages.get(name)
        return rec.state if rec else None

    def healthy(self, names: Optional[List[str]] = None) -> bool:
        """No stage (of `names`) in backoff or failed."""
        with self._lock:
            recs = [r for n, r in self._stages.items() if names is None or n in names]
        return all(r.state not in ("backoff", "failed") for r in recs)

    def alive(self, name: str) -> bool:
        rec = self._stages.get(name)
        return bool(rec and rec.thread is not None and rec.thread.is_alive())

    def join(self, name: str, timeout: Optional[float] = None) -> bool:
        """True when the stage's thread has ended (or never ran)."""
        rec = self._stages.get(name)
        if rec is None or rec.thread is None:
            return True
        rec.thread.join(timeout)
        return not rec.thread.is_alive()

    def stats(self) -> Dict[str, Dict[str, object]]:
        """Per stage: state, failures (restarts), last error. For `stats`, /status.json and /metrics."""
        with self._lock:
            return {
                n: {"state": r.state, "failures": r.failures, "last_error": r.last_error}
                for n, r in self._stages.items()
            }

    @property
    def total_failures(self) -> int:
        with self._lock:
            return sum(r.failures for r in self._stages.values())
