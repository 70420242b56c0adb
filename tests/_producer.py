"""A tiny real producer process for the crash tests: Outbox + MqttPublisher, nothing mocked.

    python tests/_producer.py --db FILE --port N [--count N] [--stdin] [--start-seq S]
                              [--interval S] [--password-file F]

Prints `put <seq>` (flushed) only after Outbox.put() returned, so the test knows exactly which
messages the outbox promised to deliver; `status <event>` for publisher status changes.
SIGTERM/SIGINT -> MqttPublisher.stop() (offline published) and exit 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edged.config import MqttConfig  # noqa: E402
from edged.mqtt.client import MqttPublisher  # noqa: E402
from edged.mqtt.outbox import Outbox  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="dev1")
    ap.add_argument("--username", default=None)
    ap.add_argument("--password-file", default=None)
    ap.add_argument("--count", type=int, default=0, help="messages to put (without --stdin)")
    ap.add_argument("--start-seq", type=int, default=0)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--stdin", action="store_true", help="read 'put N' commands from stdin")
    args = ap.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    cfg = MqttConfig(host="127.0.0.1", port=args.port, username=args.username, password_file=args.password_file,
                     reconnect_min_s=0.05, reconnect_max_s=0.3, keepalive=10)
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    outbox = Outbox(args.db)
    pub = MqttPublisher(cfg, device_id=args.device, outbox=outbox, password=password,
                        on_status=lambda ev, info: say(f"status {ev}"))
    pub.start()
    say("started")
    seq = args.start_seq

    def produce(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            if stop.is_set():
                return
            body = json.dumps({"seq": seq, "event_id": f"{args.device}-{seq}"}).encode()
            outbox.put(pub.topics.events, body, qos=1, kind="event")
            say(f"put {seq}")
            seq += 1
            stop.wait(args.interval)
        say("produced")

    if args.stdin:  # commands: "put N" puts N more messages; EOF stops

        def commands() -> None:
            for line in sys.stdin:
                if line.startswith("put "):
                    produce(int(line.split()[1]))
            stop.set()

        # a thread, so that SIGTERM (handled in the main thread) is not stuck behind a blocking read
        threading.Thread(target=commands, daemon=True).start()
    else:
        produce(args.count)
    stop.wait()
    pub.stop(timeout=5)
    outbox.close()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
