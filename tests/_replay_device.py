"""A real edged device for broker tests: an `edged replay` process (the daemon: tracker, events engine,
outbox, publisher, remote configuration) on recorded MOT15 detections, printing every committed event.

`--print-events` prints an event after its outbox transaction committed, so the printed events are
exactly what the device promised to deliver (a SIGKILL may cut the last frame's print short, never the
other way round)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from conftest import ROOT, shared_path
from netutil import ProcessOutput


def detections() -> Path:
    return shared_path("data", "mot15", "TUD-Stadtmitte", "det", "det.txt")


class ReplayDevice:
    def __init__(self, workdir: Path, port: int, *, device_id: Optional[str] = None, protocol: str = "auto",
                 site: Optional[str] = None, fps: float = 40.0, loop: bool = True, fast: bool = False,
                 mqtt: Optional[Dict[str, Any]] = None, host: str = "127.0.0.1", extra: Sequence[str] = ()):
        self.device_id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir / self.device_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "device.yaml"
        m = {"host": host, "port": port, "protocol": protocol, "site": site, "keepalive": 10,
             "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "stats_interval_s": 1.0}
        m.update(mqtt or {})
        self.config.write_text(yaml.safe_dump({
            "device_id": self.device_id, "state_dir": str(self.workdir / "state"), "mqtt": m,
            "web": {"enabled": False},
            # A replay has no encoder; said explicitly, a remote change does not try to build one.
            "encoder": {"enabled": False},
        }))
        self.args = ["--detections", str(detections()), "--print-events", "--fps", str(fps), *extra]
        if loop:
            self.args.append("--loop")
        if fast:
            self.args.append("--as-fast-as-possible")
        self.runs: List[ProcessOutput] = []

    @property
    def out(self) -> ProcessOutput:
        return self.runs[-1]

    def start(self) -> "ReplayDevice":
        proc = subprocess.Popen([sys.executable, "-m", "edged", "replay", "--config", str(self.config), *self.args],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.runs.append(ProcessOutput(proc))
        return self

    def events(self) -> List[dict]:
        """Every event the device committed, over all its runs (positions included)."""
        out = []
        for run in self.runs:
            with run._cond:
                lines = list(run.stdout)
            out += [json.loads(ln) for ln in lines if ln.startswith("{")]
        return out

    def event_ids(self, topic_events_only: bool = True) -> List[str]:
        return [e["event_id"] for e in self.events() if not topic_events_only or e["type"] != "position"]

    def count_stderr(self, text: str) -> int:
        with self.out._cond:
            return sum(text in ln for ln in self.out.stderr)

    def wait_stderr(self, text: str, times: int = 1, timeout: float = 60.0) -> bool:
        return self.out.wait_for(lambda: sum(text in ln for ln in self.out.stderr) >= times, timeout)

    def wait_events(self, n: int, timeout: float = 60.0) -> bool:
        return self.out.wait_for(lambda: sum(ln.startswith("{") and '"position"' not in ln
                                             for ln in self.out.stdout) >= n, timeout)

    def kill9(self) -> None:
        self.out.proc.send_signal(signal.SIGKILL)
        self.out.wait_exit(30)

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        return self.out.stop(timeout)

    def stderr_tail(self, n: int = 40) -> str:
        return "\n".join(self.out.stderr[-n:]) if self.runs else ""
