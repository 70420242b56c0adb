"""Numbers that stay unique across restarts and crashes: event sequence numbers and track ids.

Both reserve a block of numbers on disk (fsync'd) and hand them out from memory, so a number costs no
I/O and a crash can only leave a gap, never a repeat. The files are written 0600 (edged.statefiles).
"""

from __future__ import annotations

import threading
from pathlib import Path

from edged.statefiles import ensure_private_dir, write_private_atomic


def _read_reserved(path: Path) -> int:
    """The first number not yet handed out by an earlier run (1 when there was none)."""
    try:
        return int(path.read_text().strip() or 1)
    except FileNotFoundError:
        return 1
    except ValueError:
        raise ValueError(f"{path}: corrupt sequence file (expected an integer)") from None


def _write_reserved(path: Path, value: int) -> None:
    """Atomically and durably record `value`: after a power cut the previous reservation must not come
    back, or numbers already handed out would be handed out again."""
    if not path.parent.is_dir():
        ensure_private_dir(path.parent)
    write_private_atomic(path, str(value).encode())


class SequenceCounter:
    """Per-device event sequence numbers: `counter()` -> 1, 2, 3 ... strictly increasing forever."""

    def __init__(self, path: Path, block: int = 1000):
        self._path = Path(path)
        self._block = block
        self._lock = threading.Lock()
        self._next = _read_reserved(self._path)
        self._limit = self._next  # nothing reserved in this process yet

    def __call__(self) -> int:
        with self._lock:
            if self._next >= self._limit:
                self._limit = self._next + self._block
                _write_reserved(self._path, self._limit)
            value = self._next
            self._next += 1
            return value


class IdReservation:
    """Track ids that stay unique across restarts: a block of ids is reserved on disk at start (and
    extended while running); a clean stop records the exact next id, so only a crash leaves a gap."""

    def __init__(self, path: Path, block: int = 100_000):
        self._path = Path(path)
        self._block = block
        self.first = _read_reserved(self._path)
        self._limit = self.first

    def _reserve(self, value: int) -> None:
        _write_reserved(self._path, value)
        self._limit = value

    def start(self) -> int:
        self._reserve(self.first + self._block)
        return self.first

    def ensure(self, next_id: int) -> None:
        """Extend the reservation before the tracker can hand out ids beyond it."""
        if next_id > self._limit - self._block // 2:
            self._reserve(next_id + self._block)

    def close(self, next_id: int) -> None:
        self._reserve(next_id)
