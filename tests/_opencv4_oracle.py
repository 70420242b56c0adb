"""OpenCV 4's Darknet importer, the converter tests' float parity oracle, in a cached venv of its own.

edged's tests run on the OpenCV a plain `pip install` gets (OpenCV 5, which dropped
`cv2.dnn.readNetFromDarknet`). The oracle is an independent implementation of Darknet's layers that the
converter must match, so it stays: in a venv with `opencv-python-headless<5` built once into
~/.cache/edged-test/opencv4-venv (EDGED_OPENCV4_VENV overrides), driven through
this same file run as a script in that venv (`worker_main`: only numpy and cv2 imported there). When
the venv cannot be built (no package index), tests skip with the
reason, and fail when CI is set.

    with opencv4_darknet(cfg, weights) as net:
        net.setInput(blob)                  # NCHW float32, like cv2.dnn.Net
        outs = net.forward(["conv_15", "conv_22"])   # or net.forward(net.getUnconnectedOutLayersNames())
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

WORKER = Path(__file__).resolve()
REQUIREMENTS = ["opencv-python-headless>=4.8,<5", "numpy"]
READY_STAMP = ".edged-oracle-ready"


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "edged-test" / "opencv4-venv"
    return Path(os.environ.get("EDGED_OPENCV4_VENV", default))


def _unavailable(reason: str) -> None:
    from tests.conftest import missing  # not in the oracle venv, where this file runs as the worker

    missing(f"the OpenCV 4 Darknet oracle is unavailable: {reason}")


def oracle_python() -> Path:
    """The oracle venv's interpreter, building the venv on first use (under a lock: test runs of
    several checkouts may share the cache)."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    stamp = venv / READY_STAMP
    if stamp.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return python
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS]]
        for cmd in steps:
            try:
                env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            except subprocess.TimeoutExpired:
                _unavailable(f"{' '.join(cmd)} timed out")
            if done.returncode != 0:
                _unavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        stamp.write_text(" ".join(REQUIREMENTS) + "\n")
    return python


class DarknetOracle:
    """A cv2.dnn.Net-like proxy of OpenCV 4's Darknet net running in the oracle venv."""

    def __init__(self, cfg: Path, weights: Path):
        # stderr to a file: OpenCV's warnings must never fill a pipe nobody reads.
        self._stderr = tempfile.TemporaryFile()
        # -I: the oracle venv alone, whatever PYTHONPATH the test run has (it may put OpenCV 5 first).
        self.proc = subprocess.Popen([str(oracle_python()), "-I", str(WORKER), str(cfg), str(weights)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        hello = self._line()
        self.opencv_version: str = hello["ready"]
        assert self.opencv_version.startswith("4."), self.opencv_version
        self._blob: Optional[np.ndarray] = None

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace")
            raise RuntimeError(f"the OpenCV 4 oracle process ended: {err.strip()[-2000:]}")
        return json.loads(line)

    def setInput(self, blob: np.ndarray) -> None:  # noqa: N802  (cv2.dnn.Net's name)
        self._blob = np.ascontiguousarray(blob, np.float32)

    def getUnconnectedOutLayersNames(self) -> List[str]:  # noqa: N802
        self.proc.stdin.write(b'{"names": true}\n')
        self.proc.stdin.flush()
        return self._line()["names"]

    def forward(self, outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        assert self._blob is not None, "setInput first"
        self.proc.stdin.write((json.dumps({"outputs": list(outputs) if outputs else None}) + "\n").encode())
        write_array(self.proc.stdin, self._blob)
        self.proc.stdin.flush()
        answer = self._line()
        if "error" in answer:
            raise RuntimeError(f"OpenCV 4: {answer['error']}")
        return [read_array(self.proc.stdout) for _ in range(answer["n"])]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> "DarknetOracle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def opencv4_darknet(cfg: Path, weights: Path) -> DarknetOracle:
    return DarknetOracle(cfg, weights)


# ---------------------------------------------------------------------------------------------- the wire
# A request is one JSON line {"outputs": [names] | null} followed by one array (the NCHW input blob); the
# answer is one JSON line {"n": count} or {"error": text} followed by `count` arrays. An array is a JSON
# line {"dtype", "shape"} and its raw bytes. {"names": true} answers {"names": [unconnected outputs]}.
def read_array(stream) -> np.ndarray:
    head = json.loads(stream.readline())
    dtype, shape = np.dtype(head["dtype"]), tuple(head["shape"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data = stream.read(nbytes)
    if len(data) != nbytes:
        raise EOFError(f"array cut short: {len(data)} of {nbytes} bytes")
    return np.frombuffer(data, dtype).reshape(shape)


def write_array(stream, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    stream.write((json.dumps({"dtype": a.dtype.str, "shape": list(a.shape)}) + "\n").encode())
    stream.write(a.tobytes())


def worker_main(argv: List[str]) -> int:
    """In the oracle venv: OpenCV 4's Darknet net for CFG WEIGHTS, serving requests on stdin/stdout."""
    import cv2

    net = cv2.dnn.readNetFromDarknet(argv[0], argv[1])
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write((json.dumps({"ready": cv2.__version__}) + "\n").encode())
    stdout.flush()
    while True:
        line = stdin.readline()
        if not line:
            return 0
        request = json.loads(line)
        if request.get("names"):
            stdout.write((json.dumps({"names": list(net.getUnconnectedOutLayersNames())}) + "\n").encode())
            stdout.flush()
            continue
        blob = read_array(stdin)
        try:
            net.setInput(np.ascontiguousarray(blob, np.float32))
            outs = net.forward(request.get("outputs") or list(net.getUnconnectedOutLayersNames()))
        except cv2.error as exc:
            stdout.write((json.dumps({"error": str(exc)}) + "\n").encode())
            stdout.flush()
            continue
        stdout.write((json.dumps({"n": len(outs)}) + "\n").encode())
        for o in outs:
            write_array(stdout, np.asarray(o))
        stdout.flush()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
