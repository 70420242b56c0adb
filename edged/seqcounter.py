"""Persistent, monotonic per-device event sequence numbers.

Blocks of numbers are reserved on disk (fsync'd) and handed out from memory, so an event costs no I/O
and a crash can only leave a gap, never a repeat.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class SequenceCounter:
    def __init__(self, path: Path, block: int = 1000):
        self._path = Path(path)
        self._block = block
        self._lock = threading.Lock()
        self._next = self._read_reserved()
        self._limit = self._next  # nothing reserved in this process yet

    def _read_reserved(self) -> int:
        try:
            return int(self._path.read_text().strip() or 1)
        except FileNotFoundError:
            return 1
        except ValueError:
            raise ValueError(f"{self._path}: corrupt sequence file (expected an integer)") from None

    def _reserve(self, upto: int) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(str(upto))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)
        self._limit = upto

    def __call__(self) -> int:
        with self._lock:
            if self._next >= self._limit:
                self._reserve(self._next + self._block)
            value = self._next
            self._next += 1
            return value


class IdReservation:
    """Track ids that stay unique across restarts: a block of ids is reserved on disk at start (and
    extended while running); a clean stop records the exact next id, so only a crash leaves a gap."""

    def __init__(self, path: Path, block: int = 100_000):
        self._counter = SequenceCounter(path, block)
        self.first = self._counter._next

    def _write(self, value: int) -> None:
        self._counter._reserve(value)

    def start(self) -> int:
        self._write(self.first + self._counter._block)
        return self.first

    def ensure(self, next_id: int) -> None:
        """Extend the reservation before the tracker can hand out ids beyond it."""
        if next_id > self._counter._limit - self._counter._block // 2:
            self._write(next_id + self._counter._block)

    def close(self, next_id: int) -> None:
        self._write(next_id)
