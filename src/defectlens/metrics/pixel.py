"""Pixel-level metrics pooled over a data set: pixel AUROC, AUPRO / PRO curve, pixel F1.

Definitions follow the official MVTec AD evaluation code (``pro_curve_util.compute_pro`` and
``generic_util.trapezoid``), exactly, but without its memory cost:

* **Pixel AUROC**: every pixel of every image is a sample, positive = mask value != 0; area
  under the ROC curve with tied scores counted one half (Mann-Whitney U / (P * N)). Computed
  from integer counts, so it is exact up to the final division.
* **PRO curve / AUPRO**: regions are the 8-connected components of each image's mask
  (``scipy.ndimage.label`` with a 3x3 structure; a region with a hole is one region and its
  hole pixels are defect-free). Every distinct score is a threshold, positives are pixels
  with ``score >= threshold``; FPR is pooled over all defect-free pixels of all images
  (defect-free images included); PRO is the mean over all regions of the covered fraction.
  All pixels with one score change state together: only the point after a run of tied
  scores is kept. The curve starts at (0, 0) and ends at (1, 1); the area up to a limit L is
  the trapezoid rule with linear interpolation at L, divided by L.

How it stays exact in bounded memory (hand-written; no library streams these):
the PRO (and ROC) curve only changes height at *defect* pixel scores. Pass 1 collects the
defect pixels' scores with their weights (1 / region size) - a small fraction of all
pixels - and sorts them into ``U`` unique scores ``u``. Those split the score axis into
``2U + 1`` *slots*: the open gaps between consecutive ``u`` and the ``u`` themselves. Pass 2
streams the defect-free pixels image by image and only counts how many fall into each slot
(per image: sort in the map's dtype, binary search, run-length count). Inside a gap the curve
is flat, on a ``u`` it is a straight segment: from those counts the exact curve, its area up
to any limit, the Mann-Whitney statistic and the best F1 follow (one walk over the slots in
blocks). Memory is about 40 bytes per defect pixel plus a few copies of one map, never
``O(all pixels)``; the maps are read twice, so give a
re-iterable sequence (a list of arrays, a list of zero-argument callables that load one map,
or any object with ``__len__`` / ``__getitem__``). A one-shot iterator is read into a list.

Maps in one call may have different sizes; each map must have the size of its mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from scipy import ndimage

from defectlens.errors import ConfigError
from defectlens.metrics.image import counts_summary

__all__ = [
    "DEFAULT_PRO_LIMITS",
    "PixelMetrics",
    "ProCurve",
    "aupro",
    "pixel_auroc",
    "pixel_classification_at_threshold",
    "pixel_f1_max",
    "pixel_metrics",
    "pro_curve",
    "trapezoid_area",
]

DEFAULT_PRO_LIMITS: tuple[float, ...] = (0.3, 0.1, 0.05, 0.01, 1.0)
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=int)

#: One map or mask: an array, or a zero-argument callable returning one (loaded lazily).
MapSource = Union[np.ndarray, Callable[[], Any], None]
#: Several maps: a (N, H, W) array, a sequence of ``MapSource`` or any iterable of them.
MapCollection = Union[np.ndarray, Sequence[MapSource], Iterable[MapSource]]


# --------------------------------------------------------------------------------------
# input handling (shared with spro.py and instances.py)
# --------------------------------------------------------------------------------------
def as_reiterable(collection: Any, what: str) -> Sequence[Any]:
    """Return ``collection`` as something that can be iterated several times.

    A (N, H, W) array or any object with ``__len__`` and ``__getitem__`` is returned as is
    (items are loaded only when accessed); a one-shot iterable is read into a list.
    """
    if isinstance(collection, np.ndarray):
        if collection.ndim == 2:
            raise ValueError(
                f"{what}: got one 2-D array of shape {collection.shape}; pass a sequence of "
                "2-D maps (e.g. [array]) or an (N, H, W) array"
            )
        return collection
    if isinstance(collection, (str, bytes)) or collection is None:
        raise TypeError(f"{what}: expected a sequence of 2-D arrays, got {type(collection)!r}")
    if hasattr(collection, "__len__") and hasattr(collection, "__getitem__"):
        return collection  # type: ignore[return-value]
    return list(collection)


def resolve(item: Any) -> Any:
    """A map given lazily (a zero-argument callable, e.g. a file loader) -> the map; else itself."""
    if callable(item) and not isinstance(item, np.ndarray):
        return item()
    return item


def squeeze_to_2d(array: np.ndarray, what: str) -> np.ndarray:
    """Drop leading and trailing axes of length 1; ValueError naming ``what`` if not 2-D then."""
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {array.shape}")
    return array


def load_score_map(item: Any, index: int, what: str = "anomaly map") -> np.ndarray:
    """Load one anomaly map as a 2-D real array (bool -> uint8, float16 -> float32).

    Raises ``ValueError`` naming the map's index for NaN scores or a wrong shape / dtype.
    """
    array = resolve(item)
    if array is None:
        raise ValueError(f"{what} {index} is None")
    array = squeeze_to_2d(np.asarray(array), f"{what} {index}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{what} {index}: unsupported dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise ValueError(f"{what} {index} contains NaN scores")
    return array


def load_binary_mask(item: Any, shape: tuple[int, ...], index: int,
                     what: str = "mask") -> np.ndarray | None:
    """Load one mask as a 2-D bool array (True = value != 0); None stays None (defect-free)."""
    array = resolve(item)
    if array is None:
        return None
    array = squeeze_to_2d(np.asarray(array), f"{what} {index}")
    if array.shape != tuple(shape):
        raise ValueError(
            f"{what} {index} has shape {array.shape} but its anomaly map has shape {tuple(shape)}"
        )
    return array != 0


def iter_pairs(first: Iterable[Any], second: Iterable[Any], names: tuple[str, str]
               ) -> Iterator[tuple[int, Any, Any]]:
    """Zip two collections, raising ``ValueError`` when their lengths differ."""
    sentinel = object()
    first_iter, second_iter = iter(first), iter(second)
    index = 0
    while True:
        a = next(first_iter, sentinel)
        b = next(second_iter, sentinel)
        if a is sentinel and b is sentinel:
            return
        if a is sentinel or b is sentinel:
            raise ValueError(
                f"{names[0]} and {names[1]} differ in length (one ends after {index} items)"
            )
        yield index, a, b
        index += 1


def _iter_maps_and_masks(anomaly_maps: Sequence[Any], masks: Sequence[Any]
                         ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    for index, map_item, mask_item in iter_pairs(anomaly_maps, masks, ("anomaly_maps", "masks")):
        score_map = load_score_map(map_item, index)
        mask = load_binary_mask(mask_item, score_map.shape, index)
        if mask is not None and not mask.any():
            mask = None
        yield index, score_map, mask


def validate_limits(limits: Iterable[float]) -> tuple[float, ...]:
    """FPR integration limits as floats in (0, 1]; :class:`ConfigError` otherwise."""
    checked = tuple(float(limit) for limit in limits)
    for limit in checked:
        if not 0.0 < limit <= 1.0:
            raise ConfigError(f"FPR integration limit must lie in (0, 1], got {limit}")
    return checked


# --------------------------------------------------------------------------------------
# the streaming core (hand-written)
# --------------------------------------------------------------------------------------
class PositiveAccumulator:
    """Pass 1: collect the scores (and curve weights) of positive pixels, image by image."""

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self.num_units = 0  # regions (PRO) or channels (sPRO): the curve's denominator
        self.num_negatives = 0
        self.score_dtype: np.dtype | None = None

    def see_map(self, score_map: np.ndarray) -> None:
        """Record the dtype of every map so that all scores share one exact dtype."""
        dtype = score_map.dtype
        self.score_dtype = dtype if self.score_dtype is None else np.result_type(
            self.score_dtype, dtype)

    def add(self, scores: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add positive pixels' scores (1-D) and, for weighted curves, their weights (1-D)."""
        self._scores.append(np.ascontiguousarray(scores).ravel())
        if weights is not None:
            self._weights.append(np.asarray(weights, dtype=np.float64).ravel())

    def finish(self) -> PositiveScores:
        """Sort, merge equal scores; frees the per-image lists (peak ~40 bytes per pixel)."""
        dtype = self.score_dtype if self.score_dtype is not None else np.dtype(np.float32)
        scores = (np.concatenate(self._scores).astype(dtype, copy=False) if self._scores
                  else np.empty(0, dtype=dtype))
        self._scores = []
        order = np.argsort(scores, kind="stable")
        scores = scores[order]
        weights = None
        if self._weights:
            weights = np.concatenate(self._weights)
            self._weights = []
            weights = weights[order]
        del order
        size = scores.size
        is_start = np.empty(size, dtype=bool)
        if size:
            is_start[0] = True
            np.not_equal(scores[1:], scores[:-1], out=is_start[1:])
        starts = np.flatnonzero(is_start)
        del is_start
        unique_scores = scores[starts]
        del scores
        unique_weights = (np.add.reduceat(weights, starts) if weights is not None and size
                          else np.zeros(starts.size, dtype=np.float64))
        del weights
        count_dtype = np.uint32 if size < 2**32 else np.int64
        counts = np.diff(np.append(starts, size)).astype(count_dtype)
        return PositiveScores(unique_scores, counts, unique_weights)


