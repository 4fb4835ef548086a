"""Peak memory and time of exact pixel AUROC + AUPRO on a large, lazily generated data set.

Default: 500 anomaly maps of 1024 x 1024 float32 (2 GiB of scores in all, never held at
once), one third of them defect-free, the others with 1-3 elliptical defects; maps and masks
are regenerated on demand from a seed (``SyntheticMaps`` / ``SyntheticMasks`` are sequences
whose ``__getitem__`` builds item i), so the benchmark itself holds one map at a time.

    .venv/bin/python benchmarks/metrics_memory.py                 # the full benchmark
    .venv/bin/python benchmarks/metrics_memory.py --images 40 --size 256 --verify

``--verify`` also computes the metrics the naive way (all scores in memory, one global sort
in float64, as the official MVTec AD code does) and prints the differences; only for small
settings. Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of this process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence

import cv2
import numpy as np

from defectlens.metrics import pixel_metrics


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


BLOB_SCALE = 1.0  # --blob-scale: multiplies the defects' half-axes


def _ellipses(index: int, seed: int, size: int
              ) -> list[tuple[tuple[int, int], tuple[int, int], float, float]]:
    """Defects of image ``index``: (centre, half-axes, angle, strength); none for every 3rd."""
    rng = np.random.default_rng([seed, index, 0])
    if index % 3 == 0:
        return []
    scale = size / 1024.0 * BLOB_SCALE
    defects = []
    for _ in range(int(rng.integers(1, 4))):
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (max(1, int(rng.integers(6, 70) * scale)), max(1, int(rng.integers(6, 70) * scale)))
        defects.append((centre, axes, float(rng.uniform(0, 180)), float(rng.uniform(0.05, 1.2))))
    return defects


def make_mask(index: int, seed: int, size: int) -> np.ndarray:
    """(size, size) uint8 mask, 255 = defect."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for centre, axes, angle, _ in _ellipses(index, seed, size):
        cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, thickness=-1)
    return mask


def make_map(index: int, seed: int, size: int) -> np.ndarray:
    """(size, size) float32 scores: smooth background + pixel noise + a bump per defect."""
    rng = np.random.default_rng([seed, index, 1])
    coarse = rng.random((17, 17), dtype=np.float32)
    scores = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    scores += 0.25 * rng.random((size, size), dtype=np.float32)
    for centre, axes, angle, strength in _ellipses(index, seed, size):
        bump = np.zeros((size, size), dtype=np.uint8)
        cv2.ellipse(bump, centre, axes, angle, 0, 360, 1, thickness=-1)
        scores += strength * cv2.blur(bump.astype(np.float32), (9, 9))
    return scores


class SyntheticMaps(Sequence):
    """Lazy, deterministic anomaly maps: item i is generated when accessed."""

    def __init__(self, count: int, size: int, seed: int) -> None:
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        return make_map(index, self.seed, self.size)


class SyntheticMasks(SyntheticMaps):
    """Lazy masks matching :class:`SyntheticMaps` with the same arguments."""

    def __getitem__(self, index):  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        return make_mask(index, self.seed, self.size)


def naive_reference(maps: Sequence, masks: Sequence, limits: Sequence[float]) -> dict:
    """Everything in memory: global sort in float64 (for --verify on small settings)."""
    from scipy import ndimage
    from sklearn.metrics import roc_auc_score

    scores, fp_change, pro_change, labels = [], [], [], []
    num_regions = 0
    for score_map, mask in zip(maps, masks):
        labeled, count = ndimage.label(mask != 0, structure=np.ones((3, 3), dtype=int))
        sizes = np.bincount(labeled.ravel())
        change = np.zeros(labeled.shape)
        change[labeled > 0] = 1.0 / sizes[labeled[labeled > 0]]
        scores.append(score_map.ravel())
        fp_change.append((labeled == 0).ravel())
        pro_change.append(change.ravel())
        labels.append((mask != 0).ravel())
        num_regions += count
    flat = np.concatenate(scores)
    order = np.argsort(flat, kind="stable")[::-1]
    flat = flat[order]
    fpr = np.cumsum(np.concatenate(fp_change)[order]) / np.concatenate(fp_change).sum()
    pro = np.cumsum(np.concatenate(pro_change)[order]) / num_regions
    keep = np.append(np.diff(flat) != 0, True)
    fpr = np.concatenate(([0.0], np.minimum(fpr[keep], 1), [1.0]))
    pro = np.concatenate(([0.0], np.minimum(pro[keep], 1), [1.0]))
    result = {"pixel_auroc": float(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))}
    for limit in limits:
        inside = int(np.searchsorted(fpr, limit, side="right"))
        area = float(np.sum(0.5 * (pro[1:inside] + pro[:inside - 1]) * np.diff(fpr[:inside])))
        if inside < fpr.size and fpr[inside - 1] < limit:
            x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
            area += 0.5 * (y0 + (y1 - y0) * (limit - x0) / (x1 - x0) + y0) * (limit - x0)
        result[limit] = area / limit
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blob-scale", type=float, default=1.0,
                        help="multiply the defects' half-axes (area grows with its square)")
    parser.add_argument("--verify", action="store_true",
                        help="compare with an in-memory float64 computation (small settings)")
    args = parser.parse_args(argv)
    global BLOB_SCALE
    BLOB_SCALE = args.blob_scale

    limits = (0.3, 0.1, 0.05, 0.01, 1.0)
    maps = SyntheticMaps(args.images, args.size, args.seed)
    masks = SyntheticMasks(args.images, args.size, args.seed)
    rss_before = _peak_rss_mib()

    start = time.perf_counter()
    result = pixel_metrics(maps, masks, limits, with_curve=False)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()

    report = {
        "images": args.images,
        "size": args.size,
        "pixels": args.images * args.size * args.size,
        "blob_scale": args.blob_scale,
        "defect_pixels": result.num_defect_pixels,
        "defect_pixel_fraction": round(result.num_defect_pixels / (args.images * args.size**2), 4),
        "regions": result.num_regions,
        "pixel_auroc": result.auroc,
        "aupro": {str(limit): result.aupro[limit] for limit in limits},
        "seconds": round(seconds, 2),
        "peak_rss_mib_before": round(rss_before, 1),
        "peak_rss_mib": round(peak, 1),
        "float32_scores_mib_if_held": round(args.images * args.size * args.size * 4 / 2**20, 1),
    }
    if args.verify:
        reference = naive_reference(list(maps), list(masks), limits)
        report["max_abs_diff_vs_naive"] = {
            "pixel_auroc": abs(reference["pixel_auroc"] - (result.auroc or 0.0)),
            "aupro": max(abs(reference[limit] - (result.aupro[limit] or 0.0)) for limit in limits),
        }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
