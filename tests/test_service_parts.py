"""Service plumbing that needs no models: sd_notify over a real datagram socket, the systemd unit,
persistent sequence numbers."""

from __future__ import annotations

import socket
import subprocess

import pytest

from edged import exitcodes

from conftest import need_program
from edged.install import render_unit
from edged.sdnotify import Notifier, watchdog_interval_s
from edged.seqcounter import SequenceCounter


def test_sd_notify_sends_datagrams_to_notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        n = Notifier()
        assert n.enabled
        assert n.ready("running")
        assert server.recv(4096) == b"READY=1\nSTATUS=running"
        assert n.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
        n.close()
    finally:
        server.close()


def test_sd_notify_abstract_socket(monkeypatch):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0edged-test-notify")
    server.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@edged-test-notify")
        assert Notifier().stopping()
        assert server.recv(4096) == b"STOPPING=1"
    finally:
        server.close()


def test_sd_notify_is_a_noop_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and n.ready() is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval_s() is None  # meant for another process


def test_systemd_unit_verifies(tmp_path):
    need_program("systemd-analyze")
    unit = tmp_path / "edged.service"
    unit.write_text(render_unit("/bin/true"))
    assert "Type=notify" in unit.read_text() and "StateDirectory=edged" in unit.read_text()
    r = subprocess.run(["systemd-analyze", "verify", "--recursive-errors=no", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "edged.service:" not in r.stderr, r.stderr  # no warnings about our own unit


def test_sequence_is_monotonic_across_restarts_and_crashes(tmp_path):
    path = tmp_path / "sequence"
    a = SequenceCounter(path, block=10)
    first = [a() for _ in range(25)]
    assert first == list(range(1, 26))
    # A new process (after a crash: nothing flushed on exit) never repeats a number.
    b = SequenceCounter(path, block=10)
    nxt = b()
    assert nxt > first[-1]


def test_sequence_file_corrupt_is_named(tmp_path):
    path = tmp_path / "sequence"
    path.write_text("garbage")
    with pytest.raises(ValueError, match="sequence"):
        SequenceCounter(path)


def _log_once(env_extra: dict, stderr_path, hide_systemd_python: bool = False) -> str:
    import os
    import sys

    code = ("import logging; from edged.logs import setup_logging; setup_logging('info', 'auto');"
            "logging.getLogger('edged.test').warning('camera lost')")
    if hide_systemd_python:
        code = "import sys; sys.modules['systemd'] = None; " + code  # makes `import systemd...` fail
    with open(stderr_path, "w") as fh:
        st = os.fstat(fh.fileno())
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        env.update({k: v.format(dev=st.st_dev, ino=st.st_ino) for k, v in env_extra.items()})
        subprocess.run([sys.executable, "-c", code], stderr=fh, env=env, check=True)
    return stderr_path.read_text()


def test_logs_use_journald_priorities_under_systemd(tmp_path):
    # systemd sets JOURNAL_STREAM to the device:inode of the stderr it connected to the journal.
    # Without systemd-python (hidden here when installed: it sends records to journald, not stderr)
    # the lines carry sd-daemon priority prefixes.
    text = _log_once({"JOURNAL_STREAM": "{dev}:{ino}"}, tmp_path / "journal.txt", hide_systemd_python=True)
    assert text == "<4>edged.test: camera lost\n"


def test_logs_are_plain_lines_on_a_terminal(tmp_path):
    text = _log_once({}, tmp_path / "plain.txt")
    assert "WARNING" in text and "edged.test: camera lost" in text and not text.startswith("<")


def test_track_ids_unique_across_restarts(tmp_path):
    from edged.seqcounter import IdReservation

    path = tmp_path / "track_ids"
    first = IdReservation(path, block=100)
    assert first.start() == 1
    first.ensure(80)  # past half the block: the reservation grows before ids can run out
    # Crash: no close(). The next run starts beyond anything the first could have handed out.
    second = IdReservation(path, block=100)
    start2 = second.start()
    assert start2 >= 180
    second.close(start2 + 5)  # clean stop: exact, no gap
    assert IdReservation(path, block=100).start() == start2 + 5


def test_run_with_a_broken_model_names_the_file(tmp_path):
    import sys

    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"\x00" * 5)
    cfg = tmp_path / "edged.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ndetector:\n  model: {broken}\nmqtt:\n  enabled: false\nweb:\n  enabled: false\n")
    r = subprocess.run([sys.executable, "-m", "edged", "run", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == exitcodes.CONFIG  # 78: systemd does not restart-loop on it
    assert str(broken) in r.stderr and "detector.model" in r.stderr and "Traceback" not in r.stderr


def test_run_with_an_unknown_source_kind_is_a_config_error(tmp_path):
    import sys

    cfg = tmp_path / "edged.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nmqtt:\n  enabled: false\nweb:\n  enabled: false\n")
    r = subprocess.run([sys.executable, "-m", "edged", "run", "--config", str(cfg), "--source", "ftp://cam/x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == exitcodes.CONFIG
    assert "capture.source" in r.stderr and "ftp" in r.stderr and "Traceback" not in r.stderr
