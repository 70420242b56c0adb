"""DeepSORT multi-object tracker (Wojke, Bewley, Paulus 2017), vectorised over all tracks.

Per frame (`Tracker.update`): Kalman predict for every track; the matching cascade associates
confirmed tracks with confident detections on appearance (cosine distance, gated by the squared
Mahalanobis distance), most recently seen tracks first; tentative tracks and tracks missed only in the
previous frame then get an IoU association with the leftovers; matched tracks get a Kalman update;
unmatched tentative tracks and tracks missed more than `max_age` times are deleted; unmatched confident
detections start tentative tracks, confirmed after `n_init` hits.

Track state lives in parallel numpy arrays (one row per track, creation order), appearance in a pool
indexed by a per-track slot, so predict, gating, costs and updates are whole-array operations; the only
Python loop on the hot path is the cascade over distinct track ages present in the frame.

Switchable improvements (see `TrackerConfig` and docs/tracker.md): EMA appearance, NSA Kalman, global
instead of cascaded matching, appearance+motion fused cost, ByteTrack second association of
low-score detections, OC-SORT observation-centric re-update of recovered tracks.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from edged.config import TrackerConfig
from edged.tracking import kalman
from edged.tracking.matching import (
    INFTY_COST,
    cosine_distance_ema,
    cosine_distance_gallery,
    iou_matrix,
    matching_cascade,
    min_cost_matching,
)
from edged.types import Detections, TrackerStep, TrackSnapshot

# ByteTrack's IoU threshold for low-score detections (its second association, distance 1 - IoU).
SECOND_ASSOCIATION_MAX_IOU_DISTANCE = 0.5


class Tracker:
    """Multi-object tracker; one instance per camera. See the module docstring."""

    def __init__(self, cfg: Optional[TrackerConfig] = None):
        self.cfg = cfg or TrackerConfig()
        self._next_id = 1
        n = 0
        self.ids = np.zeros(n, np.int64)
        self.class_ids = np.zeros(n, np.int64)
        self.mean = np.zeros((n, 8))
        self.cov = np.zeros((n, 3, 4))
        self.hits = np.zeros(n, np.int64)
        self.age = np.zeros(n, np.int64)
        self.time_since_update = np.zeros(n, np.int64)
        self.confirmed = np.zeros(n, bool)
        self.score = np.zeros(n, np.float64)
        self.slot = np.zeros(n, np.int64)
        # State right after the last real observation (OC-SORT re-update).
        self.last_z = np.zeros((n, 4))
        self.last_mean = np.zeros((n, 8))
        self.last_cov = np.zeros((n, 3, 4))
        # Appearance pool, allocated when the first features arrive.
        self._feature_dim = 0
        self._capacity = 0
        self._free_slots: List[int] = []
        self._gallery: Optional[np.ndarray] = None  # (C, B, D) nearest-neighbour gallery (original)
        self._gallery_pos: Optional[np.ndarray] = None  # (C,) next write position
        self._feature_sum: Optional[np.ndarray] = None  # (C, D) sum of features (gallery mode snapshot)
        self._ema: Optional[np.ndarray] = None  # (C, D) EMA appearance, L2-normalised
        self._has_feature: Optional[np.ndarray] = None  # (C,) any feature seen yet

    # ------------------------------------------------------------------------------------------ public
    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def update(self, dets: Detections) -> TrackerStep:
        """Predict all tracks one frame ahead, then associate and update them with `dets`."""
        cfg = self.cfg
        self._predict()

        boxes = np.asarray(dets.boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(dets.scores, np.float64).reshape(-1)
        det_classes = np.asarray(dets.class_ids).reshape(-1)
        feats = dets.features if cfg.use_appearance else None
        n = boxes.shape[0]
        if scores.shape[0] != n or det_classes.shape[0] != n:
            raise ValueError(
                f"Detections: {n} boxes but {scores.shape[0]} scores and {det_classes.shape[0]} class_ids"
            )
        if feats is not None:
            feats = np.asarray(feats, np.float32)
            if feats.ndim != 2 or feats.shape[0] != n:
                raise ValueError(f"Detections: features must be ({n}, D), got {feats.shape}")
            if n == 0 or feats.shape[1] == 0:
                feats = None
            else:
                self._ensure_pool(feats.shape[1])

        # Boxes without area (or not finite) cannot be filtered in (x, y, a, h) space: never used.
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(boxes).all(axis=1)
        high_threshold = cfg.min_confidence
        if cfg.second_association:
            high_threshold = max(cfg.min_confidence, cfg.high_score)
        high = valid & (scores >= high_threshold)
        z = kalman.boxes_to_xyah(boxes) if n else np.zeros((0, 4))

        n_tracks = self.ids.shape[0]
        match_det = np.full(n_tracks, -1, np.int64)
        det_free = high.copy()
        track_boxes = None

        if n_tracks and det_free.any():
            # Stage 1: confirmed tracks, appearance (or IoU without features), gated by motion.
            rows = np.flatnonzero(self.confirmed)
            cols = np.flatnonzero(det_free)
            if rows.size:
                if feats is None:
                    track_boxes = kalman.xyah_to_boxes(self.mean)
                cost, threshold = self._first_stage_cost(rows, cols, boxes, z, det_classes, feats, track_boxes)
                if cfg.matching_cascade:
                    r, c = matching_cascade(cost, self.time_since_update[rows], threshold, cfg.max_age)
                else:
                    r, c = min_cost_matching(cost, threshold)
                match_det[rows[r]] = cols[c]
                det_free[cols[c]] = False
            # Stage 2: IoU for tentative tracks and tracks missed in the previous frame only.
            rows = np.flatnonzero((~self.confirmed | (self.time_since_update == 1)) & (match_det < 0))
            cols = np.flatnonzero(det_free)
            if rows.size and cols.size:
                if track_boxes is None:
                    track_boxes = kalman.xyah_to_boxes(self.mean)
                r, c = self._iou_match(rows, cols, track_boxes, boxes, det_classes, cfg.max_iou_distance)
                match_det[rows[r]] = cols[c]
                det_free[cols[c]] = False

        low_matched = np.zeros(0, np.int64)
        if cfg.second_association and n_tracks:
            # Stage 3 (ByteTrack): occluded/blurred people score low but still overlap their track.
            low = valid & ~high & (scores >= cfg.low_score)
            rows = np.flatnonzero(self.confirmed & (self.time_since_update == 1) & (match_det < 0))
            cols = np.flatnonzero(low)
            if rows.size and cols.size:
                if track_boxes is None:
                    track_boxes = kalman.xyah_to_boxes(self.mean)
                r, c = self._iou_match(rows, cols, track_boxes, boxes, det_classes, SECOND_ASSOCIATION_MAX_IOU_DISTANCE)
                match_det[rows[r]] = cols[c]
                low_matched = rows[r]

        matched = np.flatnonzero(match_det >= 0)
        if matched.size:
            self._apply_matches(matched, match_det[matched], z, scores, feats, low_matched)

        # Bookkeeping: confirmation, deletion.
        newly_confirmed = matched[(~self.confirmed[matched]) & (self.hits[matched] >= cfg.n_init)]
        confirmed_ids: List[int] = []
        if newly_confirmed.size:
            self.confirmed[newly_confirmed] = True
            confirmed_ids = self.ids[newly_confirmed].tolist()
        missed = match_det < 0
        dead = missed & (~self.confirmed | (self.time_since_update > cfg.max_age))
        deleted: List[TrackSnapshot] = []
        if dead.any():
            gone_confirmed = np.flatnonzero(dead & self.confirmed)
            if gone_confirmed.size:
                deleted = self._snapshots(gone_confirmed)
            self._remove(dead)

        new_dets = np.flatnonzero(det_free)
        if new_dets.size:
            self._start_tracks(new_dets, z, scores, det_classes, feats)

        return TrackerStep(
            tracks=self._snapshots(np.flatnonzero(self.confirmed)),
            confirmed=confirmed_ids,
            deleted=deleted,
        )

    def live_tracks(self) -> List[TrackSnapshot]:
        """Confirmed tracks still alive (e.g. to emit exits at shutdown)."""
        return self._snapshots(np.flatnonzero(self.confirmed))

    # ------------------------------------------------------------------------------------------ stages
    def _predict(self) -> None:
        if self.ids.shape[0]:
            self.mean, self.cov = kalman.predict(self.mean, self.cov)
            self.age += 1
            self.time_since_update += 1

    def _first_stage_cost(self, rows, cols, boxes, z, det_classes, feats, track_boxes):
        cfg = self.cfg
        if feats is not None:
            slots = self.slot[rows]
            det_f = feats[cols]
            if cfg.feature_ema > 0:
                cost = cosine_distance_ema(self._ema[slots], det_f).astype(np.float64)
            else:
                cost = cosine_distance_gallery(self._gallery[slots], det_f).astype(np.float64)
            # A track without any feature yet cannot be judged on appearance.
            cost[~self._has_feature[slots]] = INFTY_COST
            threshold = cfg.max_cosine_distance
        else:
            cost = 1.0 - iou_matrix(track_boxes[rows], boxes[cols])
            threshold = cfg.max_iou_distance
        maha = kalman.gating_distance(self.mean[rows], self.cov[rows], z[cols])
        if cfg.motion_weight > 0 and feats is not None:
            cost = (1.0 - cfg.motion_weight) * cost + cfg.motion_weight * maha
        cost[maha > cfg.gating_threshold] = INFTY_COST
        cost[self.class_ids[rows][:, None] != det_classes[cols][None, :]] = INFTY_COST
        return cost, threshold

    def _iou_match(self, rows, cols, track_boxes, boxes, det_classes, max_distance):
        cost = 1.0 - iou_matrix(track_boxes[rows], boxes[cols])
        cost[self.class_ids[rows][:, None] != det_classes[cols][None, :]] = INFTY_COST
        return min_cost_matching(cost, max_distance)

    def _apply_matches(self, rows, det_idx, z, scores, feats, low_matched) -> None:
        cfg = self.cfg
        zm = z[det_idx]
        mean, cov = self.mean[rows], self.cov[rows]
        if cfg.observation_reupdate:
            gaps = self.time_since_update[rows]
            lost = gaps > 1
            if lost.any():
                mean[lost], cov[lost] = self._replay_virtual(
                    self.last_mean[rows[lost]], self.last_cov[rows[lost]], self.last_z[rows[lost]], zm[lost], gaps[lost]
                )
        mean, cov = kalman.update(mean, cov, zm, scores[det_idx] if cfg.nsa_kalman else None)
        self.mean[rows] = mean
        self.cov[rows] = cov
        if cfg.observation_reupdate:
            self.last_mean[rows] = mean
            self.last_cov[rows] = cov
            self.last_z[rows] = zm
        self.hits[rows] += 1
        self.time_since_update[rows] = 0
        self.score[rows] = scores[det_idx]
        if feats is not None:
            if low_matched.size:
                # Low-score detections are often partly occluded: keep them out of the appearance model.
                keep = ~np.isin(rows, low_matched)
                rows, det_idx = rows[keep], det_idx[keep]
            if rows.size:
                self._add_features(self.slot[rows], feats[det_idx])

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
    def _start_tracks(self, det_idx, z, scores, det_classes, feats) -> None:
        k = det_idx.size
        mean, cov = kalman.initiate(z[det_idx])
        ids = np.arange(self._next_id, self._next_id + k, dtype=np.int64)
        self._next_id += k
        slots = np.zeros(k, np.int64)
        if self._feature_dim:
            slots = self._allocate_slots(k)
        self.ids = np.concatenate([self.ids, ids])
        self.class_ids = np.concatenate([self.class_ids, det_classes[det_idx].astype(np.int64)])
        self.mean = np.concatenate([self.mean, mean])
        self.cov = np.concatenate([self.cov, cov])
        self.hits = np.concatenate([self.hits, np.ones(k, np.int64)])
        self.age = np.concatenate([self.age, np.ones(k, np.int64)])
        self.time_since_update = np.concatenate([self.time_since_update, np.zeros(k, np.int64)])
        self.confirmed = np.concatenate([self.confirmed, np.zeros(k, bool)])
        self.score = np.concatenate([self.score, scores[det_idx]])
        self.slot = np.concatenate([self.slot, slots])
        if self.cfg.observation_reupdate:
            self.last_z = np.concatenate([self.last_z, z[det_idx]])
            self.last_mean = np.concatenate([self.last_mean, mean])
            self.last_cov = np.concatenate([self.last_cov, cov])
        if self._feature_dim:
            self._has_feature[slots] = False
            if self._gallery is not None:
                self._gallery[slots] = 0.0
                self._gallery_pos[slots] = 0
                self._feature_sum[slots] = 0.0
            if feats is not None:
                self._add_features(slots, feats[det_idx])

    def _remove(self, dead: np.ndarray) -> None:
        keep = ~dead
        if self._feature_dim:
            self._free_slots.extend(self.slot[dead].tolist())
        for name in ("ids", "class_ids", "mean", "cov", "hits", "age", "time_since_update", "confirmed", "score", "slot"):
            setattr(self, name, getattr(self, name)[keep])
        if self.cfg.observation_reupdate:
            self.last_z, self.last_mean, self.last_cov = self.last_z[keep], self.last_mean[keep], self.last_cov[keep]

    def _snapshots(self, rows: np.ndarray) -> List[TrackSnapshot]:
        if rows.size == 0:
            return []
        mean = self.mean[rows]
        boxes = kalman.xyah_to_boxes(mean)
        velocity = mean[:, 4:6].copy()
        features: list = [None] * rows.size
        if self._feature_dim:
            slots = self.slot[rows]
            if self._ema is not None:
                f = self._ema[slots]
            else:
                f = self._feature_sum[slots]
                norm = np.linalg.norm(f, axis=1, keepdims=True)
                f = f / np.maximum(norm, 1e-12)
            has = self._has_feature[slots].tolist()
            features = [row if ok else None for row, ok in zip(f, has)]
        return [
            TrackSnapshot(
                track_id=i, class_id=c, box=b, score=s, velocity=v, hits=h, age=a, time_since_update=t, feature=f
            )
            for i, c, b, s, v, h, a, t, f in zip(
                self.ids[rows].tolist(),
                self.class_ids[rows].tolist(),
                boxes,
                self.score[rows].tolist(),
                velocity,
                self.hits[rows].tolist(),
                self.age[rows].tolist(),
                self.time_since_update[rows].tolist(),
                features,
            )
        ]

    # ------------------------------------------------------------------------------------------ appearance
    def _ensure_pool(self, dim: int) -> None:
        if self._feature_dim == dim:
            return
        if self._feature_dim:
            raise ValueError(f"Detections: feature dimension changed from {self._feature_dim} to {dim}")
        self._feature_dim = dim
        self._capacity = 0
        self._grow(64)
        # Tracks started before features arrived get slots now.
        if self.ids.shape[0]:
            self.slot = self._allocate_slots(self.ids.shape[0])
            self._has_feature[self.slot] = False

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        d = self._feature_dim

        def grown(arr, shape, dtype):
            new = np.zeros(shape, dtype)
            if arr is not None and old:
                new[:old] = arr
            return new

        self._has_feature = grown(self._has_feature, (capacity,), bool)
        if self.cfg.feature_ema > 0:
            self._ema = grown(self._ema, (capacity, d), np.float32)
        else:
            budget = self.cfg.nn_budget or 1000
            self._gallery = grown(self._gallery, (capacity, budget, d), np.float32)
            self._gallery_pos = grown(self._gallery_pos, (capacity,), np.int64)
            self._feature_sum = grown(self._feature_sum, (capacity, d), np.float64)
        self._free_slots.extend(range(capacity - 1, old - 1, -1))
        self._capacity = capacity

    def _allocate_slots(self, k: int) -> np.ndarray:
        if len(self._free_slots) < k:
            self._grow(max(2 * self._capacity, self._capacity + k))
        taken = self._free_slots[-k:]
        del self._free_slots[-k:]
        return np.asarray(taken, np.int64)

    def _add_features(self, slots: np.ndarray, feats: np.ndarray) -> None:
        if self._ema is not None:
            alpha = self.cfg.feature_ema
            has = self._has_feature[slots]
            new = feats.copy()
            new[has] = alpha * self._ema[slots[has]] + (1.0 - alpha) * feats[has]
            new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
            self._ema[slots] = new
        else:
            budget = self._gallery.shape[1]
            pos = self._gallery_pos[slots]
            # Ring buffer: the last `budget` features stay, as in the original's gallery.
            self._gallery[slots, pos % budget] = feats
            self._gallery_pos[slots] = pos + 1
            self._feature_sum[slots] += feats
        self._has_feature[slots] = True
