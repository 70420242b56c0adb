"""What `pip install` of the built wheel gives a user, in a fresh venv outside the source tree: the
models, the unit template and the example config ship inside; `edged run` works with the defaults;
`edged install-service --dry-run` names the venv's launcher; OpenCV is whatever a plain install
resolves to; `edged eval` names the extra it needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edged import __version__
from edged.tracking.evaluate import MISSING_EXTRA
from tests.conftest import ROOT, missing

SUDO_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                ".hypothesis", "state", "out")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 1200)
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    return out


def fresh_python() -> str:
    """Debian's own interpreter when it can make venvs (what a Raspberry Pi user has), else ours."""
    system = Path("/usr/bin/python3")
    if system.exists() and run([system, "-c", "import sys, venv, ensurepip; assert sys.version_info >= (3, 10)"]).returncode == 0:
        return str(system)
    return sys.executable


def test_dev_extra_does_not_pin_opencv_below_what_users_get():
    """Tests must run on the OpenCV a plain install gets (the Darknet oracle has its own venv)."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    opencv = [r for r in requirements if r.startswith("opencv")]
    assert opencv == ["opencv-python-headless>=4.8"], opencv  # one requirement, no upper bound anywhere


def test_eval_without_motmetrics_names_the_extra():
    """Blocks motmetrics through sys.modules (Python's own way to make an import fail)."""
    code = ("import sys; sys.modules['motmetrics'] = None\n"
            "from edged.cli import main; sys.exit(main(['eval', '--gt', 'gt.txt', '--result', 'res.txt']))")
    out = run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert out.returncode == 1
    assert "pip install 'edged[eval]'" in out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source tree (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src") / "edged"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    dist = tmp_path_factory.mktemp("dist")
    out = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", src, "-w", dist], cwd=src)
    assert out.returncode == 0, out.stdout + out.stderr
    wheels = list(dist.glob("edged-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with `pip install <wheel>[demo]`; dependencies from the
    package index (pip's own cache keeps repeated runs quick)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    out = run([fresh_python(), "-m", "venv", venv])
    assert out.returncode == 0, out.stderr
    out = run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{wheel}[demo]"])
    if out.returncode != 0:
        missing(f"pip install {wheel.name}[demo] failed (package index reachable?):\n{out.stderr[-3000:]}")
    return venv


@pytest.mark.slow
def test_wheel_ships_models_unit_config_and_licences(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("edged/models/yolov3-tiny-416-int8.tflite", "edged/models/encoder.tflite",
                 "edged/data/edged.service", "edged/data/edged.yaml", "edged/mqtt/schemas/event.schema.json"):
        assert path in names, path
    dist_info = f"edged-{__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names and f"{dist_info}/licenses/NOTICE" in names
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta and "Provides-Extra: eval" in meta
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert z.read("edged/models/encoder.tflite") == (ROOT / "edged" / "models" / "encoder.tflite").read_bytes()


@pytest.mark.slow
def test_edged_run_from_the_wheel_with_default_models(venv, tmp_path):
    """In a directory that is not the source tree: the default config's relative model paths resolve to
    the installed package, and the demo scene gives enter events."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([venv / "bin" / "python", "-c",
                 "from edged.config import DetectorConfig, EncoderConfig, resolve_path\n"
                 "print(resolve_path(DetectorConfig().model)); print(resolve_path(EncoderConfig().model))"], cwd=work)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_file() and Path(line).is_relative_to(venv), line
    out = run([venv / "bin" / "edged", "run", "--source", "demo", "--no-mqtt", "--max-frames", "80", "--print-events",
               "--set", "web.enabled=false", "--state-dir", tmp_path / "state"], cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"type": "enter"' in out.stdout or '"type":"enter"' in out.stdout, out.stdout[-2000:]


@pytest.mark.slow
def test_install_service_dry_run_from_the_wheel_names_the_venv_launcher(venv, tmp_path):
    """As the README says to run it: the launcher's absolute path, under sudo's PATH."""
    launcher = venv / "bin" / "edged"
    out = run([launcher, "install-service", "--dry-run", "--source", "/dev/video0"], cwd=tmp_path,
              env=dict(os.environ, PATH=SUDO_PATH))
    assert out.returncode == 0, out.stderr
    assert f"launcher: {launcher}" in out.stdout
    assert f"ExecStart={launcher} run --config /etc/edged/edged.yaml" in out.stdout
    assert "write /etc/edged/edged.yaml (mode 0640" in out.stdout and "capture.source: /dev/video0" in out.stdout


@pytest.mark.slow
def test_opencv_is_what_a_plain_install_resolves_to(venv):
    """No pin holds OpenCV back: the venv has the version pip picks for the bare requirement."""
    py = venv / "bin" / "python"
    got = run([py, "-c", "import cv2; print(cv2.__version__)"])
    assert got.returncode == 0, got.stderr
    report = run([py, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
                  "--report", "-", "opencv-python-headless"])
    assert report.returncode == 0, report.stderr
    picked = json.loads(report.stdout)["install"][0]["metadata"]["version"]
    assert picked.startswith(got.stdout.strip() + "."), (picked, got.stdout)


@pytest.mark.slow
def test_eval_in_the_wheel_venv_names_the_extra(venv, tmp_path):
    py = venv / "bin" / "python"
    assert run([py, "-c", "import motmetrics"]).returncode != 0, "the plain install must not carry motmetrics"
    out = run([venv / "bin" / "edged", "eval", "--gt", tmp_path / "gt.txt", "--result", tmp_path / "res.txt"], cwd=tmp_path)
    assert out.returncode == 1
    assert MISSING_EXTRA in out.stderr
