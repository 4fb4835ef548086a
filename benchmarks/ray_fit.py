"""Sharded fit on a local two-node Ray cluster against the single-process fit.

    flock /tmp/defectlens-cpu.lock nice -n 5 .venv/bin/python benchmarks/ray_fit.py --out /tmp/defectlens-ray-fit
    # a small run (2 shared cores): --train-images 40 --image-size 128 --transistor-coreset 1000

1. PaDiM (transistor, 256 px, d = 100, full / tied / global): float64 statistics of 4 shards
   merged vs one pass (max abs difference of means, Ledoit-Wolf covariances, precisions), then
   `distributed.fit(shards=4)` vs `Detector.fit` end to end (float32 model, threshold, scores
   of all 100 test images).
2. Sequential PatchCore, 4 shards vs one process: transistor (M = 10 000) and two PIPED classes
   (M = 1 000): image and pixel AUROC.
3. Greedy PatchCore (coreset ratio 0.1), 4 shards (oversample 1 and 2) vs one process:
   AUROCs, bank size and the k-center radius (largest distance of a training patch to the bank).

Single-process fits run on one thread, like the 1-CPU workers (features are then identical).
Writes OUT/summary.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from defectlens import distributed
from defectlens.detector import Detector
from defectlens.distributed.cluster import LocalCluster
from defectlens.distributed.fit import shard_indices
from defectlens.evaluation import evaluate
from defectlens.ops.gaussian import precision_from_covariance
from defectlens.ops.memory_bank import flatten_patches
from defectlens.ops.moments import GaussianMoments
from defectlens.samples import FitData

SHARDS = 4


def _timed(function: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def _aurocs(detector: Detector, root: Path) -> dict[str, float]:
    report = evaluate(detector, root)
    return {"image_auroc": round(100 * report["image"]["auroc"], 2), "pixel_auroc": round(100 * report["pixel"]["auroc"], 2)}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _train(root: Path, limit: int) -> list[Path]:
    """The category's training images (the first ``limit``; 0: all)."""
    paths = sorted((root / "train" / "good").glob("*.png"))
    return paths[:limit] if limit else paths


def padim(root: Path, limit: int, image_size: int, covariances: list[str]) -> dict[str, Any]:
    train = _train(root, limit)
    test = sorted((root / "test").glob("*/*.png"))
    results: dict[str, Any] = {}
    features = None
    for covariance in covariances:
        options = dict(method="padim", covariance=covariance, image_size=image_size, seed=0)
        single, single_seconds = _timed(lambda: Detector(**options).fit(train))
        sharded, sharded_seconds = _timed(lambda: distributed.fit(Detector(**options), train, shards=SHARDS))
        # float64 statistics: one pass vs 4 shards merged, on the same features
        if features is None:
            features = FitData(train, single.preparation, single.encode, single.batch_size).joined().x
        method = single.method
        whole = method.gaussian_moments(features)
        merged = GaussianMoments.merge_all(method.gaussian_moments(features[block]) for block in shard_indices(len(train), SHARDS))
        if covariance == "tied":
            covariances = whole.pooled().ledoit_wolf(), merged.pooled().ledoit_wolf()
        else:
            covariances = whole.ledoit_wolf(), merged.ledoit_wolf()
        precisions = [precision_from_covariance(c) for c in covariances]
        expected_scores = np.asarray([p.score for p in single.predict_batch(test)])
        scores = np.asarray([p.score for p in sharded.predict_batch(test)])
        state, sharded_state = single.method.state(), sharded.method.state()
        results[covariance] = {
            "float64_max_abs_diff": {
                "mean": _max_abs(whole.mean, merged.mean), "covariance": _max_abs(*covariances),
                "precision": _max_abs(*precisions),
                "precision_scale": float(np.abs(precisions[0]).max()), "covariance_scale": float(np.abs(covariances[0]).max()),
            },
            "model_float32_max_abs_diff": {name: float((sharded_state[name] - state[name]).abs().max()) for name in state},
            "threshold": [single.threshold, sharded.threshold],
            "test_scores_max_abs_diff": float(np.abs(scores - expected_scores).max()),
            "test_scores_max_rel_diff": float((np.abs(scores - expected_scores) / np.abs(expected_scores)).max()),
            "fit_seconds": {"single": round(single_seconds, 1), "sharded": round(sharded_seconds, 1)},
        }
        print(covariance, json.dumps(results[covariance]), flush=True)
    return results