@dataclass
class PositiveScores:
    """Unique positive scores in ascending order, with pixel counts and summed weights."""

    scores: np.ndarray  # (U,) ascending, unique, in the maps' dtype
    counts: np.ndarray  # (U,) uint32 / int64: positive pixels with this score
    weights: np.ndarray  # (U,) float64: sum of their curve weights (not yet / num_units)


class NegativeSlotCounter:
    """Pass 2: count negative pixels per slot of the positive scores.

    With the ascending unique positive scores ``u[0] < ... < u[U-1]``, slot ``2i`` is the open
    gap below ``u[i]`` (above ``u[i-1]``), slot ``2i + 1`` is ``u[i]`` itself, and slot ``2U``
    is everything above ``u[U-1]``. Optionally keeps the lowest / highest negative score of
    every gap (for reporting thresholds).
    """

    def __init__(self, positive_scores: np.ndarray, track_extremes: bool,
                 expected_negatives: int | None = None) -> None:
        self.positive_scores = positive_scores
        num_unique = positive_scores.size
        small = expected_negatives is not None and expected_negatives < 2**32
        self.slot_counts = np.zeros(2 * num_unique + 1, dtype=np.uint32 if small else np.int64)
        self.track_extremes = track_extremes
        self.gap_min: np.ndarray | None = None
        self.gap_max: np.ndarray | None = None
        if track_extremes:
            extreme_dtype = np.result_type(positive_scores.dtype, np.float32)
            self.gap_min = np.full(num_unique + 1, np.inf, dtype=extreme_dtype)
            self.gap_max = np.full(num_unique + 1, -np.inf, dtype=extreme_dtype)

    def add(self, negative_scores: np.ndarray) -> None:
        """Count one image's negative pixel scores (any shape; copied and sorted)."""
        values = np.sort(negative_scores, axis=None)
        if values.size == 0:
            return
        positives = self.positive_scores
        if positives.size:
            above = np.searchsorted(positives, values, side="right")  # positives <= value
            candidate = positives[np.maximum(above - 1, 0)]
            is_tie = (candidate == values) & (above > 0)
            del candidate
            slots = 2 * above - is_tie
            del above, is_tie
        else:
            slots = np.zeros(values.size, dtype=np.intp)
        # ``values`` is sorted, so ``slots`` is non-decreasing: count runs.
        run_start = np.empty(slots.size, dtype=bool)
        run_start[0] = True
        np.not_equal(slots[1:], slots[:-1], out=run_start[1:])
        starts = np.flatnonzero(run_start)
        del run_start
        ends = np.append(starts[1:], slots.size)
        run_slots = slots[starts]
        del slots
        self.slot_counts[run_slots] += (ends - starts).astype(self.slot_counts.dtype)
        if self.track_extremes:
            assert self.gap_min is not None and self.gap_max is not None
            in_gap = run_slots % 2 == 0
            gaps = run_slots[in_gap] // 2
            self.gap_min[gaps] = np.minimum(self.gap_min[gaps], values[starts[in_gap]])
            self.gap_max[gaps] = np.maximum(self.gap_max[gaps], values[ends[in_gap] - 1])


