"""`edged mot` / `edged eval` round trips, MOT file handling and the HOTA implementation."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edged.cli import main
from edged.tracking import evaluate, motio

from conftest import shared_path


def write(path, rows):
    path.write_text("".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


def overall(text: str):
    line = [ln for ln in text.splitlines() if ln.startswith("OVERALL")][0].split()
    return dict(zip(["MOTA", "IDF1", "HOTA", "DetA", "AssA", "IDsw", "FP", "FN"], map(float, line[1:])))


# Two people over 4 frames. Result: A tracked throughout as 1; B as 2 then 3 (one switch);
# one false box in frame 1. MOTA = 1 - (FN 0 + FP 1 + IDSW 1) / 8 = 0.75.
# IDF1: IDTP = 4 (A-1) + 2 (B-2) = 6, IDFP = 9 - 6 = 3, IDFN = 8 - 6 = 2 -> 12 / 17.
GT = [[f, 1, 10, 10, 20, 40, 1, -1, -1, -1] for f in range(1, 5)] + [
    [f, 2, 100, 10, 20, 40, 1, -1, -1, -1] for f in range(1, 5)
] + [[2, 9, 300, 300, 10, 10, 0, -1, -1, -1]]  # an ignored (confidence 0) box
RES = [[f, 1, 10, 10, 20, 40, 1, -1, -1, -1] for f in range(1, 5)] + [
    [f, 2 if f <= 2 else 3, 101, 10, 20, 40, 1, -1, -1, -1] for f in range(1, 5)
] + [[1, 7, 500, 500, 20, 40, 1, -1, -1, -1]]


def test_eval_cli_on_a_hand_made_pair(tmp_path, capsys):
    (tmp_path / "SEQ" / "gt").mkdir(parents=True)
    gt = write(tmp_path / "SEQ" / "gt" / "gt.txt", GT)
    res = write(tmp_path / "res.txt", RES)
    assert main(["eval", "--gt", str(gt), "--result", str(res)]) == 0
    out = capsys.readouterr().out
    assert "SEQ" in out
    o = overall(out)
    assert o["MOTA"] == pytest.approx(0.75, abs=1e-3)
    assert o["IDF1"] == pytest.approx(12 / 17, abs=1e-3)
    assert (o["IDsw"], o["FP"], o["FN"]) == (1, 1, 0)
    assert main(["eval", "--gt", str(gt), "--result", str(res), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["overall"]["IDSW"] == 1 and data["sequences"]["SEQ"]["MOTA"] == pytest.approx(0.75, abs=1e-3)


def test_hota_hand_cases():
    gt = np.array([[1, 1, 0, 0, 10, 10], [2, 1, 0, 0, 10, 10]], float)
    perfect = evaluate.hota_counts(gt, gt.copy())
    assert perfect.summary() == pytest.approx((1.0, 1.0, 1.0))
    # Perfect boxes, but the identity changes half way: DetA 1, AssA 1/2 -> HOTA sqrt(1/2).
    switched = gt.copy()
    switched[1, 1] = 2
    hota, deta, assa = evaluate.hota_counts(gt, switched).summary()
    assert (hota, deta, assa) == pytest.approx((np.sqrt(0.5), 1.0, 0.5))
    # IoU exactly 1/2 everywhere: matched for the 10 thresholds alpha <= 0.5 only -> HOTA 10/19.
    shifted = gt.copy()
    shifted[:, 2] += 10 / 3  # overlap 20/3 x 10 = 200/3, union 400/3
    assert evaluate.hota_counts(gt, shifted).summary()[0] == pytest.approx(10 / 19)
    # Nothing tracked: 0; combining sequences weights AssA by true positives.
    empty = evaluate.hota_counts(gt, np.zeros((0, 6)))
    assert empty.summary()[0] == 0.0
    both = evaluate.HotaCounts.combine([evaluate.hota_counts(gt, gt.copy()), empty])
    assert both.summary() == pytest.approx((np.sqrt(0.5), 0.5, 1.0))


def test_bad_files_give_clear_errors(tmp_path, capsys):
    bad = tmp_path / "det.txt"
    bad.write_text("1,-1,10,10,20,40,0.9\n1,-1,oops,10,20,40,0.9\n")
    assert main(["mot", "--det", str(bad), "--out", str(tmp_path / "r.txt")]) == 2
    assert "det.txt: line 2" in capsys.readouterr().err
    with pytest.raises(motio.MotFormatError, match="at least 10 MOT columns"):
        np.save(tmp_path / "x.npy", np.zeros((3, 4)))
        motio.load_detections(tmp_path / "x.npy")
    assert main(["eval", "--gt", str(tmp_path / "missing.txt"), "--result", str(bad)]) == 2
    assert "missing.txt: cannot read" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tracker:\n  n_iint: 3\n")
    assert main(["mot", "--det", str(bad), "--out", str(tmp_path / "r.txt"), "--config", str(cfg)]) == 2
    assert "n_init" in capsys.readouterr().err


def build_npy(seq: str, out):
    tool = shared_path("tools", "mot_inputs.py")
    seq_dir = shared_path("data", "mot15", seq)
    subprocess.run([sys.executable, str(tool), str(seq_dir), str(out)], check=True, capture_output=True)
    return seq_dir


@pytest.mark.parametrize("appearance", [True, False], ids=["features", "no-appearance"])
def test_mot_round_trip_on_a_real_sequence(tmp_path, capsys, appearance):
    npy = tmp_path / "TUD-Stadtmitte.npy"
    seq_dir = build_npy("TUD-Stadtmitte", npy)
    out = tmp_path / "res.txt"
    argv = ["mot", "--det", str(npy), "--out", str(out)] + ([] if appearance else ["--no-appearance"])
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("predict+update: ") and "ms/frame median" in printed[-1]
    rows = motio.load_text(out, 10)
    assert rows.shape[1] == 10 and (rows[:, 6] == 1).all() and rows[:, 0].min() >= 1
    assert main(["eval", "--gt", str(seq_dir / "gt" / "gt.txt"), "--result", str(out)]) == 0
    o = overall(capsys.readouterr().out)
    # Reference (original DeepSORT, with features): MOTA 0.699, IDF1 0.716.
    floor = (0.68, 0.75) if appearance else (0.6, 0.6)
    assert o["MOTA"] >= floor[0] and o["IDF1"] >= floor[1], o


def test_mot_reads_det_txt(tmp_path, capsys):
    det = shared_path("data", "mot15", "KITTI-13", "det", "det.txt")
    out = tmp_path / "res.txt"
    assert main(["mot", "--det", str(det), "--out", str(out)]) == 0
    rows = motio.load_text(out, 10)
    assert rows.shape[0] > 100 and len(np.unique(rows[:, 1])) >= 5
