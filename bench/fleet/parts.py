"""The processes of a fleet run, each inside its network namespace: the central NATS cluster (3 nodes,
JetStream replicated, MQTT listener), one edge mosquitto per bridged site, the devices (`edged replay`)
and the consumer example; plus CPU / memory readings from /proc."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from .netns import NODE_IPS, Topology

ROOT = Path(__file__).resolve().parents[2]
SHARED_MOT15 = ROOT.parent / "shared" / "data" / "mot15"
SEQUENCES = ("TUD-Stadtmitte", "ETH-Bahnhof", "ETH-Pedcross2", "KITTI-13", "ADL-Rundle-6", "ADL-Rundle-8", "Venice-2")
MQTT_PORT = 1883
CLK_TCK = os.sysconf("SC_CLK_TCK")


def program(name: str, *places: str) -> str:
    found = shutil.which(name) or next((p for p in places if os.access(p, os.X_OK)), None)
    if found is None:
        raise SystemExit(f"needs {name} (apt-get install {name})")
    return found


def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of a process (its threads included) from /proc/<pid>/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def private_mb(pid: int) -> Optional[float]:
    """Private (not shared) resident memory: Private_Clean + Private_Dirty from smaps_rollup."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except OSError:
        return None
    return total / 1024.0


class CpuMeter:
    """Samples the CPU time of a set of processes once a second so that a process that is killed still
    counts with its last reading. `total()` is the CPU seconds used since each pid was added."""

    def __init__(self):
        self._start: Dict[int, float] = {}
        self._last: Dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        v = cpu_seconds(pid)
        if v is not None:
            with self._lock:
                self._start[pid] = self._last[pid] = v

    def sample(self) -> None:
        with self._lock:
            pids = list(self._start)
        for pid in pids:
            v = cpu_seconds(pid)
            if v is not None:
                with self._lock:
                    self._last[pid] = v

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def total(self) -> float:
        self.sample()
        with self._lock:
            return sum(self._last[p] - self._start[p] for p in self._start)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _terminate(proc: Optional[subprocess.Popen], timeout: float = 30.0) -> Optional[int]:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# ---------------------------------------------------------------------------------------------- central
