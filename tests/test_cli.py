"""The `edged` command line itself: closed pipes, `edged config` and its help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from edged.cli import EXIT_BROKEN_PIPE

EXAMPLE = ROOT / "config" / "edged.yaml"


def _edged(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edged", *args], text=True, cwd=ROOT, timeout=120, **kw)


@pytest.mark.parametrize("args, code", [
    (("models", "info", str(ROOT / "edged" / "models" / "yolov3-tiny-416-int8.tflite")), EXIT_BROKEN_PIPE),
    (("config", "--config", str(EXAMPLE)), EXIT_BROKEN_PIPE),
    # argparse's own output (--version, --help) ignores write errors itself: a plain exit 0.
    (("--version",), 0),
    (("config", "--help"), 0),
], ids=["models-info", "config", "version", "help"])
def test_closed_pipe_ends_quietly(args, code):
    """`edged models info x | head` when head has gone: no BrokenPipeError traceback, exit 141 (what a
    shell reports for a program killed by SIGPIPE).

    A real pipe whose read end is closed before edged writes: every write fails with EPIPE, as the
    writes after `head` exits do."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = _edged(*args, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.returncode == code
    assert EXIT_BROKEN_PIPE == 141


def test_pipe_read_in_part_then_closed():
    """`edged config | head -n 1` as a shell runs it: the first line (which layers made the config)
    arrives, nothing else is said."""
    r = subprocess.run(
        f"{sys.executable} -m edged config --config {EXAMPLE} | head -n 1",
        shell=True, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert r.returncode == 0
    assert r.stdout == "# defaults + file\n"
    assert r.stderr == ""


def test_config_overlay_help_says_it_wants_a_file():
    r = _edged("config", "--help", capture_output=True)
    assert r.returncode == 0
    assert "--overlay FILE" in r.stdout
    assert "YAML or JSON file" in " ".join(r.stdout.split())


def test_config_show_and_overlay_file(tmp_path: Path):
    overlay = tmp_path / "overlay.json"
    overlay.write_text('{"tracker": {"max_age": 12}, "mqtt": {"password": "s3cret"}}')
    plain = _edged("config", "--config", str(EXAMPLE), "--overlay", str(overlay), capture_output=True)
    show = _edged("config", "show", "--config", str(EXAMPLE), "--overlay", str(overlay), capture_output=True)
    before = _edged("config", "--config", str(EXAMPLE), "--overlay", str(overlay), "show", capture_output=True)
    assert plain.returncode == show.returncode == before.returncode == 0, plain.stderr + show.stderr
    assert plain.stdout == show.stdout == before.stdout
    effective = yaml.safe_load(show.stdout)
    assert effective["tracker"]["max_age"] == 12 and effective["mqtt"]["password"] == "***"
    assert "s3cret" not in show.stdout


def test_config_overlay_that_is_not_a_file(tmp_path: Path):
    r = _edged("config", "--overlay", str(tmp_path / "absent.yaml"), capture_output=True)
    assert r.returncode == 1
    assert f"{tmp_path / 'absent.yaml'}" in r.stderr and "--overlay: cannot read the file" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracker:\n  max_agee: 3\n")
    r = _edged("config", "--overlay", str(bad), capture_output=True)
    assert r.returncode == 1 and "tracker.max_agee: unknown key; did you mean 'max_age'?" in r.stderr