@dataclass
class SweepSummary:
    """What one walk over the slots gives (see :meth:`ScoreSweep.summarize`)."""

    areas: dict[float, float | None]
    auc: float | None
    f1: float | None
    f1_threshold: float | None
    # (fpr, y, inclusive threshold, exclusive threshold), without added end points
    curve: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None


@dataclass
class ScoreSweep:
    """Everything needed for exact threshold sweeps: positives + per-slot negative counts.

    The curve's x is the FPR (negatives at or above the threshold / all negatives), y is the
    summed weight of positives at or above the threshold divided by ``num_units``. Walking
    the scores downwards, the slots come as: the gap above every positive score, then pairs
    (k-th highest positive score u_k, the gap just below it). Over a gap the curve is flat at
    height ``after_k``; over u_k it is a straight segment from ``before_k`` to ``after_k``.
    """

    positives: PositiveScores
    num_units: int
    slot_counts: np.ndarray  # (2U+1,) ascending slots
    gap_min: np.ndarray | None = None
    gap_max: np.ndarray | None = None

    @property
    def num_negatives(self) -> int:
        return int(self.slot_counts.sum(dtype=np.int64))

    @property
    def num_positive_pixels(self) -> int:
        return int(self.positives.counts.sum(dtype=np.int64))

    def max_score(self) -> float:
        """Highest score of the data set (needs ``gap_max`` when negatives top it)."""
        highest = float(self.positives.scores[-1]) if self.positives.scores.size else -np.inf
        if self.gap_max is not None:
            highest = max(highest, float(self.gap_max[-1]))
        return highest

    def summarize(self, limits: Sequence[float] = (), *, curve: bool = False,
                  block_size: int = 1 << 18) -> SweepSummary:
        """Areas at the limits, Mann-Whitney AUC, best F1 and (optionally) the curve.

        One walk over the slots in blocks of ``block_size`` positive scores, so the extra
        memory is O(block) (plus the curve, when asked for). Areas: exact trapezoid rule
        with linear interpolation at the limit (as ``generic_util.trapezoid``), divided by
        the limit. F1: positive = score > threshold; among equal F1 the highest threshold.
        """
        if curve and (self.gap_min is None or self.gap_max is None):
            raise RuntimeError("a curve needs a sweep built with track_extremes=True")
        scores_desc = self.positives.scores[::-1]
        counts_desc = self.positives.counts[::-1]
        weights_desc = self.positives.weights[::-1]
        negatives_desc = self.slot_counts[::-1]
        gap_negatives = negatives_desc[0::2]  # (U+1,): gap 0 on top, gap k+1 below u_k
        tie_negatives = negatives_desc[1::2]  # (U,)
        gap_min_desc = self.gap_min[::-1] if self.gap_min is not None else None
        gap_max_desc = self.gap_max[::-1] if self.gap_max is not None else None
        num_unique = scores_desc.size
        total_negatives = self.num_negatives
        total_positives = self.num_positive_pixels
        units = self.num_units

        # state after the top gap (height 0, no positive above it)
        counted_negatives = int(gap_negatives[0])
        area = 0.0  # in (negative pixels x height)
        cumulative_weight = 0.0
        height = 0.0
        counted_positives = 0
        auc_numerator = 0  # sum over negatives of 2 * (#positives above) + #positives tied
        exact_auc = 2 * total_positives * total_negatives < 2**62
        best_f1, best_index = -1.0, -1

        areas: dict[float, float | None] = {}
        pending = []
        for limit in limits:
            if total_negatives == 0 or units == 0:
                areas[limit] = None
            elif limit * total_negatives <= counted_negatives:
                areas[limit] = 0.0  # the limit falls in the top gap, where the curve is 0
            else:
                pending.append(limit)

        curve_parts: list[tuple[np.ndarray, ...]] = []
        if curve and counted_negatives:
            assert gap_min_desc is not None and gap_max_desc is not None
            curve_parts.append((np.array([counted_negatives], dtype=np.int64), np.zeros(1),
                                np.array([gap_min_desc[0]], dtype=np.float64),
                                np.array([gap_max_desc[0]], dtype=np.float64)))

        for start in range(0, num_unique, block_size):
            stop = min(start + block_size, num_unique)
            # heights before / after each u_k in this block (cumsum continues the global one)
            cumulative = np.cumsum(np.concatenate(([cumulative_weight],
                                                   weights_desc[start:stop])))
            cumulative_weight = float(cumulative[-1])
            after = (np.minimum(cumulative[1:] / units, 1.0) if units
                     else np.zeros(stop - start))
            before = np.concatenate(([height], after[:-1]))
            height = float(after[-1])
            del cumulative
            ties = tie_negatives[start:stop].astype(np.int64)
            gaps = gap_negatives[start + 1:stop + 1].astype(np.int64)
            gap_end = counted_negatives + np.cumsum(ties + gaps)
            tie_end = gap_end - gaps
            tie_areas = 0.5 * (before + after) * ties
            gap_areas = after * gaps
            pair_area_end = area + np.cumsum(tie_areas + gap_areas)

            still_pending = []
            for limit in pending:
                target = limit * total_negatives
                if target > gap_end[-1]:
                    still_pending.append(limit)
                    continue
                pair = int(np.searchsorted(gap_end, target, side="left"))
                if tie_end[pair] >= target:  # the limit falls on the segment over u_k
                    done = float(pair_area_end[pair - 1]) if pair else area
                    x0 = float(tie_end[pair] - ties[pair])
                    x1 = float(tie_end[pair])
                    y0, y1 = float(before[pair]), float(after[pair])
                else:  # on the flat gap below u_k
                    done = float(pair_area_end[pair] - gap_areas[pair])
                    x0, x1 = float(tie_end[pair]), float(gap_end[pair])
                    y0 = y1 = float(after[pair])
                step = target - x0
                y_at_limit = y0 + (y1 - y0) * step / (x1 - x0) if x1 > x0 else y1
                areas[limit] = (done + 0.5 * (y_at_limit + y0) * step) / total_negatives / limit
            pending = still_pending

            block_counts = counts_desc[start:stop].astype(np.int64)
            positives_after = counted_positives + np.cumsum(block_counts)
            positives_before = positives_after - block_counts
            if exact_auc:
                auc_numerator += int(np.dot(ties, 2 * positives_before + block_counts))
                auc_numerator += int(np.dot(gaps, 2 * positives_after))
            else:
                auc_numerator += float(np.dot(ties.astype(np.float64),
                                              (2 * positives_before + block_counts)
                                              .astype(np.float64)))
                auc_numerator += float(np.dot(gaps.astype(np.float64),
                                              2.0 * positives_after.astype(np.float64)))
            if total_positives:
                f1 = 2.0 * positives_after / (positives_after + tie_end + total_positives)
                block_best = int(np.argmax(f1))
                if f1[block_best] > best_f1:
                    best_f1, best_index = float(f1[block_best]), start + block_best

            if curve:
                assert gap_min_desc is not None and gap_max_desc is not None
                kept_gap = gaps > 0
                size = stop - start
                x_points = np.empty(2 * size, dtype=np.int64)
                y_points = np.empty(2 * size)
                low = np.empty(2 * size)
                high = np.empty(2 * size)
                x_points[0::2], x_points[1::2] = tie_end, gap_end
                y_points[0::2], y_points[1::2] = after, after
                low[0::2] = high[0::2] = scores_desc[start:stop]
                low[1::2] = gap_min_desc[start + 1:stop + 1]
                high[1::2] = gap_max_desc[start + 1:stop + 1]
                keep = np.ones(2 * size, dtype=bool)
                keep[1::2] = kept_gap
                curve_parts.append((x_points[keep], y_points[keep], low[keep], high[keep]))

            counted_negatives = int(gap_end[-1])
            area = float(pair_area_end[-1])
            counted_positives = int(positives_after[-1])

        auc = None
        if total_positives and total_negatives:
            auc = auc_numerator / (2 * total_positives * total_negatives)
        f1_value = f1_threshold = None
        if best_index >= 0:
            f1_value = best_f1
            next_index = best_index + 1
            next_lower = float(scores_desc[next_index]) if next_index < num_unique else -np.inf
            if gap_max_desc is not None:
                f1_threshold = max(next_lower, float(gap_max_desc[next_index]))
            else:  # no extremes tracked: the float64 just below u (same decisions)
                f1_threshold = float(np.nextafter(float(scores_desc[best_index]), -np.inf))
        curve_arrays = None
        if curve:
            if curve_parts:
                x_all, y_all, low_all, high_all = (np.concatenate(part) for part in
                                                   zip(*curve_parts))
            else:
                x_all, y_all, low_all, high_all = (np.empty(0, np.int64), np.empty(0),
                                                   np.empty(0), np.empty(0))
            fpr = x_all / total_negatives if total_negatives else np.zeros(x_all.size)
            np.minimum(fpr, 1.0, out=fpr)
            exclusive = np.append(high_all[1:], -np.inf)
            curve_arrays = (fpr, y_all, low_all, exclusive)
        return SweepSummary(areas=areas, auc=auc, f1=f1_value, f1_threshold=f1_threshold,
                            curve=curve_arrays)

    # convenience wrappers
    def normalized_areas(self, limits: Sequence[float]) -> dict[float, float | None]:
        """``{limit: area up to limit / limit}``; None without negatives or units."""
        return self.summarize(limits).areas

    def mann_whitney_auc(self) -> float | None:
        """P(positive score > negative score) + 0.5 P(equal), from integer counts."""
        return self.summarize().auc

    def curve_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Compact exact curve: (fpr, y, inclusive threshold, exclusive threshold).

        One point after every distinct positive score and after every non-empty gap (a gap
        holding several distinct negative-only scores is a horizontal segment: its inner
        points are collinear and left out). Inclusive threshold: the lowest score counted
        (positive = score >= t); exclusive threshold: the highest score not counted
        (positive = score > t), -inf when all are counted.
        """
        summary = self.summarize(curve=True)
        assert summary.curve is not None
        return summary.curve

    def f1_max(self) -> tuple[float | None, float | None]:
        """Best F1 (positive = score > threshold) and the threshold: the highest observed
        score below the lowest detected defect score (-inf: flag everything)."""
        summary = self.summarize()
        return summary.f1, summary.f1_threshold


def build_sweep(accumulator: PositiveAccumulator, negative_batches: Iterable[np.ndarray],
                track_extremes: bool) -> ScoreSweep:
    """Finish pass 1 and run pass 2 over ``negative_batches`` (one array per image)."""
    positives = accumulator.finish()
    counter = NegativeSlotCounter(positives.scores, track_extremes, accumulator.num_negatives)
    for negative_scores in negative_batches:
        counter.add(negative_scores)
    sweep = ScoreSweep(positives, accumulator.num_units, counter.slot_counts,
                       counter.gap_min, counter.gap_max)
    if sweep.num_negatives != accumulator.num_negatives:
        raise ValueError(
            "the maps or masks changed between the two passes over the data "
            f"({accumulator.num_negatives} defect-free pixels in pass 1, "
            f"{sweep.num_negatives} in pass 2); give a sequence that loads the same data again"
        )
    return sweep


def exact_curve_points(accumulator: PositiveAccumulator,
                       negative_batches: Iterable[np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The uncompressed curve: one point per distinct score of the data set.

    Returns ``(fpr, y, scores)`` in descending score order, point i = every pixel with
    ``score >= scores[i]`` positive (the official point list without its added end points).
    Memory grows with the number of distinct defect-free scores: for reproduction and
    small data sets; the compact curve of :meth:`ScoreSweep.curve_points` has the same shape.
    """
    positives = accumulator.finish()
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_size = 0
    merged_values = np.empty(0, dtype=positives.scores.dtype)
    merged_counts = np.empty(0, dtype=np.int64)

    def merge(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(values, kind="stable")
        values, counts = values[order], counts[order]
        if not values.size:
            return values, counts
        starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        return values[starts], np.add.reduceat(counts, starts)

    for negative_scores in negative_batches:
        values = np.sort(negative_scores, axis=None)
        if not values.size:
            continue
        starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        counts = np.diff(np.append(starts, values.size)).astype(np.int64)
        pending.append((values[starts], counts))
        pending_size += starts.size
        if pending_size > 4 * max(merged_values.size, 1 << 20):
            merged_values, merged_counts = merge(
                np.concatenate([merged_values] + [v for v, _ in pending]),
                np.concatenate([merged_counts] + [c for _, c in pending]))
            pending, pending_size = [], 0
    merged_values, merged_counts = merge(
        np.concatenate([merged_values] + [v for v, _ in pending]),
        np.concatenate([merged_counts] + [c for _, c in pending]))
    if int(merged_counts.sum()) != accumulator.num_negatives:
        raise ValueError("the maps or masks changed between the two passes over the data")

    scores = np.union1d(positives.scores, merged_values)
    weights = np.zeros(scores.size)
    weights[np.searchsorted(scores, positives.scores)] = positives.weights
    negatives = np.zeros(scores.size, dtype=np.int64)
    negatives[np.searchsorted(scores, merged_values)] = merged_counts
    total_negatives = int(merged_counts.sum())
    fpr = (np.cumsum(negatives[::-1]) / total_negatives if total_negatives
           else np.zeros(scores.size))
    units = accumulator.num_units
    y = np.cumsum(weights[::-1]) / units if units else np.zeros(scores.size)
    np.minimum(fpr, 1.0, out=fpr)
    np.minimum(y, 1.0, out=y)
    return fpr, y, scores[::-1].astype(np.float64)


def _pixel_passes(anomaly_maps: MapCollection, masks: MapCollection, *, regions: bool
                  ) -> tuple[PositiveAccumulator, Iterator[np.ndarray]]:
    """Pass 1 (regions, positives) done; returns it with a generator for pass 2."""
    maps_seq = as_reiterable(anomaly_maps, "anomaly_maps")
    masks_seq = as_reiterable(masks, "masks")
    accumulator = PositiveAccumulator()
    for _, score_map, mask in _iter_maps_and_masks(maps_seq, masks_seq):
        accumulator.see_map(score_map)
        if mask is None:
            accumulator.num_negatives += score_map.size
            continue
        if regions:
            labeled, num_regions = ndimage.label(mask, structure=EIGHT_CONNECTIVITY)
            region_sizes = np.bincount(labeled.ravel())
            weights = 1.0 / region_sizes[labeled[mask]]
            accumulator.num_units += num_regions
            del labeled
            accumulator.add(score_map[mask], weights)
        else:
            accumulator.add(score_map[mask])
        accumulator.num_negatives += score_map.size - int(np.count_nonzero(mask))

    def negatives() -> Iterator[np.ndarray]:
        for _, score_map, mask in _iter_maps_and_masks(maps_seq, masks_seq):
            yield score_map if mask is None else score_map[~mask]

    return accumulator, negatives()


def _pixel_sweep(anomaly_maps: MapCollection, masks: MapCollection, *, regions: bool,
                 track_extremes: bool) -> ScoreSweep:
    """Two passes: regions / positives first, then defect-free pixels counted per slot."""
    accumulator, negatives = _pixel_passes(anomaly_maps, masks, regions=regions)
    return build_sweep(accumulator, negatives, track_extremes)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProCurve:
    """Exact PRO curve (official MVTec AD convention), compact.

    Attributes:
        fpr: (K,) float64 false positive rates, non-decreasing, from 0 to 1.
        pro: (K,) float64 per-region overlap, non-decreasing, from 0 to 1.
        thresholds: (K,) float64; point i is reached when pixels with
            ``score >= thresholds[i]`` are positive (+inf for the leading (0, 0), -inf for
            the trailing (1, 1)).

    As in the official output, (0, 0) is prepended and (1, 1) appended even when already
    present. Points inside a run of defect-free-only scores lie on one horizontal segment and
    are merged, so ``K`` can be smaller than "distinct scores + 2"; areas are identical.
    """

    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray

    def area(self, limit: float) -> float:
        """Area up to FPR ``limit`` divided by ``limit`` (the AUPRO at that limit)."""
        return trapezoid_area(self.fpr, self.pro, limit) / limit


@dataclass(frozen=True)
class PixelMetrics:
    """All pixel-level metrics of one data set (see :func:`pixel_metrics`)."""

    auroc: float | None
    aupro: dict[float, float | None]
    f1_max: float | None
    f1_threshold: float | None  # positive = score > threshold
    pro_curve: ProCurve | None
    num_regions: int
    num_defect_pixels: int
    num_defect_free_pixels: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the curve arrays)."""
        return {
            "pixel_auroc": self.auroc,
            "aupro": {str(limit): value for limit, value in self.aupro.items()},
            "pixel_f1_max": self.f1_max,
            "pixel_f1_threshold": self.f1_threshold,
            "num_regions": self.num_regions,
            "num_defect_pixels": self.num_defect_pixels,
            "num_defect_free_pixels": self.num_defect_free_pixels,
        }


def trapezoid_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve through (x, y) from x[0] to ``x_max``.

    ``x`` ascending (repeats allowed). If ``x_max`` falls between two points, y is
    interpolated linearly there - the rule of the official ``generic_util.trapezoid``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not x.size or not x[0] <= x_max <= x[-1]:
        raise ValueError(f"x_max={x_max} outside the curve's range")
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.sum(0.5 * (y[1:inside] + y[:inside - 1]) * np.diff(x[:inside])))
    if inside < x.size and x[inside - 1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y_at + y0) * (x_max - x0)
    return area


def _pro_curve_from_points(points: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
                           ) -> ProCurve:
    fpr, pro, inclusive, _ = points
    return ProCurve(
        fpr=np.concatenate(([0.0], fpr, [1.0])),
        pro=np.concatenate(([0.0], pro, [1.0])),
        thresholds=np.concatenate(([np.inf], inclusive, [-np.inf])),
    )


def pixel_auroc(anomaly_maps: MapCollection, masks: MapCollection) -> float | None:
    """Pixel AUROC pooled over all images (Mann-Whitney, ties one half), exact.

    Args:
        anomaly_maps: N maps of shape (H_i, W_i), higher = more anomalous (arrays or
            zero-argument loaders; sizes may differ between images).
        masks: N masks of the same shapes, defect = value != 0; None = defect-free image.

    Returns:
        The AUROC in [0, 1], or None when there is no defect pixel or no defect-free pixel.
    """
    sweep = _pixel_sweep(anomaly_maps, masks, regions=False, track_extremes=False)
    return sweep.mann_whitney_auc()


def aupro(anomaly_maps: MapCollection, masks: MapCollection,
          limits: Iterable[float] = DEFAULT_PRO_LIMITS) -> dict[float, float | None]:
    """AUPRO at each FPR limit, exactly as the official MVTec AD evaluation defines it.

    Args:
        anomaly_maps: N maps (H_i, W_i); masks: N masks of the same shapes (value != 0 =
            defect, None = defect-free image). See the module docstring.
        limits: FPR integration limits in (0, 1].

    Returns:
        ``{limit: area up to limit / limit}``; every value None when no image has a defect
        region or no pixel is defect-free (AUPRO undefined).
    """
    checked = validate_limits(limits)
    sweep = _pixel_sweep(anomaly_maps, masks, regions=True, track_extremes=False)
    return sweep.normalized_areas(checked)


def pro_curve(anomaly_maps: MapCollection, masks: MapCollection, *,
              merge_collinear: bool = True) -> ProCurve | None:
    """The exact PRO curve (for plotting); None when AUPRO is undefined. See :class:`ProCurve`.

    Args:
        anomaly_maps, masks: as for :func:`aupro`.
        merge_collinear: True (default): compact curve in bounded memory, points inside
            runs of defect-free-only scores merged (same shape, same areas). False: one point
            per distinct score plus (0, 0) and (1, 1), exactly the official point list;
            memory then grows with the number of distinct defect-free scores.
    """
    if merge_collinear:
        sweep = _pixel_sweep(anomaly_maps, masks, regions=True, track_extremes=True)
        if sweep.num_units == 0 or sweep.num_negatives == 0:
            return None
        return _pro_curve_from_points(sweep.curve_points())
    accumulator, negatives = _pixel_passes(anomaly_maps, masks, regions=True)
    if accumulator.num_units == 0 or accumulator.num_negatives == 0:
        return None
    fpr, pro, scores = exact_curve_points(accumulator, negatives)
    return ProCurve(
        fpr=np.concatenate(([0.0], fpr, [1.0])),
        pro=np.concatenate(([0.0], pro, [1.0])),
        thresholds=np.concatenate(([np.inf], scores, [-np.inf])),
    )


def pixel_f1_max(anomaly_maps: MapCollection, masks: MapCollection
                 ) -> tuple[float | None, float | None]:
    """Best pixel F1 over every threshold, pooled over all pixels, and its threshold.

    Returns:
        ``(f1, threshold)`` with positive = ``score > threshold``; the threshold is an
        observed score (the highest one below the lowest detected defect score; -inf when
        flagging every pixel is best). ``(None, None)`` when there is no defect pixel.
    """
    sweep = _pixel_sweep(anomaly_maps, masks, regions=False, track_extremes=True)
    return sweep.f1_max()


def pixel_metrics(anomaly_maps: MapCollection, masks: MapCollection,
                  limits: Iterable[float] = DEFAULT_PRO_LIMITS, *,
                  with_curve: bool = True) -> PixelMetrics:
    """Pixel AUROC, AUPRO at every limit, pixel F1-max and the PRO curve in two passes.

    Same definitions as :func:`pixel_auroc`, :func:`aupro`, :func:`pixel_f1_max` and
    :func:`pro_curve`; cheaper than calling them one by one (each reads the data twice).
    ``with_curve=False`` leaves the curve out (``pro_curve`` None).
    """
    checked = validate_limits(limits)
    sweep = _pixel_sweep(anomaly_maps, masks, regions=True, track_extremes=True)
    defined = sweep.num_units > 0 and sweep.num_negatives > 0
    summary = sweep.summarize(checked, curve=with_curve and defined)
    return PixelMetrics(
        auroc=summary.auc,
        aupro=summary.areas,
        f1_max=summary.f1,
        f1_threshold=summary.f1_threshold,
        pro_curve=_pro_curve_from_points(summary.curve) if summary.curve is not None else None,
        num_regions=sweep.num_units,
        num_defect_pixels=sweep.num_positive_pixels,
        num_defect_free_pixels=sweep.num_negatives,
    )


def pixel_classification_at_threshold(anomaly_maps: MapCollection, masks: MapCollection,
                                      threshold: float) -> dict[str, float | int | None]:
    """Pixel precision / recall / accuracy / F1 with positive = ``score > threshold``.

    One pass; returns the same keys as :func:`defectlens.metrics.image.classification_at_threshold`
    (``precision, recall, accuracy, f1, tp, fp, tn, fn``; undefined ratios are None).
    """
    maps_seq = as_reiterable(anomaly_maps, "anomaly_maps")
    masks_seq = as_reiterable(masks, "masks")
    tp = fp = tn = fn = 0
    for _, score_map, mask in _iter_maps_and_masks(maps_seq, masks_seq):
        predicted = score_map > threshold
        if mask is None:
            flagged = int(np.count_nonzero(predicted))
            fp += flagged
            tn += score_map.size - flagged
            continue
        hits = int(np.count_nonzero(predicted & mask))
        defects = int(np.count_nonzero(mask))
        flagged = int(np.count_nonzero(predicted))
        tp += hits
        fn += defects - hits
        fp += flagged - hits
        tn += score_map.size - defects - (flagged - hits)
    return counts_summary(tp=tp, fp=fp, tn=tn, fn=fn)
