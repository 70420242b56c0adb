"""The prerequisite helpers of conftest.py: a missing ../shared path, module, program or mosquitto
skips on a developer's machine and FAILS under CI (env CI set), so CI cannot pass by skipping.

Each case runs pytest for real, in a subprocess, on a tiny test file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

CASES = {
    "shared_path": 'shared_path("no-such-folder", "clip.mp4")',
    "need_module": 'need_module("edged_no_such_module")',
    "need_program": 'need_program("edged-no-such-program")',
    "missing_mosquitto": 'setattr(conftest, "MOSQUITTO", None); Broker(workdir=Path("."), port=free_port()).start()',
    "module_level": None,  # need_module at import time, as test_convert.py does with tensorflow
}


def _run_pytest(tmp_path: Path, case: str, ci: str) -> subprocess.CompletedProcess:
    call = CASES[case]
    header = ("from pathlib import Path\nimport conftest\n"
              "from conftest import Broker, free_port, need_module, need_program, shared_path\n")
    if call is None:
        body = header + 'need_module("edged_no_such_module")\n\ndef test_prerequisite():\n    pass\n'
    else:
        body = header + f"\ndef test_prerequisite():\n    {call}\n"
    test_file = tmp_path / f"test_{case}.py"
    test_file.write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT / "tests") + os.pathsep + str(ROOT)  # conftest importable as a module
    if ci:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test_file)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_missing_prerequisite_fails_under_ci(tmp_path, case):
    r = _run_pytest(tmp_path, case, ci="true")
    expected = 2 if CASES[case] is None else 1  # 2: pytest's exit code for a collection error
    assert r.returncode == expected, r.stdout[-2000:]
    assert "CI is set: a missing prerequisite fails instead of skipping" in r.stdout
    assert "skipped" not in r.stdout.splitlines()[-1]


@pytest.mark.parametrize("case", ["shared_path", "module_level"])
def test_missing_prerequisite_skips_locally(tmp_path, case):
    r = _run_pytest(tmp_path, case, ci="")
    expected = 5 if CASES[case] is None else 0  # 5: pytest's "no test ran" (the module was skipped)
    assert r.returncode == expected, r.stdout[-2000:]
    assert r.stdout.splitlines()[-1].startswith("1 skipped")


def test_ci_values_that_mean_not_ci(tmp_path):
    r = _run_pytest(tmp_path, "need_module", ci="false")
    assert r.returncode == 0 and r.stdout.splitlines()[-1].startswith("1 skipped"), r.stdout[-2000:]