@dataclass
class NatsNode:
    index: int
    workdir: Path
    topo: Topology
    proc: Optional[subprocess.Popen] = None

    @property
    def ip(self) -> str:
        return NODE_IPS[self.index]

    @property
    def name(self) -> str:
        return f"central-{self.index + 1}"

    @property
    def log(self) -> Path:
        return self.workdir / "nats.log"

    def write_conf(self) -> Path:
        routes = ", ".join(f"nats-route://{a}:6222" for a in NODE_IPS)
        conf = self.workdir / "nats.conf"
        conf.write_text("\n".join([
            f'server_name: "{self.name}"',  # MQTT needs one
            f'listen: "{self.ip}:4222"',
            f'http: "{self.ip}:8222"',
            "jetstream {",
            f'  store_dir: "{self.workdir}/jetstream"',
            "  max_memory_store: 268435456",
            "  max_file_store: 4294967296",
            "}",
            "cluster {",
            "  name: central",
            f'  listen: "{self.ip}:6222"',
            f"  routes: [{routes}]",
            "}",
            "mqtt {",
            f'  listen: "{self.ip}:{MQTT_PORT}"',
            "  stream_replicas: 3",  # sessions, QoS 1 messages and retained messages survive a node
            "  max_ack_pending: 1024",
            "}",
        ]) + "\n")
        return conf

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.write_conf()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.topo.exec_argv(self.topo.central, [program("nats-server", "/usr/sbin/nats-server"), "-c", str(conf)]),
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        _terminate(self.proc)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class NatsCluster:
    def __init__(self, workdir: Path, topo: Topology, cpu: CpuMeter):
        self.nodes = [NatsNode(i, workdir / f"central-{i + 1}", topo) for i in range(len(NODE_IPS))]
        self.cpu = cpu

    def start(self, timeout: float = 60.0) -> None:
        for n in self.nodes:
            n.start()
            self.cpu.add(n.proc.pid)
        deadline = time.monotonic() + timeout
        while not all("Server is ready" in n.log_text() for n in self.nodes) or not any(
                "metadata leader" in n.log_text() for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("NATS cluster not ready: " + self.nodes[0].log_text()[-2000:])
            if any(n.proc.poll() is not None for n in self.nodes):
                raise RuntimeError("a NATS node exited: " + next(n.log_text() for n in self.nodes if n.proc.poll() is not None)[-2000:])
            time.sleep(0.2)

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        self.nodes[i].start()
        self.cpu.add(self.nodes[i].proc.pid)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def brokers(self) -> List[str]:
        return [f"{a}:{MQTT_PORT}" for a in NODE_IPS]


# ---------------------------------------------------------------------------------------------- edge
class EdgeBridge:
    """mosquitto in a site's namespace: the site's devices publish to it on 127.0.0.1; it forwards their
    topics to the central cluster over MQTT 3.1.1 (NATS speaks no 5) with a persistent bridge session,
    queueing on disk while the uplink is down, and brings `config/desired` in (remote configuration)."""

    def __init__(self, site: str, ns: str, workdir: Path, topo: Topology, prefix: str = "edged"):
        self.site, self.ns, self.workdir, self.topo, self.prefix = site, ns, workdir, topo, prefix
        self.proc: Optional[subprocess.Popen] = None

    def conf_text(self) -> str:
        base = f"{self.prefix}/{self.site}/+"
        out = [f"{base}/{sub} out 1" for sub in ("availability", "events", "tracks", "state", "stats",
                                                 "config/reported", "config/effective")]
        incoming = [f"{base}/config/desired in 1", f"{self.prefix}/fleet/config/desired in 1"]
        return "\n".join([
            f"listener {MQTT_PORT} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "max_queued_messages 0",  # the bridge's queue during an uplink cut is bounded by disk, not count
            f"log_dest file {self.workdir}/mosquitto.log",
            "log_type error", "log_type warning", "log_type notice", "log_type information",  # "running"
            "connection central",
            "address " + " ".join(f"{a}:{MQTT_PORT}" for a in NODE_IPS),
            "round_robin false",  # the first node while it is up; the next ones when it is not
            "bridge_protocol_version mqttv311",
            "try_private false",  # a bridge flag in the protocol level byte: NATS refuses it
            "cleansession false",
            f"remote_clientid edge-{self.site}",
            "notifications false",  # NATS refuses $SYS topics
            "keepalive_interval 10",
            "restart_timeout 1 10",
            *(f"topic {t}" for t in out + incoming),
        ]) + "\n"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o777)  # mosquitto started as root drops to user mosquitto
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.conf_text())
        self.proc = subprocess.Popen(self.topo.exec_argv(self.ns, [program("mosquitto", "/usr/sbin/mosquitto"), "-c", str(conf)]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def log_text(self) -> str:
        try:
            return (self.workdir / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        """Listening (its log says so) and not exited."""
        return self.proc is not None and self.proc.poll() is None and " running" in self.log_text()

    def stop(self) -> None:
        _terminate(self.proc)


# ---------------------------------------------------------------------------------------------- devices
class Device:
    """A real `edged replay` process in its site's namespace; every committed event is printed (after its
    outbox commit) into events-<run>.jsonl; a restart appends a new run."""

    def __init__(self, index: int, site: str, ns: str, workdir: Path, topo: Topology, *, host: str, fps: float,
                 sequence: str, prefix: str = "edged"):
        self.index, self.site, self.ns, self.workdir, self.topo = index, site, ns, workdir, topo
        self.device_id = f"d{index:04d}"
        self.host, self.fps, self.sequence = host, fps, sequence
        self.proc: Optional[subprocess.Popen] = None
        self.runs = 0
        self.config = workdir / "device.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump({
            "device_id": self.device_id, "state_dir": str(workdir / "state"),
            "mqtt": {"host": host, "port": MQTT_PORT, "site": site, "topic_prefix": prefix, "protocol": "auto",
                     "keepalive": 15, "reconnect_min_s": 0.5, "reconnect_max_s": 5.0, "stats_interval_s": 30.0},
            "web": {"enabled": False}, "encoder": {"enabled": False},
        }))

    def start(self) -> None:
        self.runs += 1
        det = SHARED_MOT15 / self.sequence / "det" / "det.txt"
        argv = [sys.executable, "-m", "edged", "replay", "--config", str(self.config), "--detections", str(det),
                "--loop", "--fps", str(self.fps), "--print-events"]
        with open(self.workdir / f"events-{self.runs}.jsonl", "ab") as out, open(self.workdir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(self.topo.exec_argv(self.ns, argv), cwd=ROOT, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        return _terminate(self.proc, timeout)

    def signal_stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def outbox_depth(self) -> int:
        """Rows still queued in the device's outbox (read after the process ended)."""
        import sqlite3

        db = self.workdir / "state" / "outbox.sqlite3"
        if not db.exists():
            return 0
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return int(con.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def committed(self) -> List[str]:
        """Lines printed over every run (one JSON event per line, after its outbox commit)."""
        lines: List[str] = []
        for f in sorted(self.workdir.glob("events-*.jsonl")):
            lines += [ln for ln in f.read_text(errors="replace").splitlines() if ln.startswith("{")]
        return lines

    def stderr_text(self) -> str:
        try:
            return (self.workdir / "stderr.log").read_text(errors="replace")
        except OSError:
            return ""


# ---------------------------------------------------------------------------------------------- consumer
class ConsumerProcess:
    """examples/fleet_consumer.py in the central namespace, persistent session, fail-over over the nodes."""

    def __init__(self, workdir: Path, topo: Topology, brokers: Sequence[str]):
        self.workdir, self.topo, self.brokers = workdir, topo, list(brokers)
        self.record = workdir / "consumer-events.jsonl"
        self.summary = workdir / "consumer-summary.json"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        argv = [sys.executable, str(ROOT / "examples" / "fleet_consumer.py"), "--client-id", "fleet-backend",
                "--record", str(self.record), "--summary", str(self.summary), "--interval", "10"]
        for b in self.brokers:
            argv += ["--broker", b]
        with open(self.workdir / "consumer.log", "ab") as log:
            self.proc = subprocess.Popen(self.topo.exec_argv(self.topo.central, argv), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def snapshot(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> Optional[int]:
        return _terminate(self.proc, 60)

    def log_text(self) -> str:
        try:
            return (self.workdir / "consumer.log").read_text(errors="replace")
        except OSError:
            return ""
