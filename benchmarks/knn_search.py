"""PatchCore nearest-neighbour search: brute force vs the pruned exact index (ops.exact_search).

Fit-like setup: PatchCore on train/good of an MVTec category (default transistor, 256 px,
EfficientNet-Lite0, greedy coreset 10 %), or a saved model (--model). Then, on test images:

* the search alone, ms per image (1024 query patches each at 256 px), batch 1 and batch 16,
  brute force and pruned; how many bank rows each query touches at each level of the pruning;
  and whether the answers are identical (same rows, ties aside; distances to float32 round-off);
* PatchCore end to end (``Detector.predict_batch``, batch_size 1 and 16), both algorithms.

    .venv/bin/python benchmarks/knn_search.py                       # fits transistor (~1-2 min)
    .venv/bin/python benchmarks/knn_search.py --save-model /tmp/t.dlens
    .venv/bin/python benchmarks/knn_search.py --model /tmp/t.dlens --images 32 --repeats 5
    .venv/bin/python benchmarks/knn_search.py --threads 2 --json out.json

Times are the best of --repeats (wall clock, after one warm-up); the load average is printed
because a loaded machine makes every number slower.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defectlens.detector import Detector
from defectlens.ops import exact_search
from defectlens.ops.knn import NearestNeighbours

DEFAULT_DATA = Path(os.environ.get("DEFECTLENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _load_images(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]


def _features(detector: Detector, images: list[np.ndarray]) -> torch.Tensor:
    """Query patches (N * h * w, C) of the images, as the detector's backbone sees them."""
    from defectlens.backbones import FeatureExtractor

    extractor = FeatureExtractor(detector.backbone, detector.layers)
    size = tuple(detector.image_size)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), 16):
            batch = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images[start : start + 16]])
            batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
            feats = extractor(batch)
            out.append(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))
    return torch.cat(out)


def _scorer(detector: Detector):
    """The object holding the method's NearestNeighbours (``_search``)."""
    for holder in (getattr(detector.method, "bank", None), detector.method):
        if holder is not None and hasattr(holder, "_search"):
            return holder
    raise SystemExit("this detector's method has no nearest-neighbour search (PatchCore expected)")


def _best_ms(fn, repeats: int, images: int) -> tuple[float, float]:
    """(best, median) wall ms per image of fn() over repeats, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000 / images)
    return min(times), float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "mvtec_ad" / "transistor")
    parser.add_argument("--model", type=Path, help="a saved PatchCore model (skips the fit)")
    parser.add_argument("--save-model", type=Path, help="save the fitted model here")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--images", type=int, default=32, help="test images timed (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--no-end-to-end", action="store_true", help="time the search alone")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not exact_search.available():
        raise SystemExit("numba is not installed: only brute force is available")

    if args.model:
        detector = Detector.load(args.model)
    else:
        detector = Detector(method="patchcore", image_size=args.image_size, coreset_ratio=args.coreset_ratio)
        start = time.perf_counter()
        detector.fit(args.data)
        print(f"fit: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if args.save_model:
            detector.save(args.save_model)
    holder = _scorer(detector)
    bank = holder.memory_bank if hasattr(holder, "memory_bank") else detector.method.memory_bank
    every = sorted((args.data / "test").glob("*/*.png"))  # good and defective, spread evenly
    paths = [every[i] for i in np.linspace(0, len(every) - 1, min(args.images, len(every))).astype(int)]
    images = _load_images(paths)
    queries = _features(detector, images)
    per_image = queries.shape[0] // len(images)

    brute = NearestNeighbours(bank, algorithm="brute_force")
    start = time.perf_counter()
    pruned = NearestNeighbours(bank, algorithm="pruned")
    pruned.index
    build_s = time.perf_counter() - start
    pruned.query(queries[:16])  # compiles the kernel on first use in a fresh install (cached)

    results: dict = {
        "bank": list(bank.shape), "queries_per_image": per_image, "images": len(images),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "index_build_s": round(build_s, 2), "index_cells": pruned.index.num_cells,
        "index_mib": round(pruned.index.memory_bytes / 2**20, 1),
    }
    # identical answers?
    bd, bi = brute.query(queries)
    pd, pi = pruned.query(queries)
    differ = bi[:, 0] != pi[:, 0]
    truth = torch.linalg.vector_norm(queries.double()[:, None, :] - bank.double()[torch.stack([bi[:, 0], pi[:, 0]], 1)], dim=2)
    ties = int((differ & ((truth[:, 0] - truth[:, 1]).abs() <= 1e-5 * truth[:, 0])).sum())
    results["identical"] = {
        "queries": int(queries.shape[0]),
        "different_rows": int(differ.sum()),
        "of_which_ties": ties,
        "max_relative_distance_difference": float(((pd - bd).abs() / bd.clamp_min(1e-12)).max()),
    }
    counts = pruned.index.last_counts
    m = bank.shape[0]
    results["pruning"] = {
        "rows_level1_per_query": round(float(counts[0]), 1), "level1_fraction": round(float(counts[0]) / m, 4),
        "rows_level2_per_query": round(float(counts[1]), 1), "level2_fraction": round(float(counts[1]) / m, 5),
        "exact_per_query": round(float(counts[2]), 1), "exact_fraction": round(float(counts[2]) / m, 6),
    }

    rows = []
    for batch in (1, 16):
        size = batch * per_image
        chunks = [queries[i : i + size] for i in range(0, queries.shape[0] - size + 1, size)]
        for name, search in (("brute_force", brute), ("pruned", pruned)):
            best, median = _best_ms(lambda: [search.query(c) for c in chunks], args.repeats, len(chunks) * batch)
            rows.append({"what": "search", "batch": batch, "algorithm": name, "ms_per_image": round(best, 1),
                         "median": round(median, 1)})
    if not args.no_end_to_end:
        for batch in (1, 16):
            detector.batch_size = batch
            for name, search in (("brute_force", brute), ("pruned", pruned)):
                holder._search = search
                best, median = _best_ms(lambda: detector.predict_batch(images), args.repeats, len(images))
                rows.append({"what": "predict_batch", "batch": batch, "algorithm": name,
                             "ms_per_image": round(best, 1), "median": round(median, 1)})
    results["timings"] = rows

    print(f"bank {m} x {bank.shape[1]}, {per_image} query patches per image, {len(images)} test images, "
          f"{results['threads']} threads, load average {', '.join(f'{x:.2f}' for x in results['load_average'])}")
    print(f"index: {results['index_cells']} cells, built in {build_s:.2f} s, {results['index_mib']} MiB")
    p = results["pruning"]
    print(f"pruning per query: level 1 (16-d) {p['rows_level1_per_query']} rows ({100 * p['level1_fraction']:.1f} %), "
          f"level 2 (64-d) {p['rows_level2_per_query']} ({100 * p['level2_fraction']:.2f} %), "
          f"exact {p['exact_per_query']} ({100 * p['exact_fraction']:.3f} %)")
    same = results["identical"]
    print(f"answers: {same['different_rows']} of {same['queries']} rows differ ({same['of_which_ties']} ties), "
          f"max relative distance difference {same['max_relative_distance_difference']:.1e}")
    print(f"\n{'what':<15}{'batch':>6}  {'algorithm':<12}{'ms/image':>10}{'median':>9}")
    for row in rows:
        print(f"{row['what']:<15}{row['batch']:>6}  {row['algorithm']:<12}{row['ms_per_image']:>10.1f}{row['median']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
