"""Real MQTT brokers for the compatibility tests: mosquitto 2, NATS server (JetStream + its MQTT listener)
and RabbitMQ (rabbitmq_mqtt). Each instance is its own process tree on free loopback ports with its own
files in a temporary directory; it never uses (or disturbs) a broker the machine happens to run on the
default ports, and it is always stopped.

RabbitMQ is an Erlang node, so an isolated instance needs more than its own ports: its own node name,
distribution port, `epmd` (ERL_EPMD_PORT: a private port-mapper daemon, killed after the node), Erlang
cookie (HOME points into the temporary directory, where Erlang creates a fresh one), mnesia and log
directories, enabled-plugins file, config file, and no rabbitmq-env.conf of the system. It takes seconds
to start: use it from a module-scoped fixture.

A missing broker program is installed with apt-get when we are root (Debian packages `mosquitto`,
`nats-server`, `rabbitmq-server`); otherwise the test skips locally and fails under CI (conftest.missing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import free_port, missing, wait_for_port

# program -> (Debian package, places it lives when not on PATH)
PROGRAMS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "mosquitto": ("mosquitto", ("/usr/sbin/mosquitto",)),
    "nats-server": ("nats-server", ("/usr/sbin/nats-server", "/usr/bin/nats-server")),
    "rabbitmq-server": ("rabbitmq-server", ("/usr/lib/rabbitmq/bin/rabbitmq-server",)),
}
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
_install_lock = threading.Lock()


def program(name: str) -> str:
    """Path of a broker program; installs its Debian package when missing and we may (root + apt-get)."""
    package, places = PROGRAMS[name]

    def find() -> Optional[str]:
        # RabbitMQ: the real start script, not /usr/sbin's wrapper (which switches to the system node's user
        # and directory).
        candidates = list(places) if name == "rabbitmq-server" else [shutil.which(name) or "", *places]
        return next((p for p in candidates if p and os.access(p, os.X_OK)), None)

    found = find()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        with _install_lock:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", package], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900, check=False)
        found = find()
    if found is None:
        missing(f"needs {name} (apt-get install {package})")
    return found  # type: ignore[return-value]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _terminate(proc: Optional[subprocess.Popen], timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class BrokerInstance:
    """One broker process with its own files; `stop()` / `start()` restart it on the same ports with
    the same data (persistent sessions and retained messages survive, as on a real server)."""

    kind = "?"
    speaks_v5 = False
    start_timeout = 30.0

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()  # the MQTT listener
        self.proc: Optional[subprocess.Popen] = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    def command(self) -> Tuple[List[str], Optional[Dict[str, str]]]:
        raise NotImplementedError

    def start(self) -> None:
        cmd, env = self.command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.workdir, start_new_session=True)
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.kind} did not start on port {self.port}; log:\n{self.log_text()[-3000:]}") from None

    def _wait_ready(self) -> None:
        wait_for_port(self.port, self.start_timeout)

    def stop(self) -> None:
        _terminate(self.proc, 30.0)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{self.kind}(port {self.port})"


class Mosquitto(BrokerInstance):
    """mosquitto 2 with persistence (so a persistent subscriber session survives a restart) and no
    per-client queue limit (max_queued_messages 0: a backlog burst must not be dropped on the way to a
    slow test subscriber)."""

    kind = "mosquitto"
    speaks_v5 = True

    def __init__(self, workdir: Path, extra_conf: Sequence[str] = ()):
        super().__init__(workdir)
        self.extra_conf = list(extra_conf)
        # mosquitto started as root drops to user 'mosquitto': it must reach and write its directory.
        os.chmod(workdir, 0o777)

    def command(self) -> Tuple[List[str], Optional[Dict[str, str]]]:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "max_queued_messages 0",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice",
            *self.extra_conf,
        ]) + "\n")
        return [program("mosquitto"), "-c", str(conf)], None

    def start(self) -> None:
        self.log_path.touch()
        os.chmod(self.log_path, 0o666)
        super().start()


class Nats(BrokerInstance):
    """nats-server with JetStream (its MQTT support stores sessions, QoS 1 messages and retained messages in
    JetStream streams, so it needs it, and a server_name) and the MQTT listener."""

    kind = "nats"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.client_port = free_port()

    def command(self) -> Tuple[List[str], Optional[Dict[str, str]]]:
        conf = self.workdir / "nats.conf"
        conf.write_text("\n".join([
            f'server_name: "edged-test-{self.port}"',
            f'listen: "127.0.0.1:{self.client_port}"',
            "jetstream {",
            f'  store_dir: "{self.workdir}/jetstream"',
            "  max_memory_store: 67108864",
            "  max_file_store: 1073741824",
            "}",
            "mqtt {",
            f'  listen: "127.0.0.1:{self.port}"',
            "}",
        ]) + "\n")
        return [program("nats-server"), "-c", str(conf)], None

    def _wait_ready(self) -> None:
        wait_for_port(self.port, self.start_timeout)
        deadline = time.monotonic() + self.start_timeout
        while "Server is ready" not in self.log_text():  # JetStream (and so MQTT sessions) ready
            if time.monotonic() > deadline:
                raise TimeoutError("nats-server not ready")
            time.sleep(0.05)


class RabbitMQ(BrokerInstance):
    """An isolated RabbitMQ node with rabbitmq_mqtt (see the module docstring)."""

    kind = "rabbitmq"
    start_timeout = 90.0

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"edgedtest{self.port}@localhost"

    def env(self) -> Dict[str, str]:
        d = self.workdir
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (d / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}",
            "mqtt.allow_anonymous = true",
        ]) + "\n")
        (d / "rabbitmq-env.conf").write_text("")  # not the system's (it names the system node)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(d),  # Erlang creates (and uses) a private cookie here
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def command(self) -> Tuple[List[str], Optional[Dict[str, str]]]:
        program("rabbitmq-server")
        return [str(RABBITMQ_BIN / "rabbitmq-server")], self.env()

    def stop(self) -> None:
        # The start script execs erl, so proc is the node itself: SIGTERM is a clean shutdown.
        _terminate(self.proc, 60.0)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        # The node started its own epmd on our port; it outlives the node. Stop it (only ours: its port).
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        if os.access(epmd, os.X_OK) and not _port_free(self.epmd_port):
            subprocess.run([epmd, "-port", str(self.epmd_port), "-kill"], env={"PATH": os.environ.get("PATH", "")},
                           capture_output=True, timeout=30, check=False)


KINDS = {"mosquitto": Mosquitto, "nats": Nats, "rabbitmq": RabbitMQ}


class BrokerPool:
    """Makes broker instances in one temporary directory; `close()` stops every one and removes it."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="edged-brokers-"))
        os.chmod(self.base, 0o755)
        self.made: List[BrokerInstance] = []

    def make(self, kind: str, start: bool = True, **kw) -> BrokerInstance:
        d = self.base / f"{kind}{len(self.made)}"
        d.mkdir()
        b = KINDS[kind](d, **kw)
        self.made.append(b)
        if start:
            b.start()
        return b

    def close(self) -> None:
        for b in self.made:
            try:
                b.cleanup()
            except Exception:  # keep stopping the others
                pass
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- clients
PAHO = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.time() on arrival

    def json(self):
        return json.loads(self.payload)


