"""The PET-preform study's method table (its Tables II and III) on our data, small scale.

Protocol (the study's), per category:
    fit      20 normal images of train/good (a seeded draw); the supervised baseline also
             trains on a seeded fold of 20 labelled defective test images ("defect fold")
    evaluate the test set WITHOUT the defect fold, for every method alike, so no method is
             evaluated on an image the supervised baseline was trained on (printed and saved)
    report   image AUROC, pixel AUROC, AUPRO@0.3, fit seconds (decoding + features + training +
             calibration), ms/image at batch 1 (CPU, median of a few images after a warm-up),
             model file size in MB, training steps done

Training budgets: each trained method runs its own defaults, capped at ``--max-minutes`` of
training (and ``--max-steps`` if given); the steps actually done are reported. FCDD gets
``blur_sigma=0``: its receptive-field Gaussian (sigma 8) is its blur.

``--spade-growth 25,50,100,213``: SPADE's memory and time against the training-set size on
the first category, each size in a fresh subprocess (peak RSS is per process): gallery MB,
peak RSS MB, fit s, ms/image at batch 1.

    flock /tmp/defectlens-cpu.lock nice -n 10 .venv/bin/python benchmarks/pet_table.py \\
        --categories mvtec_ad/transistor:256 --max-minutes 2.5 --spade-growth 25,50,100,213

Writes OUT/pet_table.jsonl (one record per method x category), OUT/pet_table.md and, with
``--spade-growth``, OUT/spade_growth.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectlens.data.datasets import MVTecAD
from defectlens.detector import Detector
from defectlens.evaluation import metrics_report, run_detector

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
FIT_IMAGES = 20
DEFECT_FOLD = 20

METHODS: dict[str, dict[str, Any]] = {
    # label: detector options (method + its options); trained ones get the time cap
    "Sup. segmentation": {"method": "supervised_fpn"},
    "PaDiM": {"method": "padim", "covariance": "full"},
    "PaDiM-tied": {"method": "padim", "covariance": "tied"},
    "PaDiM-global": {"method": "padim", "covariance": "global"},
    "SPADE": {"method": "spade"},
    "FCDD": {"method": "fcdd", "blur_sigma": 0.0},
    "FCDD+FPN": {"method": "fcdd_fpn"},
    "FPN-L2 AE": {"method": "fpn_autoencoder"},
    "SSIM AE": {"method": "ssim_autoencoder"},
    "PatchCore": {"method": "patchcore"},
}
TRAINED = {"supervised_fpn", "fcdd", "fcdd_fpn", "fpn_autoencoder", "ssim_autoencoder"}


def split_category(root: Path, seed: int) -> tuple[list[Path], list[tuple[str, str]], list[Any]]:
    """(20 fitting images, the defect fold as (image, mask) pairs, the evaluation samples)."""
    dataset = MVTecAD(root)
    rng = np.random.default_rng(seed)
    train = dataset.train_images()
    fit = [train[i] for i in sorted(rng.choice(len(train), size=min(FIT_IMAGES, len(train)), replace=False))]
    samples = dataset.test_samples()
    defective = [k for k, s in enumerate(samples) if s.label == 1 and s.mask_path is not None]
    fold = set(rng.choice(defective, size=min(DEFECT_FOLD, len(defective) // 2), replace=False).tolist())
    pairs = [(str(samples[k].path), str(samples[k].mask_path)) for k in sorted(fold)]
    return fit, pairs, [s for k, s in enumerate(samples) if k not in fold]


def ms_per_image_batch1(detector: Detector, images: list[Path], repeats: int = 5) -> float:
    """Median ms of predict() on one image, after one warm-up call."""
    detector.predict(images[0])
    times = []
    for image in images[:repeats]:
        start = time.perf_counter()
        detector.predict(image)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_one(label: str, root: Path, size: int, args: argparse.Namespace) -> dict[str, Any]:
    fit, pairs, evaluation = split_category(root, args.seed)
    options = dict(METHODS[label])
    method = options.pop("method")
    if method in TRAINED:
        options["max_minutes"] = args.max_minutes
        if args.max_steps:
            options["max_steps"] = args.max_steps
    if method == "supervised_fpn":
        options["defects"] = pairs
    detector = Detector(method=method, image_size=size, batch_size=8, seed=args.seed, **options)
    start = time.perf_counter()
    detector.fit(fit)
    fit_seconds = time.perf_counter() - start
    report = metrics_report(run_detector(detector, evaluation), fit_seconds)
    with tempfile.TemporaryDirectory() as folder:
        model_mb = detector.save(Path(folder) / "model.dlens").stat().st_size / 1e6
    summary = detector.fit_info.method
    return {
        "label": label, "method": method, "category": str(root.relative_to(args.data)), "image_size": size,
        "image_auroc": report["image"]["auroc"], "pixel_auroc": report["pixel"]["auroc"],
        "aupro_0.3": report["pixel"]["aupro"]["0.3"], "fit_s": fit_seconds,
        "ms_per_image_b1": ms_per_image_batch1(detector, [s.path for s in evaluation[:6]]),
        "model_mb": model_mb, "steps": summary.get("steps"), "stop_reason": summary.get("stop_reason"),
        "final_loss": summary.get("final_loss"), "num_fit": len(fit), "num_defect_fold": len(pairs),
        "num_eval_good": report["image"]["num_good"], "num_eval_defective": report["image"]["num_defective"],
        "options": {k: v for k, v in options.items() if k != "defects"},
    }


def spade_growth_one(root: Path, size: int, count: int) -> dict[str, Any]:
    """SPADE fitted on the first ``count`` training images: gallery MB, peak RSS, fit s, ms/image."""
    train = MVTecAD(root).train_images()[:count]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    detector = Detector(method="spade", image_size=size, batch_size=8)
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    tests = [s.path for s in MVTecAD(root).test_samples()[:6]]
    return {
        "train_images": len(train), "gallery_mb": detector.fit_info.method["gallery_mb"], "fit_s": fit_seconds,
        "ms_per_image_b1": ms_per_image_batch1(detector, tests),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "rss_before_fit_mb": before,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: mean ± std over categories per method (Table II) and speed/size (Table III)."""
    lines = ["| method | image AUROC | pixel AUROC | AUPRO@0.3 | fit s | ms/image (b1) | MB | steps | categories |",
             "|---|---|---|---|---|---|---|---|---|"]

    def stat(values: list[float]) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")

    for label in METHODS:
        own = [row for row in rows if row["label"] == label]
        if not own:
            continue
        lines.append(
            f"| {label} | {stat([r['image_auroc'] for r in own])} | {stat([r['pixel_auroc'] for r in own])} | "
            f"{stat([r['aupro_0.3'] for r in own])} | {np.mean([r['fit_s'] for r in own]):.1f} | "
            f"{np.mean([r['ms_per_image_b1'] for r in own]):.0f} | {np.mean([r['model_mb'] for r in own]):.1f} | "
            f"{','.join(str(r['steps']) for r in own) if own[0]['steps'] is not None else '-'} | {len(own)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA_ROOT)
    parser.add_argument("--categories", default="mvtec_ad/transistor:256", help="PATH:SIZE,... under --data")
    parser.add_argument("--methods", default=",".join(METHODS), help="labels, comma-separated")
    parser.add_argument("--max-minutes", type=float, default=2.5, help="training cap of each trained method")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap of each trained method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spade-growth", default="", help="training-set sizes, e.g. 25,50,100,213")
    parser.add_argument("--spade-growth-one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pet_table"))
    args = parser.parse_args(argv)
    categories = [(args.data / item.split(":")[0], int(item.split(":")[1]) if ":" in item else 256)
                  for item in args.categories.split(",") if item]
    if args.spade_growth_one is not None:
        print(json.dumps(spade_growth_one(*categories[0], args.spade_growth_one)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    labels = [label for label in args.methods.split(",") if label]
    unknown = set(labels) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    print(f"protocol: {FIT_IMAGES} normal images fitted per category; a fold of up to {DEFECT_FOLD} labelled defective "
          "images trains the supervised baseline and is left out of EVERY method's evaluation", flush=True)
    rows: list[dict[str, Any]] = []
    with open(args.out / "pet_table.jsonl", "a", encoding="utf-8") as records:
        for root, size in categories:
            for label in labels:
                row = run_one(label, root, size, args)
                rows.append(row)
                records.write(json.dumps(row) + "\n")
                records.flush()
                print(json.dumps({k: row[k] for k in ("label", "category", "image_auroc", "pixel_auroc", "aupro_0.3",
                                                       "fit_s", "ms_per_image_b1", "model_mb", "steps")}), flush=True)
    if rows:
        (args.out / "pet_table.md").write_text(table(rows) + "\n", encoding="utf-8")
        print(table(rows))
    if args.spade_growth:
        growth = []
        for count in [int(c) for c in args.spade_growth.split(",")]:
            command = [sys.executable, __file__, "--data", str(args.data), "--categories", args.categories.split(",")[0],
                       "--spade-growth-one", str(count)]
            growth.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
            print(json.dumps(growth[-1]), flush=True)
        (args.out / "spade_growth.json").write_text(json.dumps(growth, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
