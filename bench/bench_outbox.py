"""Outbox and MQTT delivery benchmark (not a test; results go to docs/mqtt.md).

    .venv/bin/python bench/bench_outbox.py [--rows 5000] [--port PORT] [--json]

1. Outbox put/ack rates: one put() per row (one commit each) with synchronous=normal and full,
   put_many() batches of 100, ack() per row and ack_many() batches.
2. Delivery through a real broker (a private mosquitto on a free port unless --port is given):
   outbox.put() -> MqttPublisher -> broker -> subscriber, QoS 1:
   - drain: N rows already queued when the publisher starts (the backlog after an outage);
   - burst: N rows put as fast as possible, time until the subscriber has all (throughput);
   - paced: rows at a fixed rate, put-to-receive latency p50/p95/max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edged.config import MqttConfig  # noqa: E402
from edged.mqtt.client import MqttPublisher  # noqa: E402
from edged.mqtt.outbox import Outbox  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_mosquitto as _start_mosquitto  # noqa: E402


def _payload(i: int) -> bytes:
    # ~300 bytes, the size of a typical event record
    return json.dumps({"seq": i, "t": time.time(), "pad": "x" * 260}).encode()


def bench_outbox(rows: int, workdir: Path) -> dict:
    out = {}
    for sync in ("normal", "full"):
        db = workdir / f"bench-{sync}.sqlite"
        ob = Outbox(db, max_rows=10 * rows, max_bytes=1 << 30, synchronous=sync)
        n = rows if sync == "normal" else max(200, rows // 10)
        t0 = time.perf_counter()
        ids = [ob.put("bench/t", _payload(i)) for i in range(n)]
        t1 = time.perf_counter()
        for rid in ids:
            ob.ack(rid)
        t2 = time.perf_counter()
        out[f"put_per_s_{sync}"] = n / (t1 - t0)
        out[f"ack_per_s_{sync}"] = n / (t2 - t1)
        ob.close()
    ob = Outbox(workdir / "bench-batch.sqlite", max_rows=10 * rows, max_bytes=1 << 30)
    t0 = time.perf_counter()
    ids = []
    for start in range(0, rows, 100):
        ids += ob.put_many([("bench/t", _payload(i), 1, False, "event", None) for i in range(start, start + 100)])
    t1 = time.perf_counter()
    cursor, peeked = 0, 0
    while True:
        got = ob.peek(100, after_id=cursor)
        if not got:
            break
        cursor = got[-1].id
        peeked += len(got)
    t2 = time.perf_counter()
    for start in range(0, len(ids), 100):
        ob.ack_many(ids[start:start + 100])
    t3 = time.perf_counter()
    out["put_many100_rows_per_s"] = len(ids) / (t1 - t0)
    out["peek100_rows_per_s"] = peeked / (t2 - t1)
    out["ack_many100_rows_per_s"] = len(ids) / (t3 - t2)
    ob.close()
    return out


class _Sub:
    def __init__(self, port: int, topic: str):
        self.recv = {}
        self.cond = threading.Condition()
        self.ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *a: self.ready.set()
        c.on_message = self._msg
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.c = c

    def _msg(self, client, userdata, msg):
        now = time.time()
        d = json.loads(msg.payload)
        with self.cond:
            self.recv.setdefault(d["seq"], now - d["t"])
            self.cond.notify_all()

    def wait_n(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.recv) >= n, timeout)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def bench_delivery(port: int, rows: int, workdir: Path, rate: float, max_inflight: int, max_rate: float = 0.0) -> dict:
    topic = "edged/bench/events"
    ob = Outbox(workdir / "deliver.sqlite", max_rows=10 * rows, max_bytes=1 << 30)
    sub = _Sub(port, topic)
    assert sub.ready.wait(10)
    cfg = MqttConfig(host="127.0.0.1", port=port, max_inflight=max_inflight, max_rate=max_rate,
                     reconnect_min_s=0.1, reconnect_max_s=1)
    # drain: a backlog (as after an outage) already queued when the publisher starts
    for start in range(0, rows, 500):
        ob.put_many([(topic, _payload(-1 - i), 1, False, "event", None) for i in range(start, min(rows, start + 500))])
    pub = MqttPublisher(cfg, device_id="bench", outbox=ob)
    t0 = time.perf_counter()
    pub.start()
    ok = sub.wait_n(rows, 120)
    t1 = time.perf_counter()
    out = {"max_inflight": max_inflight, "window": pub._window, "max_rate": max_rate,
           "drain_rows": rows, "drain_all_received": ok, "drain_msgs_per_s": rows / (t1 - t0)}
    with sub.cond:
        sub.recv.clear()
    # burst: rows put as fast as possible while the publisher runs
    t0 = time.perf_counter()
    for i in range(rows):
        ob.put(topic, _payload(i), qos=1)
    t_put = time.perf_counter()
    ok = sub.wait_n(rows, 120)
    t1 = time.perf_counter()
    out["burst_rows"] = rows
    out["burst_all_received"] = ok
    out["burst_msgs_per_s"] = rows / (t1 - t0)
    out["burst_put_s"] = t_put - t0
    # paced latency
    with sub.cond:
        sub.recv.clear()
    n = int(rate * 10)
    period = 1.0 / rate
    start = time.perf_counter()
    for i in range(n):
        target = start + i * period
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ob.put(topic, _payload(rows + i), qos=1)
    sub.wait_n(n, 30)
    lat = sorted(v * 1e3 for v in sub.recv.values())
    out["paced_rate_per_s"] = rate
    out["paced_received"] = len(lat)
    out["latency_ms_p50"] = statistics.median(lat)
    out["latency_ms_p95"] = lat[int(0.95 * (len(lat) - 1))]
    out["latency_ms_max"] = lat[-1]
    pub.stop(timeout=5)
    sub.close()
    ob.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--port", type=int, default=None, help="use a running broker instead of a private one")
    ap.add_argument("--rate", type=float, default=100.0, help="paced rows per second for the latency run")
    ap.add_argument("--max-inflight", type=int, default=20)
    ap.add_argument("--max-rate", type=float, default=0.0, help="mqtt.max_rate for the delivery run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edged-bench-"))
    proc = None
    try:
        res = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "python": platform.python_version(), "cpus": os.cpu_count()}
        res["outbox"] = bench_outbox(args.rows, workdir)
        port = args.port
        if port is None:
            proc, port = _start_mosquitto(workdir)
        res["delivery"] = bench_delivery(port, args.rows, workdir, args.rate, args.max_inflight,
                                         args.max_rate)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"machine: {res['machine']}, python {res['python']}, {res['cpus']} cpus")
        for section in ("outbox", "delivery"):
            for k, v in res[section].items():
                print(f"{section}.{k}: {v:.1f}" if isinstance(v, float) else f"{section}.{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