class Subscriber:
    """A real consumer on any of the brokers: subscribes (again at every connect) and records every message.

    `persistent=True` makes the broker keep its session (subscriptions and QoS 1 messages) while it is
    disconnected and across a broker restart: clean_session=False on 3.1.1, clean_start=False with a
    session expiry on 5. That is how a backend that must not miss events subscribes."""

    def __init__(self, port: int, topics: Union[str, Sequence[str]], *, protocol: str = "5",
                 client_id: Optional[str] = None, persistent: bool = False, qos: int = 1,
                 host: str = "127.0.0.1", connect: bool = True):
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.protocol, self.qos, self.port, self.host = protocol, qos, port, host
        self.persistent = persistent
        self.client_id = client_id or f"sub-{uuid.uuid4().hex[:12]}"
        self.messages: List[Received] = []
        self.cond = threading.Condition()
        self.subscribed = 0  # SUBACKs seen
        self.refused: Optional[str] = None
        kw = {"clean_session": not persistent} if protocol == "3.1.1" else {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=PAHO[protocol], **kw)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        if connect:
            self.connect()

    def connect(self) -> None:
        props = None
        kw = {}
        if self.protocol == "5":
            kw["clean_start"] = not self.persistent
            if self.persistent:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 3600
        self.client.connect_async(self.host, self.port, keepalive=10, properties=props, **kw)
        self.client.loop_start()

    def _on_connect(self, client, _u, _f, rc, _p) -> None:
        if rc.is_failure:
            with self.cond:
                self.refused = str(rc)
                self.cond.notify_all()
            return
        client.subscribe([(t, self.qos) for t in self.topics])

    def _on_subscribe(self, _c, _u, _mid, _rcs, _p) -> None:
        with self.cond:
            self.subscribed += 1
            self.cond.notify_all()

    def _on_message(self, _c, _u, msg) -> None:
        with self.cond:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), time.time()))
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float = 30.0) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def wait_subscribed(self, times: int = 1, timeout: float = 30.0) -> bool:
        return self.wait(lambda: self.subscribed >= times, timeout)

    def first_retained(self, timeout: float) -> Optional[bytes]:
        """The first retained message to arrive within `timeout` (None if none)."""
        self.wait(lambda: any(m.retain for m in self.messages), timeout)
        with self.cond:
            return next((m.payload for m in self.messages if m.retain), None)

    def on(self, suffix: str) -> List[Received]:
        with self.cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def event_ids(self, suffix: str = "/events") -> List[str]:
        return [m.json()["event_id"] for m in self.on(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, topic: str, *, protocol: str = "5", expect: Optional[bytes] = None,
             timeout: float = 20.0) -> Optional[bytes]:
    """The retained message a fresh subscriber gets on `topic` (None if none within `timeout`). With
    `expect`, subscribe afresh until that value is retained (a will is published a moment after the
    connection died)."""
    deadline = time.monotonic() + timeout
    while True:
        sub = Subscriber(port, topic, protocol=protocol)
        try:
            left = max(0.1, min(5.0, deadline - time.monotonic()))
            got = sub.first_retained(left)
        finally:
            sub.close()
        if expect is None or got == expect or time.monotonic() >= deadline:
            return got
