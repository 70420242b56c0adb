"""Shared fixtures: a real mosquitto broker on a free loopback port, paths to ../shared data.

A test whose prerequisite (data under ../shared, mosquitto, an optional module) is missing skips on a
developer's machine but FAILS when the environment variable CI is set: CI must not pass by skipping.
Use `shared_path`, `need_module` and `need_program` instead of pytest.skip/importorskip.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import List, NoReturn, Optional

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODELS = SHARED / "models"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> NoReturn:
    """A prerequisite of the test is absent: skip locally, fail under CI (also at module level)."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing prerequisite fails instead of skipping)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def shared_path(*parts: str) -> Path:
    """A path under ../shared; when it is absent the test skips locally and fails under CI."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        missing(f"needs {p} (../shared is not present in this checkout)")
    return p


def need_module(name: str) -> ModuleType:
    """`pytest.importorskip` that fails under CI: the imported module."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"needs the Python module {name} ({exc}); install edged's dev extra")


def need_program(name: str, *other_places: str) -> str:
    """The path of an executable on PATH (or at one of `other_places`); skips locally, fails under CI."""
    found = shutil.which(name) or next((p for p in other_places if os.access(p, os.X_OK)), None)
    if found is None:
        missing(f"needs the program {name} (apt-get install the package that provides it)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


@dataclass
class Broker:
    """A mosquitto process with its own config; `stop()`/`start()` simulate outages on the same port."""

    workdir: Path
    port: int
    extra_conf: List[str] = field(default_factory=list)
    proc: Optional[subprocess.Popen] = None

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def write_conf(self) -> None:
        lines = list(self.extra_conf) or [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        lines += [
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        if MOSQUITTO is None:
            missing("mosquitto is not installed (apt-get install mosquitto)")
        self.write_conf()
        # mosquitto as root drops to user 'mosquitto': let it write its log in our temp dir.
        try:
            os.chmod(self.workdir, 0o777)
        except OSError:
            pass
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start; log: {self.log_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""


@pytest.fixture
def broker_factory(tmp_path):
    """Make brokers with custom config lines (TLS, ACL...). Every broker is stopped at teardown."""
    made: List[Broker] = []
    # mosquitto started as root drops to user 'mosquitto', which cannot traverse pytest's 0700
    # tmp_path: its log goes to a directory of its own that it can reach.
    base = Path(tempfile.mkdtemp(prefix="edged-broker-"))
    os.chmod(base, 0o755)

    def make(extra_conf: Optional[List[str]] = None, port: Optional[int] = None, start: bool = True) -> Broker:
        d = base / f"broker{len(made)}"
        d.mkdir()
        b = Broker(workdir=d, port=port or free_port(), extra_conf=list(extra_conf or []))
        made.append(b)
        if start:
            b.start()
        return b

    try:
        yield make
    finally:
        for b in made:
            b.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pool():
    """Brokers of every kind the compatibility tests use (tests/brokers.py), started on demand and
    stopped after the module."""
    from brokers import BrokerPool  # imports this module

    p = BrokerPool()
    yield p
    p.close()


@pytest.fixture
def broker(broker_factory) -> Broker:
    """A plain anonymous mosquitto on a free 127.0.0.1 port."""
    return broker_factory()


def retained_topics(port: int, topic_filter: str, timeout: float = 30.0) -> List[str]:
    """Topics under `topic_filter` holding a retained message on the broker right now.

    Subscribes to the filter and to a private marker topic in one SUBSCRIBE, then publishes to the
    marker: the broker queued every retained message when it handled the SUBSCRIBE, so all of them
    have arrived once the marker is back (an event, not a guessed delay)."""
    marker = f"test-marker/{uuid.uuid4().hex}"
    found: List[str] = []
    back = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c, _u, msg) -> None:
        if msg.topic == marker:
            back.set()
        elif msg.retain and msg.payload:
            found.append(msg.topic)

    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe([(topic_filter, 1), (marker, 1)])
    client.on_subscribe = lambda c, _u, _m, _r, _p: c.publish(marker, b"m", qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert back.wait(timeout), "the broker never sent the marker back"
        return found
    finally:
        client.disconnect()
        client.loop_stop()
