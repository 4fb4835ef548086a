"""From an image score and its anomaly map to a verdict a line can act on: OK, REVIEW, NOT OK.

Two thresholds from two target false-positive rates: OK at or below the review threshold,
NOT OK above the NOT OK threshold, REVIEW between (a single threshold: no REVIEW). Without
inspection rules the verdict is the image score against them. With rules (`rules`), the map
decides: pixels outside the inspected area are ignored; each zone has its threshold; a
connected region (8-neighbours) above its threshold is a *defect* when it is at least the
minimum area; NOT OK when there are more defects than allowed at the NOT OK thresholds,
REVIEW when there are at the review thresholds only. The image score is then the max of the
inspected map. Every verdict says why (`reasons`). Pure numpy: exports apply the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from defectlens.rules import InspectionRules

Verdict = Literal["OK", "REVIEW", "NOT OK"]
OK, REVIEW, NOT_OK = "OK", "REVIEW", "NOT OK"
_EIGHT_NEIGHBOURS = np.ones((3, 3), bool)


@dataclass
class Judgement:
    """A verdict, the image score it used, the defect mask and why.

    Attributes:
        verdict: "OK", "REVIEW" or "NOT OK".
        score: the image score (with rules: the max of the inspected map).
        mask: bool (H, W), pixels of defects at the NOT OK thresholds (with rules: only defects
            that count; without: map > NOT OK threshold).
        reasons: human-readable lines: which threshold or rule decided.
        defects: per defect at the NOT OK thresholds: area_px, bbox [x0, y0, x1, y1], peak, zone.
    """

    verdict: Verdict
    score: float
    mask: np.ndarray
    reasons: list[str] = field(default_factory=list)
    defects: list[dict[str, Any]] = field(default_factory=list)


def judge(
    score: float, anomaly_map: np.ndarray, threshold: float, review_threshold: float | None = None,
    rules: InspectionRules | None = None,
) -> Judgement:
    """The verdict of one image (its method score and its map at the prepared image's size)."""
    if review_threshold is not None and review_threshold >= threshold:
        review_threshold = None  # an override above the review threshold leaves one threshold
    if rules is None or rules.empty:
        return _by_score(score, anomaly_map, threshold, review_threshold)
    return _by_rules(anomaly_map, threshold, review_threshold, rules)


def _by_score(score: float, anomaly_map: np.ndarray, threshold: float, review: float | None) -> Judgement:
    mask = anomaly_map > threshold
    if score > threshold:
        return Judgement(NOT_OK, score, mask, [f"score {score:.4g} > NOT OK threshold {threshold:.4g}"])
    if review is not None and score > review:
        return Judgement(REVIEW, score, mask, [f"score {score:.4g} between review {review:.4g} and NOT OK {threshold:.4g}"])
    return Judgement(OK, score, mask, [f"score {score:.4g} <= {'review' if review is not None else 'NOT OK'} "
                                      f"threshold {review if review is not None else threshold:.4g}"])


def _thresholds(rules: InspectionRules, zones: np.ndarray, base: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel thresholds and minimum areas from the zones (zone k uses rules.zones[k - 1])."""
    values = np.full(zones.shape, base, np.float64)
    areas = np.full(zones.shape, rules.min_area_px, np.float64)
    for k, zone in enumerate(rules.zones, start=1):
        inside = zones == k
        values[inside] = zone.threshold if zone.threshold is not None else base * zone.threshold_scale
        if zone.min_area_px is not None:
            areas[inside] = zone.min_area_px
    return values, areas


def _defects(
    anomaly_map: np.ndarray, inspected: np.ndarray, zones: np.ndarray, rules: InspectionRules, base: float
) -> tuple[list[dict[str, Any]], np.ndarray, int]:
    """Defects (regions above their threshold and big enough), their mask, and how many regions
    were too small."""
    values, areas = _thresholds(rules, zones, base)
    labels, count = ndimage.label((anomaly_map > values) & inspected, structure=_EIGHT_NEIGHBOURS)
    defects, mask, small = [], np.zeros(anomaly_map.shape, bool), 0
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        pixels = labels[box] == index
        area = int(pixels.sum())
        needed = float(areas[box][pixels].max())
        if area < needed:
            small += 1
            continue
        local = np.where(pixels, anomaly_map[box], -np.inf)
        y, x = np.unravel_index(int(np.argmax(local)), local.shape)
        zone = int(zones[box][y, x])
        defects.append({
            "area_px": area, "bbox": [box[1].start, box[0].start, box[1].stop, box[0].stop],
            "peak": float(local[y, x]), "zone": rules.zones[zone - 1].name if zone else None,
        })
        mask[box] |= pixels
    return defects, mask, small


def _by_rules(anomaly_map: np.ndarray, threshold: float, review: float | None, rules: InspectionRules) -> Judgement:
    shape = anomaly_map.shape[:2]
    inspected = rules.inspected(shape)
    zones = rules.zone_index(shape)
    score = float(anomaly_map[inspected].max()) if inspected.any() else float("-inf")
    defects, mask, small = _defects(anomaly_map, inspected, zones, rules, threshold)
    reasons = []
    ignored = int(((anomaly_map > threshold) & ~inspected).sum())
    if ignored:
        reasons.append(f"{ignored} px above the threshold ignored (outside the inspected area)")
    if small:
        reasons.append(f"{small} region(s) above the threshold smaller than the minimum area ({rules.min_area_px:g} px)")
    allowed = rules.max_defect_count
    if len(defects) > allowed:
        largest = max(defects, key=lambda defect: defect["area_px"])
        where = f" in zone {largest['zone']!r}" if largest["zone"] else ""
        reasons.insert(0, f"{len(defects)} defect(s) > {allowed} allowed; largest {largest['area_px']} px at "
                          f"x={largest['bbox'][0]}, y={largest['bbox'][1]}{where}")
        return Judgement(NOT_OK, score, mask, reasons, defects)
    if review is not None:
        review_defects, _, _ = _defects(anomaly_map, inspected, zones, rules, review)
        if len(review_defects) > allowed:
            reasons.insert(0, f"{len(review_defects)} region(s) above the review threshold {review:.4g} "
                              f"(none counts at the NOT OK threshold {threshold:.4g})")
            return Judgement(REVIEW, score, mask, reasons, defects)
    reasons.insert(0, f"{len(defects)} defect(s), {allowed} allowed")
    return Judgement(OK, score, mask, reasons, defects)
