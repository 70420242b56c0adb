"""`edged eval`: score MOTChallenge results against ground truth (IoU 0.5).

CLEAR-MOT (MOTA, ID switches, FP, FN) and IDF1 come from py-motmetrics, configured as the shared
scoring tool (`mot15-2D`, ground-truth rows with confidence < 1 ignored, IoU distance threshold 0.5).
HOTA follows Luiten et al. 2020 (IJCV) and the TrackEval reference implementation: IoU similarity,
per-frame Hungarian matching on alignment-weighted similarity, 19 localisation thresholds
alpha = 0.05 ... 0.95, HOTA = mean over alpha of sqrt(DetA * AssA); sequences are combined by summing
TP/FN/FP and weighting AssA by TP, as TrackEval does.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from edged.tracking import motio

HOTA_ALPHAS = np.arange(0.05, 0.99, 0.05)
_EPS = np.finfo(float).eps


# A plain install leaves py-motmetrics (and its pandas) out: say which extra brings it.
MISSING_EXTRA = ("edged eval needs py-motmetrics, which a plain install leaves out: "
                 "pip install 'edged[eval]'  (in a source checkout: pip install '.[eval]')")


def _motmetrics():
    if not hasattr(np, "asfarray"):  # motmetrics 1.4.0 predates numpy 2, which removed asfarray
        np.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)  # type: ignore[attr-defined]
    import motmetrics

    return motmetrics


@dataclass
class Scores:
    name: str
    mota: float
    idf1: float
    id_switches: int
    false_positives: int
    misses: int
    hota: float
    deta: float
    assa: float


# ---------------------------------------------------------------------------------------------- HOTA
@dataclass
class HotaCounts:
    """Per-alpha sufficient statistics of one sequence (combinable across sequences)."""

    tp: np.ndarray
    fn: np.ndarray
    fp: np.ndarray
    assa: np.ndarray

    def summary(self) -> Tuple[float, float, float]:
        deta = self.tp / np.maximum(1.0, self.tp + self.fn + self.fp)
        hota = np.sqrt(deta * self.assa)
        return float(hota.mean()), float(deta.mean()), float(self.assa.mean())

    @staticmethod
    def combine(parts: Sequence["HotaCounts"]) -> "HotaCounts":
        tp = sum(p.tp for p in parts)
        assa = sum(p.assa * p.tp for p in parts) / np.maximum(1e-10, tp)
        return HotaCounts(tp, sum(p.fn for p in parts), sum(p.fp for p in parts), assa)


def _iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    out = np.zeros_like(inter)
    ok = union > _EPS
    out[ok] = inter[ok] / union[ok]
    return out


def hota_counts(gt: np.ndarray, res: np.ndarray) -> HotaCounts:
    """HOTA statistics of one sequence; rows are `frame, id, x, y, w, h` (extra columns ignored)."""
    na = len(HOTA_ALPHAS)
    zeros = np.zeros(na)
    if res.shape[0] == 0 or gt.shape[0] == 0:
        return HotaCounts(zeros.copy(), zeros + gt.shape[0], zeros + res.shape[0], zeros.copy())
    gt_ids, gt_idx = np.unique(gt[:, 1], return_inverse=True)
    tr_ids, tr_idx = np.unique(res[:, 1], return_inverse=True)
    frames = np.union1d(gt[:, 0], res[:, 0])
    gt_by = {f: np.flatnonzero(gt[:, 0] == f) for f in frames}
    tr_by = {f: np.flatnonzero(res[:, 0] == f) for f in frames}

    per_frame = []  # (gt local ids, tracker local ids, similarity)
    potential = np.zeros((len(gt_ids), len(tr_ids)))
    gt_count = np.zeros((len(gt_ids), 1))
    tr_count = np.zeros((1, len(tr_ids)))
    for f in frames:
        g, t = gt_by[f], tr_by[f]
        gi, ti = gt_idx[g], tr_idx[t]
        sim = _iou_xywh(gt[g, 2:6], res[t, 2:6])
        per_frame.append((gi, ti, sim))
        # Soft (IoU-weighted) co-occurrence of every gt/tracker id pair, for the alignment score.
        denom = sim.sum(0)[None, :] + sim.sum(1)[:, None] - sim
        sim_iou = np.zeros_like(sim)
        ok = denom > _EPS
        sim_iou[ok] = sim[ok] / denom[ok]
        potential[gi[:, None], ti[None, :]] += sim_iou
        gt_count[gi] += 1
        tr_count[0, ti] += 1
    alignment = potential / (gt_count + tr_count - potential)

    tp, fn, fp = zeros.copy(), zeros.copy(), zeros.copy()
    matches = np.zeros((na, len(gt_ids), len(tr_ids)))
    for gi, ti, sim in per_frame:
        if gi.size == 0:
            fp += ti.size
            continue
        if ti.size == 0:
            fn += gi.size
            continue
        r, c = linear_sum_assignment(-(alignment[gi[:, None], ti[None, :]] * sim))
        matched_sim = sim[r, c]
        for a, alpha in enumerate(HOTA_ALPHAS):
            ok = matched_sim >= alpha - _EPS
            k = int(ok.sum())
            tp[a] += k
            fn[a] += gi.size - k
            fp[a] += ti.size - k
            if k:
                matches[a, gi[r[ok]], ti[c[ok]]] += 1
    assa = np.zeros(na)
    for a in range(na):
        m = matches[a]
        ass_iou = m / np.maximum(1.0, gt_count + tr_count - m)
        assa[a] = (m * ass_iou).sum() / max(1.0, tp[a])
    return HotaCounts(tp, fn, fp, assa)


# ---------------------------------------------------------------------------------------------- all metrics
def _frame(rows: np.ndarray):
    import pandas as pd

    df = pd.DataFrame(
        {
            "FrameId": rows[:, 0].astype(int),
            "Id": rows[:, 1].astype(int),
            "X": rows[:, 2],
            "Y": rows[:, 3],
            "Width": rows[:, 4],
            "Height": rows[:, 5],
            "Confidence": np.ones(rows.shape[0]),
        }
    )
    return df.set_index(["FrameId", "Id"])


def load_gt(path) -> np.ndarray:
    """Ground-truth rows to score against: rows with confidence (column 7) below 1 are ignored,
    as `motmetrics.io.loadtxt(..., min_confidence=1)` does."""
    rows = motio.load_text(path, 6)
    if rows.shape[1] >= 7:
        rows = rows[rows[:, 6] >= 1]
    return rows[:, :6]


def load_result(path) -> np.ndarray:
    return motio.load_text(path, 6)[:, :6]


def score(pairs: Sequence[Tuple[str, np.ndarray, np.ndarray]]) -> List[Scores]:
    """Scores of each (name, gt rows, result rows) pair, then an 'OVERALL' row."""
    mm = _motmetrics()
    accs, names, hotas = [], [], []
    for name, gt, res in pairs:
        accs.append(mm.utils.compare_to_groundtruth(_frame(gt), _frame(res), "iou", distth=0.5))
        names.append(name)
        hotas.append(hota_counts(gt, res))
    mh = mm.metrics.create()
    summary = mh.compute_many(
        accs,
        metrics=["mota", "idf1", "num_switches", "num_false_positives", "num_misses"],
        names=names,
        generate_overall=True,
    )
    out = []
    for name, h in zip(names + ["OVERALL"], hotas + [HotaCounts.combine(hotas)]):
        row = summary.loc[name]
        hota, deta, assa = h.summary()
        out.append(
            Scores(
                name=name,
                mota=float(row["mota"]),
                idf1=float(row["idf1"]),
                id_switches=int(row["num_switches"]),
                false_positives=int(row["num_false_positives"]),
                misses=int(row["num_misses"]),
                hota=hota,
                deta=deta,
                assa=assa,
            )
        )
    return out


def sequence_name(gt_path: str) -> str:
    """`.../<SEQ>/gt/gt.txt` -> SEQ, else the file name without extension."""
    p = Path(gt_path)
    if p.parent.name == "gt" and p.parent.parent.name:
        return p.parent.parent.name
    return p.stem


def format_table(scores: Sequence[Scores]) -> str:
    width = max(8, max(len(s.name) for s in scores))
    cols = ("MOTA", "IDF1", "HOTA", "DetA", "AssA")
    head = f"{'sequence':<{width}}  " + " ".join(f"{c:>6}" for c in cols) + f" {'IDsw':>5} {'FP':>6} {'FN':>6}"
    lines = [head]
    for s in scores:
        lines.append(
            f"{s.name:<{width}}  {s.mota:6.3f} {s.idf1:6.3f} {s.hota:6.3f} {s.deta:6.3f} {s.assa:6.3f} "
            f"{s.id_switches:5d} {s.false_positives:6d} {s.misses:6d}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", action="append", required=True, help="ground truth gt.txt (repeat per sequence)")
    parser.add_argument("--result", action="append", required=True, help="MOT result file, paired with --gt in order")
    parser.add_argument("--json", action="store_true", help="also print one JSON line (last line) with all scores")


def run(args: argparse.Namespace) -> int:
    try:
        _motmetrics()
    except ImportError as exc:
        print(f"{MISSING_EXTRA}\n({exc})", file=sys.stderr)
        return 1
    if len(args.gt) != len(args.result):
        print(f"edged eval: {len(args.gt)} --gt but {len(args.result)} --result; give them in pairs", file=sys.stderr)
        return 2
    pairs = []
    names: Dict[str, int] = {}
    try:
        for gt_path, res_path in zip(args.gt, args.result):
            name = sequence_name(gt_path)
            if name in names:  # keep names unique for the per-sequence table
                names[name] += 1
                name = f"{name}#{names[name]}"
            else:
                names[name] = 1
            pairs.append((name, load_gt(gt_path), load_result(res_path)))
    except motio.MotFormatError as exc:
        print(f"edged eval: {exc}", file=sys.stderr)
        return 2
    scores = score(pairs)
    print(format_table(scores))
    if args.json:
        print(json.dumps({"sequences": {s.name: scores_dict(s) for s in scores[:-1]}, "overall": scores_dict(scores[-1])}))
    return 0


def scores_dict(s: Scores) -> Dict[str, float]:
    return {
        "MOTA": s.mota, "IDF1": s.idf1, "HOTA": s.hota, "DetA": s.deta, "AssA": s.assa,
        "IDSW": s.id_switches, "FP": s.false_positives, "FN": s.misses,
    }