def sequential(root: Path, size: int, image_size: int, limit: int) -> dict[str, Any]:
    options = dict(method="sequential_patchcore", coreset_size=size, epochs=3, augmentation="light", image_size=image_size, seed=0)
    train = _train(root, limit)
    single, single_seconds = _timed(lambda: Detector(**options).fit(train))
    sharded, sharded_seconds = _timed(lambda: distributed.fit(Detector(**options), train, shards=SHARDS))
    return {
        "single": {**_aurocs(single, root), "fit_seconds": round(single_seconds, 1)},
        "sharded": {**_aurocs(sharded, root), "fit_seconds": round(sharded_seconds, 1),
                    "shard_seconds": sharded.fit_info.method["distributed"]["shard_seconds"]},
        "coreset_size": size, "image_size": image_size, "train_images": len(train),
    }


def _radius(detector: Detector, features: torch.Tensor) -> float:
    """Largest distance from a training patch to its nearest bank vector (the k-center objective)."""
    patches = flatten_patches(features)
    distances, _ = detector.method.bank.search.query(patches, 1)
    return float(distances.max())


def greedy(root: Path, limit: int, image_size: int) -> dict[str, Any]:
    options = dict(method="patchcore", coreset_ratio=0.1, image_size=image_size, seed=0)
    train = _train(root, limit)
    single, single_seconds = _timed(lambda: Detector(**options).fit(train))
    features = FitData(train, single.preparation, single.encode, single.batch_size).joined().x
    results = {"single": {**_aurocs(single, root), "fit_seconds": round(single_seconds, 1),
                          "bank": int(single.method.memory_bank.shape[0]), "radius": _radius(single, features)}}
    for oversample in (1.0, 2.0):
        sharded, seconds = _timed(lambda: distributed.fit(Detector(**options), train, shards=SHARDS, greedy_oversample=oversample))
        results[f"sharded_oversample_{oversample:g}"] = {
            **_aurocs(sharded, root), "fit_seconds": round(seconds, 1), "bank": int(sharded.method.memory_bank.shape[0]),
            "radius": _radius(sharded, features),
        }
        print(oversample, json.dumps(results[f"sharded_oversample_{oversample:g}"]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--piped", default="PA_BRG01_RL,PA_FVN01_TL", help="PIPED classes")
    parser.add_argument("--parts", default="padim,sequential,greedy")
    parser.add_argument("--out", default="/tmp/defectlens-ray-fit")
    parser.add_argument("--train-images", type=int, default=0, help="first N training images of each category (0: all)")
    parser.add_argument("--image-size", type=int, default=256, help="transistor image size")
    parser.add_argument("--covariances", default="full,tied,global", help="PaDiM covariance models")
    parser.add_argument("--transistor-coreset", type=int, default=10_000, help="Sequential PatchCore M on transistor")
    parser.add_argument("--piped-coreset", type=int, default=1_000, help="Sequential PatchCore M on PIPED")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    transistor = data / "mvtec_ad" / "transistor"
    summary: dict[str, Any] = {}
    cluster = LocalCluster(nodes=2, cpus_per_node=1, object_store_megabytes=1000, temp_dir=out / "ray")
    cluster.start()
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        parts = args.parts.split(",")
        if "padim" in parts:
            summary["padim"] = padim(transistor, args.train_images, args.image_size, args.covariances.split(","))
        if "sequential" in parts:
            summary["sequential"] = {"transistor": sequential(transistor, args.transistor_coreset, args.image_size, args.train_images)}
            print(json.dumps(summary["sequential"]), flush=True)
            for name in [name for name in args.piped.split(",") if name]:
                summary["sequential"][name] = sequential(data / "piped" / name, args.piped_coreset, 128, args.train_images)
                print(name, json.dumps(summary["sequential"][name]), flush=True)
        if "greedy" in parts:
            summary["greedy"] = greedy(transistor, args.train_images, args.image_size)
    finally:
        ray.shutdown()
        cluster.stop()
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
