"""A fleet on one machine: `edged replay` devices (real daemons on recorded MOT15 detections) in per-site
network namespaces, publishing through an edge mosquitto bridge or directly to a 3-node NATS cluster
(JetStream R3, MQTT listener), read by examples/fleet_consumer.py; with an optional fault. Needs root
(ip netns), nats-server and mosquitto. See docs/fleet.md.

    python bench/bench_fleet.py --devices 50 --sites 5 --fault link-cut
    python bench/bench_fleet.py --matrix --out docs/fleet.md      # 10/50/200 devices x (none, node-kill, link-cut)
    python bench/bench_fleet.py --cleanup                         # remove namespaces left by a killed run
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet.netns import remove_leftovers  # noqa: E402
from fleet.run import FAULTS, FleetSpec, run_fleet  # noqa: E402

MATRIX = [(10, 2), (50, 5), (200, 10)]


def row(r) -> str:
    s = r.spec
    return (f"| {r.devices} | {r.sites} ({r.bridged_sites} bridged) | {s['fps']:g} | {s['fault']} | {r.window_s:.0f} | "
            f"{r.sent} | {r.received} | **{r.lost}** | {r.duplicates} | {r.latency_p50_s:.2f} / {r.latency_p95_s:.2f} | "
            f"{r.broker_cpu_pct:.1f} | {r.devices_cpu_pct:.0f} | {r.device_private_mb_mean:.0f} | "
            f"{'yes' if r.counts_equal else 'NO'} |")


HEADER = ("| devices | sites | fps | fault | window s | events sent | received | lost | duplicates | "
          "latency p50 / p95 s | broker CPU % | devices CPU % | MB private / device | counts = states |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=150.0, help="measurement window, seconds")
    ap.add_argument("--fault", choices=FAULTS, default="none")
    ap.add_argument("--matrix", action="store_true", help="every size with every fault")
    ap.add_argument("--sizes", default=None, help="with --matrix: e.g. 10:2,50:5 (devices:sites)")
    ap.add_argument("--json", help="append each result as a JSON line to this file")
    ap.add_argument("--out", help="append the results table (markdown) to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, event files)")
    ap.add_argument("--cleanup", action="store_true", help="remove namespaces left by an interrupted run, then exit")
    args = ap.parse_args()
    if args.cleanup:
        print("removed:", remove_leftovers() or "nothing")
        return 0
    # SIGTERM ends a run like Ctrl-C: its finally stops every process and removes the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sizes = MATRIX
    if args.sizes:
        sizes = [tuple(int(x) for x in part.split(":")) for part in args.sizes.split(",")]
    runs = ([FleetSpec(devices=d, sites=s, fps=args.fps, duration_s=args.duration, fault=f, keep_workdir=args.keep)
             for d, s in sizes for f in FAULTS] if args.matrix else
            [FleetSpec(devices=args.devices, sites=args.sites, fps=args.fps, duration_s=args.duration, fault=args.fault,
                       keep_workdir=args.keep)])
    results = []
    for spec in runs:
        r = run_fleet(spec, log=lambda t: print(t, flush=True))
        results.append(r)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(asdict(r)) + "\n")
        print(HEADER + "\n" + row(r), flush=True)
    table = HEADER + "\n" + "\n".join(row(r) for r in results) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + table)
    return 0 if all(r.lost == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
