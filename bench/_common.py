"""Shared by the benchmarks: a throwaway mosquitto on a free loopback port, and result output."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional, Tuple


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(workdir: Path) -> Tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # max_queued_messages 0: the default (1000 per subscriber) drops messages when a subscriber lags
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
    # mosquitto started as root drops to user 'mosquitto': it must be able to read its config.
    os.chmod(workdir, 0o755)
    os.chmod(conf, 0o644)
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def report(text: str, out: Optional[str]) -> None:
    """Print a markdown result block and, when asked, append it to a docs file."""
    print(text)
    if out:
        with open(out, "a") as fh:
            fh.write(text)
