"""DeepSORT multi-object tracker (Wojke, Bewley, Paulus 2017), vectorised over all tracks.

Per frame (`Tracker.update`): Kalman predict for every track; the matching cascade associates
confirmed tracks with confident detections on appearance (cosine distance, gated by the squared
Mahalanobis distance), most recently seen tracks first; tentative tracks and tracks missed only in the
previous frame then get an IoU association with the leftovers; matched tracks get a Kalman update;
unmatched tentative tracks and tracks missed more than `max_age` times are deleted; unmatched confident
detections start tentative tracks, confirmed after `n_init` hits.

Track state lives in one float matrix (one row per track, in creation order; columns below), appearance
in a pool indexed by a per-track slot, so predict, gating, costs and updates are whole-array operations
and adding or removing tracks is a single copy. The only Python loop on the hot path is the cascade over
the distinct track ages present in the frame (usually one).

Switchable improvements (see `TrackerConfig` and docs/tracker.md): EMA appearance, NSA Kalman, global
instead of cascaded matching, appearance+motion fused cost, ByteTrack second association of
low-score detections, OC-SORT observation-centric re-update of recovered tracks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import numpy as np

from edged.config import TrackerConfig
from edged.tracking import kalman
from edged.tracking.matching import (
    INFTY_COST,
    cosine_distance_gallery,
    iou_matrix,
    matching_cascade,
    min_cost_matching,
)
from edged.types import Detections, TrackerStep, TrackSnapshot

# Columns of the track state matrix.
MEAN = slice(0, 8)  # x, y, a, h, vx, vy, va, vh
COV = slice(8, 20)  # block covariance (3, 4) flattened, see kalman.py
HITS, AGE, TSU, SCORE, ID, CLASS, SLOT, CONFIRMED = range(20, 28)
LAST_Z = slice(28, 32)  # last real observation (x, y, a, h), always kept
LAST_STATE = slice(32, 52)  # mean and covariance right after it (OC-SORT re-update)
WIDTH = 52

# ByteTrack's IoU threshold for low-score detections (its second association, distance 1 - IoU).
SECOND_ASSOCIATION_MAX_IOU_DISTANCE = 0.5


class Tracker:
    """Multi-object tracker; one instance per camera. See the module docstring."""

    def __init__(self, cfg: Optional[TrackerConfig] = None, *, first_id: int = 1):
        # max_cosine_distance null means "the encoder's calibrated value": callers that know the
        # encoder resolve it first; here only DeepSORT's default is left.
        self.cfg = (cfg or TrackerConfig()).resolved()
        self._next_id = int(first_id)
        self._n = 0
        self._gate = _gate(self.cfg)
        self._state = np.zeros((32, WIDTH))
        # Appearance pool, allocated when the first features arrive.
        self._feature_dim = 0
        self._capacity = 0
        self._free_slots: List[int] = []
        self._gallery: Optional[np.ndarray] = None  # (C, B, D) nearest-neighbour gallery (original)
        self._gallery_pos: Optional[np.ndarray] = None  # (C,) features written so far
        self._feature_sum: Optional[np.ndarray] = None  # (C, D) sum of features (gallery-mode snapshot)
        # EMA appearance: K prototypes per track (K = cfg.appearance_prototypes, 1 = plain EMA), each
        # L2-normalised, with the number of features merged in and the frame of its last update.
        self._ema: Optional[np.ndarray] = None  # (C, K, D)
        self._feature_count: Optional[np.ndarray] = None  # (C, K)
        self._proto_stamp: Optional[np.ndarray] = None  # (C, K)
        self._frame = 0
        self._tick = 0  # updates so far (lazy appearance: how stale a track's appearance is)
        self._feature_tick: Optional[np.ndarray] = None  # (C,) update of the last feature
        self._has_feature: Optional[np.ndarray] = None  # (C,) any feature seen yet

    # ------------------------------------------------------------------------------------------ public
    def __len__(self) -> int:
        return self._n

    def set_config(self, cfg: TrackerConfig) -> None:
        """Switch to `cfg` between two frames without losing a track: ids, Kalman states, hits, ages and
        misses all stay. Every parameter acts from the next `update` (a smaller max_age deletes tracks
        already missed longer at that update; a smaller n_init confirms a tentative track at its next
        hit). `cfg` must be resolved (`cfg.resolved(encoder suggestion)`): null max_cosine_distance is
        refused rather than silently replaced by the generic default.

        Settings that shape the appearance memory re-shape it, keeping what each track has learned:
        - appearance_prototypes K -> K': the K' most recently updated prototypes are kept (the tracker's
          own rule: it replaces the stalest), new ones start empty;
        - nn_budget: each gallery keeps its most recent min(old, new budget) features;
        - gallery -> EMA (feature_ema 0 -> > 0): the first prototype is the track's mean feature;
        - EMA -> gallery, or ema_gallery_fallback switched on: the gallery is seeded with the track's
          non-empty prototypes (most recent last) and the mean feature with their count-weighted sum;
        - a memory the new settings do not use is dropped.
        observation_reupdate switched on: each track's "last observation" is its current box run back
        along its velocity to the frame it was last matched, with its current (wider) covariance.
        """
        if not isinstance(cfg, TrackerConfig):
            raise TypeError(f"set_config needs a TrackerConfig, got {type(cfg).__name__}")
        if cfg.max_cosine_distance is None:
            raise ValueError(
                "tracker.max_cosine_distance: set_config needs a resolved config (cfg.resolved(encoder "
                "suggestion)); null would replace the encoder's calibrated gate with the generic default"
            )
        old, self.cfg = self.cfg, cfg
        self._gate = _gate(cfg)
        if cfg.observation_reupdate and not old.observation_reupdate:
            self._seed_last_observation()
        if self._feature_dim and any(getattr(old, k) != getattr(cfg, k) for k in _APPEARANCE_SHAPE_KEYS):
            self._reshape_appearance()

    def forget_appearance(self) -> None:
        """Drop what every track has learned of its appearance, e.g. because the encoder model changed
        (old and new features do not compare; `update` does it by itself when the dimension changes).
        Tracks, ids and Kalman states stay; a track is associated on IoU, as one born while the encoder
        was off, until it is matched again and learns its look from the new features."""
        self._feature_dim = self._capacity = 0
        self._free_slots = []
        self._gallery = self._gallery_pos = self._feature_sum = self._has_feature = None
        self._ema = self._feature_count = self._proto_stamp = self._feature_tick = None

    @property
    def state(self) -> np.ndarray:
        """(T, WIDTH) view of the live tracks' state (read-only use: tests, debugging)."""
        return self._state[: self._n]

    def update(self, dets: Detections) -> TrackerStep:
        """Predict all tracks one frame ahead, then associate and update them with `dets`."""
        cfg = self.cfg
        boxes = np.asarray(dets.boxes, np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"Detections: boxes must be (N, 4), got {boxes.shape}")
        n_det = boxes.shape[0]
        scores = np.asarray(dets.scores, np.float64)
        det_classes = np.asarray(dets.class_ids)
        if scores.shape != (n_det,) or det_classes.shape != (n_det,):
            raise ValueError(
                f"Detections: {n_det} boxes but scores of shape {scores.shape} and class_ids of shape "
                f"{det_classes.shape}; all must be ({n_det},)"
            )
        feats = dets.features if cfg.use_appearance else None
        # Lazy appearance: features only for the detections whose association needs them (see
        # _needs_features); `encode(indices)` is called once per frame, after gating.
        encode = getattr(dets, "encode", None) if cfg.use_appearance and feats is None else None
        self._tick += 1
        if feats is not None:
            feats = np.asarray(feats, np.float32)
            if feats.ndim != 2 or feats.shape[0] != n_det:
                raise ValueError(f"Detections: features must be ({n_det}, D), got {feats.shape}")
            if n_det == 0 or feats.shape[1] == 0:
                feats = None
            else:
                self._use_feature_dim(feats.shape[1])

        n = self._n
        S = self._state[:n]
        if n:
            self._predict(S)
        # Tracks whose region the detector did not look at this frame: predicted only, not missed.
        unseen = self._unseen(S, dets.examined, dets.frame_size) if n and dets.examined is not None else None
        if unseen is not None:
            # Only a track found at its last look is spared: one already missed (it left, or is hidden)
            # keeps counting misses frame by frame, so it ends after max_age frames as without gating.
            unseen &= S[:, TSU] <= 1.0
            S[unseen, TSU] -= 1.0

        # Boxes without area (or not finite) cannot be filtered in (x, y, a, h) space: never used.
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not np.isfinite(boxes.sum()):
            valid &= np.isfinite(boxes).all(axis=1)
        high_threshold = cfg.min_confidence
        if cfg.second_association:
            high_threshold = max(cfg.min_confidence, cfg.high_score)
        det_free = valid & (scores >= high_threshold)
        z = kalman.boxes_to_xyah(boxes) if n_det else np.zeros((0, 4))
        det_has: Optional[np.ndarray] = None  # which detections carry a feature (None: all, or none)
        if encode is not None and det_free.any():
            need = self._needs_features(S, unseen, det_free, z, det_classes) if n else det_free.copy()
            idx = np.nonzero(need)[0]
            if idx.size:
                got = np.asarray(encode(idx), np.float32)
                if got.ndim != 2 or got.shape[0] != idx.size:
                    raise ValueError(f"Detections.encode: expected ({idx.size}, D) features, got {got.shape}")
                self._use_feature_dim(got.shape[1])
                feats = np.zeros((n_det, got.shape[1]), np.float32)
                feats[idx] = got
                det_has = need

        match_det = np.full(n, -1, np.int64)
        confirmed = S[:, CONFIRMED] > 0
        seen = ~unseen if unseen is not None else np.ones(n, bool)
        tsu = S[:, TSU]
        low_matched = _NONE
        if n and n_det:
            # Stage 1: confirmed tracks, appearance (or IoU without features), gated by motion.
            rows = np.nonzero(confirmed & seen)[0]
            cols = np.nonzero(det_free)[0]
            if rows.size and cols.size:
                cost, threshold = self._first_stage_cost(S, rows, cols, boxes, z, det_classes, feats, det_has)
                if cfg.matching_cascade:
                    r, c = matching_cascade(cost, tsu[rows], threshold, cfg.max_age)
                else:
                    r, c = min_cost_matching(cost, threshold)
                if r.size:
                    match_det[rows[r]] = cols[c]
                    det_free[cols[c]] = False
            # Stage 2: IoU for tentative tracks and tracks missed in the previous frame only.
            rows = np.nonzero((~confirmed | (tsu == 1)) & (match_det < 0) & seen)[0]
            if rows.size:
                cols = np.nonzero(det_free)[0]
                if cols.size:
                    # Only confirmed tracks are held to their appearance (tentative ones have little).
                    check = feats is not None and cfg.iou_stage_max_cosine < 2.0
                    r, c = self._iou_match(
                        S, rows, cols, boxes, det_classes, cfg.max_iou_distance,
                        feats if check else None, confirmed[rows] if check else None, det_has,
                    )
                    if r.size:
                        match_det[rows[r]] = cols[c]
                        det_free[cols[c]] = False
            if cfg.second_association:
                # Stage 3 (ByteTrack): occluded or blurred people score low but still overlap their track.
                rows = np.nonzero(confirmed & (tsu == 1) & (match_det < 0) & seen)[0]
                cols = np.nonzero(valid & (scores < high_threshold) & (scores >= cfg.low_score))[0]
                if rows.size and cols.size:
                    r, c = self._iou_match(S, rows, cols, boxes, det_classes, SECOND_ASSOCIATION_MAX_IOU_DISTANCE)
                    match_det[rows[r]] = cols[c]
                    low_matched = rows[r]

        matched = np.nonzero(match_det >= 0)[0]
        confirmed_ids: List[int] = []
        if matched.size:
            newly = self._apply_matches(S, matched, match_det[matched], z, scores, feats, low_matched, det_has)
            if newly.size:
                S[newly, CONFIRMED] = 1.0
                confirmed_ids = S[newly, ID].astype(np.int64).tolist()

        # Deletion: tentative tracks on their first miss, confirmed ones after max_age misses.
        deleted: List[TrackSnapshot] = []
        if n:
            dead = (match_det < 0) & seen & ((S[:, CONFIRMED] == 0) | (S[:, TSU] > cfg.max_age))
            if cfg.exit_outside_frame and dets.frame_size is not None:
                # A missed track whose predicted box has left the frame entirely is gone: keeping it
                # for max_age frames only delays its exit (and lets it grab whoever enters there next).
                fw, fh = dets.frame_size
                half_w, half_h = 0.5 * S[:, 2] * S[:, 3], 0.5 * S[:, 3]
                x, y = S[:, 0], S[:, 1]
                gone_out = (x + half_w < 0) | (x - half_w > fw) | (y + half_h < 0) | (y - half_h > fh)
                dead |= (match_det < 0) & gone_out
            if dead.any():
                gone = np.nonzero(dead & (S[:, CONFIRMED] > 0))[0]
                if gone.size:
                    deleted = self._snapshots(S[gone])
                self._remove(dead)

        new_dets = np.nonzero(det_free)[0]
        if new_dets.size:
            self._start_tracks(new_dets, z, scores, det_classes, feats, det_has)

        return TrackerStep(tracks=self.live_tracks(), confirmed=confirmed_ids, deleted=deleted)

    def _needs_features(self, S, unseen, det_free, z, det_classes) -> np.ndarray:
        """Which confident detections the appearance encoder must describe (lazy appearance): those with
        no gated confirmed track (a new object, or one the tracker lost), with more than one (ambiguous),
        or with a candidate that returns after a miss, has no appearance yet, or has not had a feature
        for cfg.appearance_refresh_frames updates. One confirmed track alone in its gate is matched on
        motion and IoU, as the cascade would match it anyway."""
        cfg = self.cfg
        rows = np.nonzero((S[:, CONFIRMED] > 0) & (True if unseen is None else ~unseen))[0]
        cols = np.nonzero(det_free)[0]
        need = det_free.copy()
        if not rows.size or not cols.size:
            return need
        tracks = S[rows]
        maha = kalman.gating_distance(tracks[:, MEAN], tracks[:, COV].reshape(-1, 3, 4), z[cols], cfg.gate_position_only)
        allowed = (maha <= self._gate) & (tracks[:, CLASS][:, None] == det_classes[cols][None, :])
        if self._feature_dim:
            slots = tracks[:, SLOT].astype(np.intp)
            stale = ~self._has_feature[slots] | (self._tick - self._feature_tick[slots] >= cfg.appearance_refresh_frames)
        else:
            stale = np.ones(rows.size, bool)
        special = (tracks[:, TSU] > 1) | stale
        # Matched on IoU alone, a detection that moved away from its only candidate's prediction (a person
        # who stood still and starts walking) would start a new track: such pairs need appearance too.
        far = (1.0 - iou_matrix(kalman.xyah_to_boxes(tracks), kalman.xyah_to_boxes(z[cols]))) > cfg.max_iou_distance
        need[cols] = (allowed.sum(axis=0) != 1) | (allowed & (special[:, None] | far)).any(axis=0)
        return need

    @staticmethod
    def _unseen(S: np.ndarray, examined: np.ndarray, frame_size: Optional[tuple] = None) -> np.ndarray:
        """Tracks whose predicted box centre lies in none of the examined regions. A centre outside the
        frame is taken at the nearest frame edge: a track that walked out is looked for where it left, and
        missed there, instead of living on unseen forever."""
        regions = np.asarray(examined, np.float64).reshape(-1, 4)
        if not regions.shape[0]:
            return np.ones(S.shape[0], bool)
        x, y = S[:, 0:1], S[:, 1:2]
        if frame_size is not None:
            x, y = np.clip(x, 0, frame_size[0]), np.clip(y, 0, frame_size[1])
        inside = (x >= regions[:, 0]) & (x <= regions[:, 2]) & (y >= regions[:, 1]) & (y <= regions[:, 3])
        return ~inside.any(axis=1)

    def view(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every live track (tentative ones too) as (ids, boxes x1 y1 x2 y2, centre velocity in pixels per
        frame, confirmed, last detected box): what region-based detection needs to know where to look next."""
        S = self._state[: self._n]
        return (S[:, ID].astype(np.int64), kalman.xyah_to_boxes(S), S[:, 4:6].copy(), S[:, CONFIRMED] > 0,
                kalman.xyah_to_boxes(S[:, LAST_Z]))

    @property
    def next_id(self) -> int:
        """The id the next new track will get (ids are never reused within a Tracker)."""
        return self._next_id

    def live_tracks(self) -> List[TrackSnapshot]:
        """Confirmed tracks still alive (e.g. to emit exits at shutdown)."""
        S = self._state[: self._n]
        return self._snapshots(S[S[:, CONFIRMED] > 0])

    # ------------------------------------------------------------------------------------------ stages
    @staticmethod
    def _predict(S: np.ndarray) -> None:
        """kalman.predict, in place on the state matrix (same arithmetic, fewer temporaries)."""
        h2 = S[:, 3] * S[:, 3]  # noise scales with the height before the step
        S[:, 0:4] += S[:, 4:8]
        p, c, v = S[:, 8:12], S[:, 12:16], S[:, 16:20]
        p += c
        p += c
        p += v
        c += v
        S[:, COV] += h2[:, None] * _Q_SCALED + _Q_CONST
        S[:, AGE:TSU + 1] += 1.0  # age and time since update

    def _first_stage_cost(self, S, rows, cols, boxes, z, det_classes, feats, det_has=None):
        cfg = self.cfg
        tracks = S[rows]
        maha = kalman.gating_distance(
            tracks[:, MEAN], tracks[:, COV].reshape(-1, 3, 4), z[cols], cfg.gate_position_only
        )
        allowed = maha <= self._gate
        allowed &= tracks[:, CLASS][:, None] == det_classes[cols][None, :]
        cost = np.full(maha.shape, INFTY_COST)
        # Only tracks with some admissible detection need an appearance / IoU cost.
        live = np.nonzero(allowed.any(axis=1))[0]
        if feats is not None:
            threshold = cfg.max_cosine_distance
            if live.size:
                slots = tracks[live, SLOT].astype(np.intp)
                det_f = feats[cols]
                if self._ema is not None:
                    sub = self._prototype_distance(slots, det_f)
                    if self._gallery is not None:
                        # EMA says no: give the gallery (nearest stored view) its say, admissible pairs only.
                        pi, pj = np.nonzero((sub > threshold) & allowed[live])
                        if pi.size:
                            nn = self._nn_distance(slots[pi], det_f[pj])
                            sub[pi, pj] = np.minimum(sub[pi, pj], nn)
                else:
                    used = min(self._gallery.shape[1], int(self._gallery_pos[slots].max()))
                    sub = cosine_distance_gallery(self._gallery[slots, :used], det_f)
                if cfg.motion_weight > 0:
                    sub = (1.0 - cfg.motion_weight) * sub + cfg.motion_weight * maha[live]
                has = self._has_feature[slots]
                if not has.all():
                    # A track without any feature yet (born while the encoder was off) cannot be judged
                    # on appearance: IoU as without features, scaled so that max_iou_distance maps to
                    # this stage's threshold. With INFTY it could never be found again once missed.
                    blind = np.nonzero(~has)[0]
                    iou_cost = 1.0 - iou_matrix(kalman.xyah_to_boxes(tracks[live[blind]]), boxes[cols])
                    sub[blind] = iou_cost * (threshold / cfg.max_iou_distance)
                if det_has is not None and not det_has[cols].all():
                    # Detections not encoded (lazy appearance: their association was unambiguous):
                    # judged like featureless tracks, on IoU scaled to this stage's threshold.
                    plain = np.nonzero(~det_has[cols])[0]
                    iou_cost = 1.0 - iou_matrix(kalman.xyah_to_boxes(tracks[live]), boxes[cols[plain]])
                    sub[:, plain] = iou_cost * (threshold / cfg.max_iou_distance)
                cost[live] = sub
        else:
            threshold = cfg.max_iou_distance
            if live.size:
                cost[live] = 1.0 - iou_matrix(kalman.xyah_to_boxes(tracks[live]), boxes[cols])
        cost[~allowed] = INFTY_COST
        return cost, threshold

    def _prototype_distance(self, slots: np.ndarray, det_f: np.ndarray) -> np.ndarray:
        """(T, N) smallest cosine distance between each detection and the tracks' EMA prototypes."""
        protos = self._ema[slots]
        t, k, d = protos.shape
        dist = 1.0 - (protos.reshape(t * k, d) @ det_f.T).reshape(t, k, -1).max(axis=1)
        return dist

    def _nn_distance(self, slots: np.ndarray, det_f: np.ndarray) -> np.ndarray:
        """(P,) nearest-neighbour cosine distance of detection features to the galleries of P slots."""
        used = max(1, min(self._gallery.shape[1], int(self._gallery_pos[slots].max())))
        dots = np.einsum("pbd,pd->pb", self._gallery[slots, :used], det_f)
        return 1.0 - dots.max(axis=1)

    def _pair_distance(self, slots: np.ndarray, det_f: np.ndarray, threshold: float) -> np.ndarray:
        """(P,) appearance distance of P (track slot, detection feature) pairs; tracks without any
        feature yet get 0 (no evidence against)."""
        if self._ema is not None:
            d = 1.0 - (self._ema[slots] @ det_f[:, :, None]).max(axis=(1, 2))
            if self._gallery is not None:
                far = np.nonzero(d > threshold)[0]
                if far.size:
                    d[far] = np.minimum(d[far], self._nn_distance(slots[far], det_f[far]))
        else:
            d = self._nn_distance(slots, det_f)
        d[~self._has_feature[slots]] = 0.0
        return d

    def _iou_match(self, S, rows, cols, boxes, det_classes, max_distance, feats=None, check=None, det_has=None):
        """IoU association; with `feats`, rows flagged in `check` only take detections whose appearance
        is within cfg.iou_stage_max_cosine (detections without a feature are not checked)."""
        tracks = S[rows]
        cost = 1.0 - iou_matrix(kalman.xyah_to_boxes(tracks), boxes[cols])
        cost[tracks[:, CLASS][:, None] != det_classes[cols][None, :]] = INFTY_COST
        if feats is not None:
            limit = self.cfg.iou_stage_max_cosine
            judged = check[:, None] if det_has is None else check[:, None] & det_has[cols][None, :]
            pi, pj = np.nonzero((cost <= max_distance) & judged)
            if pi.size:
                d = self._pair_distance(tracks[pi, SLOT].astype(np.intp), feats[cols[pj]], limit)
                bad = d > limit
                cost[pi[bad], pj[bad]] = INFTY_COST
        return min_cost_matching(cost, max_distance)

    def _apply_matches(self, S, rows, det_idx, z, scores, feats, low_matched, det_has=None) -> np.ndarray:
        """Kalman update + counters of the matched tracks; returns the rows that become confirmed."""
        cfg = self.cfg
        tracks = S[rows]
        zm = z[det_idx]
        sm = scores[det_idx]
        k = rows.size
        mean, cov = tracks[:, MEAN], tracks[:, COV].reshape(k, 3, 4)
        if cfg.observation_reupdate:
            gaps = tracks[:, TSU]
            lost = gaps > 1
            if lost.any():
                last = tracks[lost, LAST_STATE]
                mean = mean.copy()
                cov = cov.copy()
                mean[lost], cov[lost] = self._replay_virtual(
                    last[:, 0:8], last[:, 8:20].reshape(-1, 3, 4), tracks[lost, LAST_Z], zm[lost], gaps[lost]
                )
        mean, cov = kalman.update(mean, cov, zm, sm if cfg.nsa_kalman else None)
        tracks[:, MEAN] = mean
        tracks[:, COV] = cov.reshape(k, 12)
        tracks[:, HITS] += 1.0
        tracks[:, TSU] = 0.0
        tracks[:, SCORE] = sm
        tracks[:, LAST_Z] = zm  # where it was last seen (also for region-based detection, view())
        if cfg.observation_reupdate:
            tracks[:, LAST_STATE] = tracks[:, 0:20]
        S[rows] = tracks
        if feats is not None:
            slots = tracks[:, SLOT].astype(np.intp)
            if low_matched.size:
                # Low-score detections are often partly occluded: keep them out of the appearance model.
                keep = ~np.isin(rows, low_matched)
                slots, det_idx = slots[keep], det_idx[keep]
            if det_has is not None:
                keep = det_has[det_idx]
                slots, det_idx = slots[keep], det_idx[keep]
            if slots.size:
                self._add_features(slots, feats[det_idx])
        return rows[(tracks[:, CONFIRMED] == 0) & (tracks[:, HITS] >= cfg.n_init)]

    @staticmethod
    def _replay_virtual(mean, cov, z_last, z_new, gaps):
        """OC-SORT re-update: from the state at the last observation, predict through the gap with
        updates on observations interpolated linearly to the new one (the final update is the caller's)."""
        for step in range(1, int(gaps.max()) + 1):
            active = gaps >= step
            mean[active], cov[active] = kalman.predict(mean[active], cov[active])
            virtual = gaps > step
            if virtual.any():
                frac = (step / gaps[virtual])[:, None]
                zv = z_last[virtual] + (z_new[virtual] - z_last[virtual]) * frac
                mean[virtual], cov[virtual] = kalman.update(mean[virtual], cov[virtual], zv)
        return mean, cov

    # ------------------------------------------------------------------------------------------ tracks
    def _start_tracks(self, det_idx, z, scores, det_classes, feats, det_has=None) -> None:
        k = det_idx.size
        n = self._n
        if n + k > self._state.shape[0]:
            grown = np.zeros((max(2 * self._state.shape[0], n + k), WIDTH))
            grown[:n] = self._state[:n]
            self._state = grown
        mean, cov = kalman.initiate(z[det_idx])
        new = self._state[n : n + k]
        new[:] = 0.0
        new[:, MEAN] = mean
        new[:, COV] = cov.reshape(k, 12)
        new[:, HITS] = 1.0
        new[:, AGE] = 1.0
        new[:, SCORE] = scores[det_idx]
        new[:, ID] = np.arange(self._next_id, self._next_id + k)
        new[:, CLASS] = det_classes[det_idx]
        new[:, LAST_Z] = z[det_idx]
        if self.cfg.observation_reupdate:
            new[:, LAST_STATE] = new[:, 0:20]
        self._next_id += k
        self._n = n + k
        if self._feature_dim:
            slots = self._allocate_slots(k)
            new[:, SLOT] = slots
            self._has_feature[slots] = False
            if self._ema is not None:
                # Zero vectors are at distance 1 from everything: a recycled slot forgets its last owner.
                self._ema[slots] = 0.0
                self._feature_count[slots] = 0.0
                self._proto_stamp[slots] = -1.0
            if self._gallery is not None:
                self._gallery[slots] = 0.0
                self._gallery_pos[slots] = 0
            if self._feature_sum is not None:
                self._feature_sum[slots] = 0.0
            if feats is not None:
                keep = np.ones(k, bool) if det_has is None else det_has[det_idx]
                if keep.any():
                    self._add_features(slots[keep], feats[det_idx[keep]], new_tracks=True)

    def _remove(self, dead: np.ndarray) -> None:
        S = self._state[: self._n]
        if self._feature_dim:
            self._free_slots.extend(S[dead, SLOT].astype(np.int64).tolist())
        kept = S[~dead]
        self._n = kept.shape[0]
        self._state[: self._n] = kept

    def _snapshots(self, tracks: np.ndarray) -> List[TrackSnapshot]:
        """TrackSnapshots of state rows (a copy of rows of the state matrix)."""
        if tracks.shape[0] == 0:
            return []
        boxes = kalman.xyah_to_boxes(tracks)
        velocity = tracks[:, 4:6]
        ints = tracks[:, HITS:SLOT].astype(np.int64).tolist()  # hits, age, tsu, (score), id, class
        scores = tracks[:, SCORE].tolist()
        if self._feature_dim:
            slots = tracks[:, SLOT].astype(np.intp)
            if self._ema is not None:
                # The prototype with the most evidence stands for the track.
                f = self._ema[slots, self._feature_count[slots].argmax(axis=1)]
            else:
                f = self._feature_sum[slots]
                f = (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)
            has = self._has_feature[slots]
            features: list = list(f) if has.all() else [row if ok else None for row, ok in zip(f, has.tolist())]
        else:
            features = [None] * len(scores)
        if _POSITIONAL_SNAPSHOT:  # positional arguments: dataclass __init__ is ~2x faster than with keywords
            return [
                TrackSnapshot(i[4], i[5], b, s, v, i[0], i[1], i[2], f)
                for i, b, s, v, f in zip(ints, boxes, scores, velocity, features)
            ]
        return [
            TrackSnapshot(
                track_id=i[4], class_id=i[5], box=b, score=s, velocity=v, hits=i[0], age=i[1],
                time_since_update=i[2], feature=f,
            )
            for i, b, s, v, f in zip(ints, boxes, scores, velocity, features)
        ]

    # ------------------------------------------------------------------------------------------ appearance
    def _use_feature_dim(self, dim: int) -> None:
        if dim == self._feature_dim:
            return
        if self._feature_dim:
            # Another encoder model (a live reconfiguration): its features do not compare with the old
            # ones. Dropping the memory keeps the tracks going.
            self.forget_appearance()
        self._ensure_pool(dim)

    def _ensure_pool(self, dim: int) -> None:
        self._feature_dim = dim
        self._grow(64)
        # Tracks started before features arrived get slots now.
        if self._n:
            slots = self._allocate_slots(self._n)
            self._state[: self._n, SLOT] = slots
            self._has_feature[slots] = False
            if self._ema is not None:
                self._feature_count[slots] = 0.0
                self._proto_stamp[slots] = -1.0

    def _seed_last_observation(self) -> None:
        """LAST_STATE (kept only while observation_reupdate is on) and LAST_Z for the live tracks. The mean
        is exact: prediction keeps the velocity, so the box is just run back time_since_update steps."""
        S = self._state[: self._n]
        mean = S[:, MEAN].copy()
        mean[:, 0:4] -= S[:, TSU, None] * mean[:, 4:8]
        S[:, LAST_Z] = mean[:, 0:4]
        S[:, LAST_STATE] = np.hstack([mean, S[:, COV]])

    def _reshape_appearance(self) -> None:
        """Re-shape the appearance pool to self.cfg (see `set_config` for what is kept). Works on every
        slot: free slots are reset when they are handed out."""
        cfg = self.cfg
        cap, dim = self._capacity, self._feature_dim
        use_ema = cfg.feature_ema > 0
        use_gallery = not use_ema or cfg.ema_gallery_fallback
        budget = cfg.nn_budget or 1000
        ema, count, stamp, total = self._ema, self._feature_count, self._proto_stamp, self._feature_sum
        gallery, gallery_pos = self._gallery, self._gallery_pos
        if use_gallery:
            if gallery is None:
                # Seeded from the prototypes, oldest first, empty ones (stamp -1) skipped.
                gallery, gallery_pos = _ring_from_prototypes(ema, count, stamp, budget)
            elif gallery.shape[1] != budget:
                gallery, gallery_pos = _resize_ring(gallery, gallery_pos, budget)
        else:
            gallery = gallery_pos = None
        if use_ema:
            k = cfg.appearance_prototypes
            if ema is None:
                # From gallery mode: one prototype, the mean feature, carrying the features seen so far.
                ema = np.zeros((cap, k, dim), np.float32)
                count = np.zeros((cap, k))
                stamp = np.full((cap, k), -1.0)
                mean = total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
                has = self._has_feature
                ema[has, 0] = mean[has]
                count[has, 0] = np.maximum(self._gallery_pos[has], 1)
                stamp[has, 0] = self._frame
            elif ema.shape[1] != k:
                # The k most recent (empty ones have stamp -1), in their old order: argmax ties unchanged.
                keep = np.sort(np.argsort(-stamp, axis=1, kind="stable")[:, :k], axis=1)
                ema = _pad_axis1(np.take_along_axis(ema, keep[:, :, None], axis=1), k, 0.0)
                count = _pad_axis1(np.take_along_axis(count, keep, axis=1), k, 0.0)
                stamp = _pad_axis1(np.take_along_axis(stamp, keep, axis=1), k, -1.0)
            total = None
        else:
            if total is None:
                # Prototypes are normalised means of `count` features: their weighted sum ~ the feature sum.
                total = np.einsum("ck,ckd->cd", count, ema.astype(np.float64))
            ema = count = stamp = None
        self._ema, self._feature_count, self._proto_stamp, self._feature_sum = ema, count, stamp, total
        self._gallery, self._gallery_pos = gallery, gallery_pos

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        d = self._feature_dim

        def grown(arr, shape, dtype):
            new = np.zeros(shape, dtype)
            if arr is not None and old:
                new[:old] = arr
            return new

        self._has_feature = grown(self._has_feature, (capacity,), bool)
        self._feature_tick = grown(self._feature_tick, (capacity,), np.float64)
        if self.cfg.feature_ema > 0:
            k = self.cfg.appearance_prototypes
            self._ema = grown(self._ema, (capacity, k, d), np.float32)
            self._feature_count = grown(self._feature_count, (capacity, k), np.float64)
            self._proto_stamp = grown(self._proto_stamp, (capacity, k), np.float64)
        else:
            self._feature_sum = grown(self._feature_sum, (capacity, d), np.float64)
        if self.cfg.feature_ema == 0 or self.cfg.ema_gallery_fallback:
            budget = self.cfg.nn_budget or 1000
            self._gallery = grown(self._gallery, (capacity, budget, d), np.float32)
            self._gallery_pos = grown(self._gallery_pos, (capacity,), np.int64)
        self._free_slots.extend(range(capacity - 1, old - 1, -1))
        self._capacity = capacity

    def _allocate_slots(self, k: int) -> np.ndarray:
        if len(self._free_slots) < k:
            self._grow(max(2 * self._capacity, self._capacity + k))
        taken = self._free_slots[-k:]
        del self._free_slots[-k:]
        return np.asarray(taken, np.intp)

    def _add_features(self, slots: np.ndarray, feats: np.ndarray, new_tracks: bool = False) -> None:
        if self._ema is not None and new_tracks:
            self._frame += 1
            self._ema[slots, 0] = feats
            self._feature_count[slots, 0] = 1.0
            self._proto_stamp[slots, 0] = self._frame
        elif self._ema is not None:
            # Bias-corrected EMA: a plain mean over the first 1 / (1 - momentum) features, so the first
            # (often partial or occluded) view does not dominate the track's appearance for long.
            # With several prototypes, a feature far from all of them (another pose, an occluder, a bad
            # box) starts its own prototype, replacing the stalest, instead of dragging the main one.
            self._frame += 1
            rows = np.arange(slots.size)
            protos = self._ema[slots]  # (M, K, D)
            counts = self._feature_count[slots]
            if protos.shape[1] == 1:
                target = np.zeros(slots.size, np.intp)
                count = counts[:, 0]
            else:
                sims = (protos @ feats[:, :, None])[:, :, 0]
                sims[counts == 0] = -4.0  # below any cosine similarity: empty prototypes never win
                best = sims.argmax(axis=1)
                merge = sims[rows, best] >= 1.0 - self.cfg.max_cosine_distance
                target = np.where(merge, best, self._proto_stamp[slots].argmin(axis=1))
                count = np.where(merge, counts[rows, target], 0.0)
            alpha = np.minimum(self.cfg.feature_ema, count / (count + 1.0))[:, None]
            new = alpha * protos[rows, target] + (1.0 - alpha) * feats
            new /= np.sqrt(np.einsum("ij,ij->i", new, new))[:, None] + 1e-12
            self._ema[slots, target] = new
            self._feature_count[slots, target] = count + 1
            self._proto_stamp[slots, target] = self._frame
        else:
            self._feature_sum[slots] += feats
        if self._gallery is not None:
            budget = self._gallery.shape[1]
            pos = self._gallery_pos[slots]
            # Ring buffer: the last `budget` features stay, as in the original's gallery.
            self._gallery[slots, pos % budget] = feats
            self._gallery_pos[slots] = pos + 1
        self._has_feature[slots] = True
        self._feature_tick[slots] = self._tick


def _gate(cfg: TrackerConfig) -> float:
    """Squared-Mahalanobis gate for the configured chi-square quantile and degrees of freedom."""
    x = cfg.gating_threshold
    if not cfg.gate_position_only:
        return x
    # Same chi-square quantile at 2 instead of 4 degrees of freedom. Closed forms:
    # 1 - cdf4(x) = exp(-x/2) (1 + x/2) and ppf2(p) = -2 ln(1 - p).
    return x - 2.0 * math.log1p(x / 2.0)


def _pad_axis1(a: np.ndarray, k: int, fill: float) -> np.ndarray:
    """`a` with axis 1 cut or padded (with `fill`) to length k."""
    if a.shape[1] >= k:
        return np.ascontiguousarray(a[:, :k])
    pad = np.full((a.shape[0], k - a.shape[1]) + a.shape[2:], fill, a.dtype)
    return np.concatenate([a, pad], axis=1)


def _resize_ring(gallery: np.ndarray, pos: np.ndarray, budget: int,
                 valid: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Ring-buffer galleries (C, B, D) with write positions `pos` (and at most `valid` real entries)
    -> (C, budget, D) galleries holding each slot's most recent features, oldest first, and their
    write positions (the number kept)."""
    old = gallery.shape[1]
    kept = np.minimum(np.minimum(pos, old), budget)
    if valid is not None:
        kept = np.minimum(kept, valid)
    j = np.arange(budget)
    src = (pos[:, None] - kept[:, None] + j[None, :]) % old  # the last `kept` writes, in order
    out = np.take_along_axis(gallery, src[:, :, None], axis=1)
    out[j[None, :] >= kept[:, None]] = 0.0
    return out, kept.astype(np.int64)


def _ring_from_prototypes(ema: np.ndarray, count: np.ndarray, stamp: np.ndarray, budget: int) -> Tuple[np.ndarray, np.ndarray]:
    """Galleries seeded with each slot's non-empty EMA prototypes, least recently updated first."""
    order = np.argsort(stamp, axis=1, kind="stable")  # empty prototypes (stamp -1) come first
    protos = np.take_along_axis(ema, order[:, :, None], axis=1)
    k = ema.shape[1]
    # As a full ring of k writes whose last `filled` entries are real.
    return _resize_ring(protos, np.full(ema.shape[0], k, np.int64), budget, valid=(count > 0).sum(axis=1))


_NONE = np.zeros(0, np.intp)
# Settings that decide which appearance arrays exist and their shapes (see Tracker._reshape_appearance).
_APPEARANCE_SHAPE_KEYS = ("feature_ema", "appearance_prototypes", "ema_gallery_fallback", "nn_budget")
# Process noise for the covariance columns (var pos x4, cov x4, var vel x4): h^2-scaled part + constant.
_Q_SCALED = kalman._Q_SCALED.reshape(12)
_Q_CONST = kalman._Q_CONST.reshape(12)
# Building snapshots is a large share of a frame's time (one per live confirmed track).
_POSITIONAL_SNAPSHOT = [f.name for f in dataclasses.fields(TrackSnapshot)] == [
    "track_id", "class_id", "box", "score", "velocity", "hits", "age", "time_since_update", "feature"
]
