"""State files are private whatever the umask: state dir 0700; outbox (+ -wal/-shm) and reservations 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edged.mqtt.outbox import Outbox
from edged.seqcounter import IdReservation, SequenceCounter
from edged.statefiles import ensure_private_dir


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def open_umask():
    """The most permissive umask a service could be started with (umask is per process: restored after)."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_outbox_files_are_0600(tmp_path, open_umask):
    path = tmp_path / "outbox.sqlite3"
    o = Outbox(path)
    o.put_many([("t", b"x" * 100, 1, False, "event", None)] * 10)
    files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
    assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    o.close()
    # SQLite deletes -wal/-shm on the last close and creates them again on the next open.
    with Outbox(path) as again:
        again.put("t", b"y")
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}


def test_outbox_of_an_older_version_is_tightened(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as o:
        o.put("t", b"x")
        sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
        for f in [path, *sidecars]:
            os.chmod(f, 0o644)
    with Outbox(path) as o:
        assert o.depth() == 1
        assert [_mode(f) for f in [path, *sidecars]] == [0o600] * 3


def test_outbox_creates_its_missing_directory_0700(tmp_path, open_umask):
    with Outbox(tmp_path / "state" / "outbox.sqlite3"):
        pass
    assert _mode(tmp_path / "state") == 0o700


def test_sequence_and_track_id_files_are_0600(tmp_path, open_umask):
    seq = SequenceCounter(tmp_path / "sequence", block=3)
    assert [seq() for _ in range(7)] == [1, 2, 3, 4, 5, 6, 7]  # several reservations written
    ids = IdReservation(tmp_path / "track_ids", block=10)
    assert ids.start() == 1
    ids.ensure(9)
    ids.close(12)
    assert _mode(tmp_path / "sequence") == 0o600 and _mode(tmp_path / "track_ids") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sequence", "track_ids"]  # no .tmp left
    assert SequenceCounter(tmp_path / "sequence")() == 10 and IdReservation(tmp_path / "track_ids").start() == 12


def test_reservation_file_of_an_older_version_is_tightened(tmp_path):
    (tmp_path / "sequence").write_text("41")
    os.chmod(tmp_path / "sequence", 0o644)
    assert SequenceCounter(tmp_path / "sequence")() == 41
    assert _mode(tmp_path / "sequence") == 0o600


def test_ensure_private_dir(tmp_path, open_umask):
    parent = tmp_path / "var" / "lib"
    parent.mkdir(parents=True, mode=0o755)
    state = ensure_private_dir(parent / "edged")
    assert state == parent / "edged" and _mode(state) == 0o700
    assert _mode(parent) == 0o755  # system directories above it are left alone
    os.chmod(state, 0o755)  # made by hand, or by an older version
    ensure_private_dir(state)
    assert _mode(state) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        ensure_private_dir(tmp_path / "file")
    with pytest.raises(OSError, match="cannot create state directory"):
        ensure_private_dir(tmp_path / "file" / "state")
