"""One fleet run: topology, central cluster, edge bridges, devices, consumer, an optional fault, results.

Everything is started by `run_fleet()` and stopped (processes by pid, namespaces removed) in its
`finally`, also on an exception or Ctrl-C; every wait is bounded.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .netns import NODE_IPS, Topology
from .parts import (
    SEQUENCES, SHARED_MOT15, ConsumerProcess, CpuMeter, Device, EdgeBridge, NatsCluster, private_mb, cpu_seconds,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from fleet_consumer import parse_ts  # noqa: E402

FAULTS = ("none", "node-kill", "link-cut")


@dataclass
class FleetSpec:
    devices: int = 10
    sites: int = 2
    fps: float = 2.0
    duration_s: float = 120.0  # measurement window, from "every device online" to the snapshot
    fault: str = "none"
    bridged_every: int = 2  # every n-th site publishes through an edge mosquitto (the others directly)
    node_down_s: float = 30.0
    cut_s: float = 60.0
    start_batch: int = 10  # devices started per second (start-up is the CPU-heaviest moment)
    settle_timeout_s: float = 300.0
    keep_workdir: bool = False

    def __post_init__(self):
        if self.fault not in FAULTS:
            raise ValueError(f"fault: one of {', '.join(FAULTS)}")
        if self.devices < self.sites:
            raise ValueError("at least one device per site")


@dataclass
class FleetResult:
    spec: dict
    devices: int = 0
    sites: int = 0
    bridged_sites: int = 0
    window_s: float = 0.0
    sent: int = 0  # events (topic `events`) the devices committed (printed after their outbox commit)
    received: int = 0  # distinct events the consumer got
    lost: int = 0
    extra: int = 0  # received but not in a device's log (a SIGKILL cut the print of a committed event short)
    duplicates: int = 0
    latency_p50_s: float = math.nan
    latency_p95_s: float = math.nan
    latency_max_s: float = math.nan
    broker_cpu_s: float = 0.0
    broker_cpu_pct: float = 0.0  # of one core, over the window, the 3 nodes together
    edge_cpu_s: float = 0.0
    devices_cpu_pct: float = 0.0
    device_private_mb_mean: float = 0.0
    device_private_mb_max: float = 0.0
    counts_equal: bool = False
    count_check: Dict[str, dict] = field(default_factory=dict)
    left_in_outbox: int = 0  # committed rows still queued on a device after its clean stop
    consumer_connects: int = 0
    device_restarts_seen: int = 0
    faults: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _percentile(values: List[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _read_jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut by SIGKILL
    return out


def _wait(pred, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def _committed_events(dev: Device) -> Dict[str, dict]:
    out = {}
    for line in dev.committed():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("type") != "position":
            out[ev["event_id"]] = ev
    return out


def _received_ids(consumer: ConsumerProcess) -> set:
    return {r["event_id"] for r in _read_jsonl(consumer.record)}


def run_fleet(spec: FleetSpec, log=print) -> FleetResult:
    if not SHARED_MOT15.is_dir():
        raise SystemExit(f"needs the MOT15 detections in {SHARED_MOT15}")
    run_id = secrets.token_hex(2)
    work = Path(tempfile.mkdtemp(prefix=f"edged-fleet-{run_id}-"))
    os.chmod(work, 0o755)
    topo = Topology(run_id, spec.sites)
    cpu_broker, cpu_edge = CpuMeter(), CpuMeter()
    result = FleetResult(spec=asdict(spec), devices=spec.devices, sites=spec.sites)
    devices: List[Device] = []
    edges: List[EdgeBridge] = []
    cluster: Optional[NatsCluster] = None
    consumer: Optional[ConsumerProcess] = None
    try:
        topo.create()
        log(f"fleet {run_id}: {spec.devices} devices in {spec.sites} sites, fault {spec.fault}; work dir {work}")
        cluster = NatsCluster(work / "central", topo, cpu_broker)
        cluster.start()
        consumer = ConsumerProcess(work, topo, cluster.brokers())
        consumer.start()
        if not _wait(lambda: "connected to" in consumer.log_text(), 60):
            raise RuntimeError("consumer did not connect: " + consumer.log_text()[-2000:])
        bridged = [k for k in range(spec.sites) if k % spec.bridged_every == 0] if spec.bridged_every else []
        result.bridged_sites = len(bridged)
        for k in bridged:
            e = EdgeBridge(f"s{k:02d}", topo.site_ns(k), work / "edges" / f"s{k:02d}", topo)
            e.start()
            edges.append(e)
        for e in edges:
            if not _wait(e.running, 15, 0.1):
                raise RuntimeError(f"edge mosquitto of {e.site} did not start: {e.log_text()[-1000:]}")
            cpu_edge.add(e.proc.pid)
        for i in range(spec.devices):
            k = i % spec.sites
            host = "127.0.0.1" if k in bridged else NODE_IPS[i % len(NODE_IPS)]
            devices.append(Device(i, f"s{k:02d}", topo.site_ns(k), work / "devices" / f"d{i:04d}", topo, host=host,
                                  fps=spec.fps, sequence=SEQUENCES[i % len(SEQUENCES)]))
        for n, dev in enumerate(devices):
            dev.start()
            if (n + 1) % spec.start_batch == 0:
                time.sleep(1.0)
        if not _wait(lambda: all("mqtt: online" in d.stderr_text() or d.proc.poll() is not None for d in devices),
                     spec.settle_timeout_s, 1.0):
            late = [d.device_id for d in devices if "mqtt: online" not in d.stderr_text()]
            raise RuntimeError(f"devices not online: {late[:10]} ({len(late)})")
        dead = [d.device_id for d in devices if d.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"devices exited at start: {dead[:10]}: " + next(d for d in devices if d.proc.poll() is not None).stderr_text()[-2000:])
        log(f"all {len(devices)} devices online; measuring {spec.duration_s:.0f} s")
        dev_cpu0 = {d.proc.pid: cpu_seconds(d.proc.pid) or 0.0 for d in devices}
        broker0, t0, t0_wall = cpu_broker.total(), time.monotonic(), time.time()
        killed: List[Device] = []
        _run_window(spec, topo, cluster, devices, bridged, killed, result, log)
        window, t1_wall = time.monotonic() - t0, time.time()
        result.window_s = round(window, 1)
        # The end of the run: devices' memory and CPU, the consumer's snapshot of every device's newest state.
        mem = [m for m in (private_mb(d.proc.pid) for d in devices if d.proc.poll() is None) if m is not None]
        dev_cpu = sum((cpu_seconds(d.proc.pid) or 0.0) - dev_cpu0.get(d.proc.pid, 0.0) for d in devices
                      if d.proc.poll() is None and d.proc.pid in dev_cpu0)
        result.devices_cpu_pct = round(100.0 * dev_cpu / window, 1)
        if mem:
            result.device_private_mb_mean = round(statistics.mean(mem), 1)
            result.device_private_mb_max = round(max(mem), 1)
        consumer.snapshot()
        time.sleep(1.0)  # the snapshot is taken by the consumer's loop (within 0.5 s)
        result.broker_cpu_s = round(cpu_broker.total() - broker0, 1)
        result.broker_cpu_pct = round(100.0 * result.broker_cpu_s / window, 1)
        log("stopping the devices (clean: exits for live tracks, outbox drained)")
        # In batches: a device drains its outbox for at most 5 s when stopped; 200 at once on 2 cores may not.
        for i in range(0, len(devices), spec.start_batch * 2):
            batch = devices[i:i + spec.start_batch * 2]
            for d in batch:
                d.signal_stop()
            for d in batch:
                d.stop(60)
        left = {d.device_id: n for d in devices if (n := d.outbox_depth())}
        result.left_in_outbox = sum(left.values())
        if left:
            result.notes.append(f"rows left in outboxes after the stop (delivered at the next start): {left}")
        sent: Dict[str, dict] = {}
        for d in devices:
            sent.update(_committed_events(d))
        if not _wait(lambda: set(sent) <= _received_ids(consumer), spec.settle_timeout_s, 1.0):
            result.notes.append("consumer still missing events after the settle timeout")
        consumer.stop()
        summary = json.loads(consumer.summary.read_text()) if consumer.summary.exists() else {}
        records = {r["event_id"]: r for r in _read_jsonl(consumer.record)}
        result.sent, result.received = len(sent), len(set(records) & set(sent))
        result.lost = len(set(sent) - set(records))
        result.extra = len(set(records) - set(sent))
        result.duplicates = int(summary.get("duplicates", 0))
        result.consumer_connects = int(summary.get("connects", 0))
        result.device_restarts_seen = int(summary.get("device_restarts", 0))
        # Latency of the events produced in the window (not the start-up, not the shutdown exits).
        lat = [r["received"] - t for r in records.values() if r.get("ts") and t0_wall <= (t := parse_ts(r["ts"])) <= t1_wall]
        result.latency_p50_s = round(_percentile(lat, 0.5), 3)
        result.latency_p95_s = round(_percentile(lat, 0.95), 3)
        result.latency_max_s = round(max(lat), 3) if lat else math.nan
        _count_check(result, summary)
        result.edge_cpu_s = round(cpu_edge.total(), 1)
        log(json.dumps({k: v for k, v in asdict(result).items() if k not in ("spec", "count_check")}))
        return result
    finally:
        for d in devices:
            d.kill9()
        if consumer is not None:
            consumer.stop()
        for e in edges:
            e.stop()
        if cluster is not None:
            cluster.stop()
        cpu_broker.close()
        cpu_edge.close()
        topo.destroy()
        if not spec.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)


def _run_window(spec: FleetSpec, topo: Topology, cluster: NatsCluster, devices: List[Device], bridged: List[int],
                killed: List[Device], result: FleetResult, log) -> None:
    """The measurement window with its fault, if any (a quarter of the way in)."""
    start = time.monotonic()
    fault_at = start + spec.duration_s * 0.25

    def sleep_until(t: float) -> None:
        time.sleep(max(0.0, t - time.monotonic()))

    if spec.fault == "node-kill":
        sleep_until(fault_at)
        cluster.kill(0)
        result.faults.append(f"t+{time.monotonic() - start:.0f}s: central-1 SIGKILLed")
        log(result.faults[-1])
        sleep_until(fault_at + spec.node_down_s)
        cluster.restart(0)
        result.faults.append(f"t+{time.monotonic() - start:.0f}s: central-1 restarted")
        log(result.faults[-1])
    elif spec.fault == "link-cut":
        direct = [k for k in range(spec.sites) if k not in bridged]
        cut_sites = ([direct[0]] if direct else []) + ([bridged[0]] if bridged else [])
        sleep_until(fault_at)
        for k in cut_sites:
            topo.cut(k)
        result.faults.append(f"t+{time.monotonic() - start:.0f}s: uplink of site(s) "
                             f"{', '.join(f's{k:02d}' for k in cut_sites)} cut for {spec.cut_s:.0f} s")
        log(result.faults[-1])
        sleep_until(fault_at + spec.cut_s / 3)
        for k in cut_sites:  # one device of each cut site dies during the cut
            victim = next(d for d in devices if d.site == f"s{k:02d}")
            victim.kill9()
            killed.append(victim)
        result.faults.append(f"t+{time.monotonic() - start:.0f}s: {', '.join(d.device_id for d in killed)} SIGKILLed")
        log(result.faults[-1])
        sleep_until(fault_at + spec.cut_s)
        for k in cut_sites:
            topo.restore(k)
        result.faults.append(f"t+{time.monotonic() - start:.0f}s: uplinks restored; killed devices restarted")
        for d in killed:
            d.start()
        log(result.faults[-1])
    sleep_until(start + spec.duration_s)


def _count_check(result: FleetResult, summary: dict) -> None:
    """The consumer's live counts (events up to each device's newest state at the end of the window)
    against the sum of those states, per site."""
    check = summary.get("check_snapshot") or {}
    result.count_check = check
    # Every device counts, SIGKILLed ones too: the consumer resets a restarted device's count.
    result.counts_equal = bool(check) and all(v["from_events"] == v["from_states"] for v in check.values())
