"""bench/arm64_equivalence.py, the arm64 check's comparison tool, on x86: a dump of the detector and
encoder on the MOT17-mini frames, compared with itself, holds every bound. The check itself runs only in
CI's emulated root; this keeps the tool in step with the code it calls."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, shared_path

TOOL = ROOT / "bench" / "arm64_equivalence.py"


def test_dump_and_compare_on_x86(tmp_path):
    shared = shared_path("data").parent
    out = tmp_path / "x86"
    dump = subprocess.run([sys.executable, str(TOOL), "dump", "--shared", str(shared), "--out", str(out),
                           "--no-video", "--no-track"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert dump.returncode == 0, dump.stderr[-3000:]
    data = json.loads((out / "dump.json").read_text())
    frames = data["mot17"]
    assert len(frames) == 7 and sum(len(f["boxes"]) for f in frames.values()) > 0
    assert all(len(f["raw"]) == 16 and f["embeddings"] for f in frames.values())  # hashes of head tensors, embeddings
    same = subprocess.run([sys.executable, str(TOOL), "compare", str(out), str(out), "--check"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert same.returncode == 0 and "every bound holds" in same.stdout, same.stdout[-3000:] + same.stderr[-3000:]
