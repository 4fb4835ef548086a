"""Sequential PatchCore (streaming coreset) vs greedy PatchCore: AUROCs, melding, tiling.

1. ``auroc``: MVTec AD transistor (256 px) and the 12 PIPED classes (128 px). Greedy PatchCore
   with coreset ratio 0.1; Sequential PatchCore with M = the greedy coreset's size, --epochs
   passes (no augmentation by default). Image and pixel AUROC, fit time, per class.
2. ``meld``: transistor's training set split into two disjoint halves (seeded); a Sequential
   PatchCore of size M fitted on each, the two melded into one of size M; compared with one
   fitted on the whole set (AUROCs, times).
3. ``tiling``: 2048 x 2048 mosaics of 8 x 8 transistor images. A tiled detector (256 px tiles,
   32 px overlap) is fitted on 3 mosaics of training images, then a fresh process loads it
   and predicts one mosaic of test images with one defective part: peak RSS of that process
   (VmHWM) over its RSS with the model loaded, for a 1024^2 crop, the 2048^2 mosaic and a
   4096^2 array; the map's size and where its maximum is.

    .venv/bin/python benchmarks/sequential_vs_greedy.py                 # all three parts
    .venv/bin/python benchmarks/sequential_vs_greedy.py --parts meld tiling --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def evaluate_detector(detector, category: Path) -> dict[str, float]:
    from defectlens.data.datasets import MVTecAD
    from defectlens.evaluation import evaluate

    started = time.perf_counter()
    report = evaluate(detector, MVTecAD(category))
    return {
        "image_auroc": report["image"]["auroc"],
        "pixel_auroc": report["pixel"]["auroc"],
        "evaluate_seconds": time.perf_counter() - started,
    }


def fit_and_evaluate(category: Path, image_size: int, method: str, train=None, **options) -> tuple[dict, object]:
    from defectlens.detector import Detector

    detector = Detector(method=method, image_size=image_size, **options)
    started = time.perf_counter()
    detector.fit(category if train is None else train)
    seconds = time.perf_counter() - started
    result = {"fit_seconds": seconds, "coreset": int(detector.method.memory_bank.shape[0]), **evaluate_detector(detector, category)}
    if detector.fit_info.method:
        result["method_info"] = detector.fit_info.method
    return result, detector


def part_auroc(args: argparse.Namespace, data: Path) -> dict:
    categories = [(data / "mvtec_ad" / "transistor", 256)] + [
        (path, 128) for path in sorted((data / "piped").iterdir()) if path.is_dir()
    ]
    if args.categories:
        categories = [(path, size) for path, size in categories if path.name in args.categories]
    results = {}
    for category, size in categories:
        greedy, _ = fit_and_evaluate(category, size, "patchcore", coreset_ratio=args.coreset_ratio)
        sequential, _ = fit_and_evaluate(
            category, size, "sequential_patchcore", coreset_size=greedy["coreset"], epochs=args.epochs,
            augmentation=args.augmentation,
        )
        results[category.name] = {"greedy": greedy, "sequential": sequential}
        print(
            f"{category.name:12s} M={greedy['coreset']:6d} | greedy img {greedy['image_auroc']:.4f} pix "
            f"{greedy['pixel_auroc']:.4f} fit {greedy['fit_seconds']:6.1f} s | sequential img "
            f"{sequential['image_auroc']:.4f} pix {sequential['pixel_auroc']:.4f} fit {sequential['fit_seconds']:6.1f} s "
            f"epochs {sequential['method_info']['changes_per_epoch']} | diff img "
            f"{100 * (sequential['image_auroc'] - greedy['image_auroc']):+.2f} pix "
            f"{100 * (sequential['pixel_auroc'] - greedy['pixel_auroc']):+.2f} points",
            flush=True,
        )
    piped = [v for k, v in results.items() if k != "transistor"]
    if piped:
        mean = {
            method: {metric: float(np.mean([v[method][metric] for v in piped])) for metric in ("image_auroc", "pixel_auroc", "fit_seconds")}
            for method in ("greedy", "sequential")
        }
        worst = {
            metric: float(min(v["sequential"][metric] - v["greedy"][metric] for v in piped)) * 100
            for metric in ("image_auroc", "pixel_auroc")
        }
        results["piped_mean"] = mean
        print(
            f"PIPED mean   | greedy img {mean['greedy']['image_auroc']:.4f} pix {mean['greedy']['pixel_auroc']:.4f} | "
            f"sequential img {mean['sequential']['image_auroc']:.4f} pix {mean['sequential']['pixel_auroc']:.4f} | "
            f"mean diff img {100 * (mean['sequential']['image_auroc'] - mean['greedy']['image_auroc']):+.2f} pix "
            f"{100 * (mean['sequential']['pixel_auroc'] - mean['greedy']['pixel_auroc']):+.2f} points; worst class diff "
            f"img {worst['image_auroc']:+.2f} pix {worst['pixel_auroc']:+.2f}",
            flush=True,
        )
    return results


def part_meld(args: argparse.Namespace, data: Path) -> dict:
    from defectlens.data.datasets import training_images
    from defectlens.meld import meld_detectors

    category = data / "mvtec_ad" / "transistor"
    images = training_images(category)
    order = np.random.default_rng(args.seed).permutation(len(images))
    halves = [[images[i] for i in sorted(order[: len(images) // 2])], [images[i] for i in sorted(order[len(images) // 2 :])]]
    size = args.meld_size
    options = dict(coreset_size=size, epochs=args.epochs, augmentation=args.augmentation)
    whole, _ = fit_and_evaluate(category, 256, "sequential_patchcore", **options)
    parts = []
    detectors = []
    for half in halves:
        result, detector = fit_and_evaluate(category, 256, "sequential_patchcore", train=half, **options)
        parts.append(result)
        detectors.append(detector)
    started = time.perf_counter()
    melded = meld_detectors(detectors, size=size, max_epochs=args.meld_epochs)
    meld_seconds = time.perf_counter() - started
    melded_result = {"meld_seconds": meld_seconds, "coreset": int(melded.method.memory_bank.shape[0]), **evaluate_detector(melded, category)}
    print(
        f"meld (transistor, M={size}): whole set img {whole['image_auroc']:.4f} pix {whole['pixel_auroc']:.4f} "
        f"fit {whole['fit_seconds']:.1f} s | halves ({len(halves[0])}+{len(halves[1])} images) img "
        f"{parts[0]['image_auroc']:.4f}/{parts[1]['image_auroc']:.4f} pix {parts[0]['pixel_auroc']:.4f}/"
        f"{parts[1]['pixel_auroc']:.4f} fit {parts[0]['fit_seconds']:.1f}+{parts[1]['fit_seconds']:.1f} s | melded img "
        f"{melded_result['image_auroc']:.4f} pix {melded_result['pixel_auroc']:.4f} meld {meld_seconds:.1f} s",
        flush=True,
    )
    return {"size": size, "whole": whole, "halves": parts, "melded": melded_result}


def _mosaic(paths: list[Path], grid: int = 8) -> np.ndarray:
    from defectlens.data.images import read_image

    cells = [read_image(path) for path in paths[: grid * grid]]
    rows = [np.concatenate(cells[r * grid : (r + 1) * grid], axis=1) for r in range(grid)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def part_tiling(args: argparse.Namespace, data: Path) -> dict:
    from defectlens.data.datasets import training_images
    from defectlens.data.images import read_mask, save_png
    from defectlens.detector import Detector

    category = data / "mvtec_ad" / "transistor"
    train = training_images(category)
    mosaics = [_mosaic(train[k * 64 : (k + 1) * 64]) for k in range(3)]
    detector = Detector(
        method=args.tiling_method, image_size=256, tile_size=256, tile_overlap=32, batch_size=16,
        **({"coreset_size": 10_000, "epochs": 1} if args.tiling_method == "sequential_patchcore" else {"coreset_ratio": 0.1}),
    )
    started = time.perf_counter()
    detector.fit(mosaics)
    fit_seconds = time.perf_counter() - started
    del mosaics
    good = sorted((category / "test" / "good").glob("*.png"))
    defect = sorted((category / "test" / "damaged_case").glob("*.png"))[0]
    cell = (5, 2)
    cells = (good * 2)[:64]  # 60 good test images: 4 repeat
    cells[cell[0] * 8 + cell[1]] = defect
    mosaic = _mosaic(cells)
    mask = np.zeros(mosaic.shape[:2], bool)
    mask_cell = read_mask(category / "ground_truth" / "damaged_case" / f"{defect.stem}_mask.png") > 0
    mask[cell[0] * 256 : (cell[0] + 1) * 256, cell[1] * 256 : (cell[1] + 1) * 256] = mask_cell
    with tempfile.TemporaryDirectory() as folder:
        model = detector.save(Path(folder) / "tiled.dlens")
        image = Path(folder) / "mosaic.png"
        save_png(image, (mosaic * 255 + 0.5).astype(np.uint8))
        np.save(Path(folder) / "mask.npy", mask)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(
            [sys.executable, __file__, "--predict-worker", str(model), str(image), "--threads", str(args.threads)],
            capture_output=True, text=True, env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update({"fit_seconds": fit_seconds, "fit_images": 3, "fit_tiles_per_image": 81, "method": args.tiling_method})
    peak_row, peak_col = result["peak"]
    result["peak_in_defective_cell"] = bool(peak_row // 256 == cell[0] and peak_col // 256 == cell[1])
    result["peak_in_mask"] = bool(mask[peak_row, peak_col])
    print(
        f"tiling: {args.tiling_method} fitted on 3 mosaics of 2048x2048 (81 tiles each) in {fit_seconds:.1f} s; "
        f"predict 2048x2048 -> map {tuple(result['map_shape'])} in {result['predict_seconds']:.1f} s; "
        f"process RSS with the model loaded {result['rss_before_mib']:.0f} MiB; peak RSS over it when predicting "
        f"1024^2 / 2048^2 (from PNG) / 4096^2: "
        f"{' / '.join(f'+{v:.0f}' for v in result['peak_over_loaded_mib'].values())} MiB "
        f"(4096^2 in {result['predict_4096_seconds']:.1f} s); map max at {tuple(result['peak'])}: "
        f"in the defective cell {result['peak_in_defective_cell']}, inside its mask {result['peak_in_mask']}; "
        f"pixel AUROC on the mosaic {result['pixel_auroc']:.4f}; score {result['score']:.3f} (threshold {result['threshold']:.3f})",
        flush=True,
    )
    return result


def predict_worker(model: str, image: str, threads: int) -> None:
    """Load the model, predict a 1024 x 1024 crop, the 2048 x 2048 file, then a 4096 x 4096
    array (the mosaic repeated 2 x 2); peak RSS over the loaded model's RSS after each."""
    import torch

    torch.set_num_threads(threads)
    from defectlens.data.images import read_image
    from defectlens.detector import Detector
    from defectlens.metrics import pixel_auroc

    detector = Detector.load(model)
    detector.predict(np.zeros((256, 256, 3), np.float32))  # warm: backbone built and run once
    rss_before = _rss_mib()
    sizes = {}
    crop = read_image(image)[:1024, :1024].copy()
    detector.predict(crop)
    sizes["1024"] = _peak_mib() - rss_before
    del crop
    started = time.perf_counter()
    prediction = detector.predict(image)  # from the PNG file: decoding is part of it
    seconds = time.perf_counter() - started
    sizes["2048"] = _peak_mib() - rss_before
    peak_2048 = _peak_mib()
    anomaly_map = prediction.anomaly_map
    peak = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    mask = np.load(Path(image).with_name("mask.npy"))
    result = {
        "map_shape": list(anomaly_map.shape),
        "predict_seconds": seconds,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_2048,
        "peak": [int(peak[0]), int(peak[1])],
        "score": prediction.score,
        "threshold": prediction.threshold,
        "pixel_auroc": pixel_auroc([anomaly_map], [mask]),
    }
    del prediction, anomaly_map
    big = np.tile(read_image(image), (2, 2, 1))
    started = time.perf_counter()
    detector.predict(big)
    result["predict_4096_seconds"] = time.perf_counter() - started
    sizes["4096"] = _peak_mib() - rss_before
    result["peak_over_loaded_mib"] = sizes
    print(json.dumps(result))


def _peak_mib() -> float:
    """Peak RSS of this process since exec (VmHWM; ru_maxrss would include the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--predict-worker":
        threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
        predict_worker(sys.argv[2], sys.argv[3], threads)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--parts", nargs="+", default=["auroc", "meld", "tiling"], choices=["auroc", "meld", "tiling"])
    parser.add_argument("--categories", nargs="+", help="auroc part: only these (transistor, PA_...)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="greedy PatchCore's coreset ratio")
    parser.add_argument("--epochs", type=int, default=3, help="Sequential PatchCore's most epochs")
    parser.add_argument("--augmentation", help="augmentation of epochs after the first (default none)")
    parser.add_argument("--meld-size", type=int, default=21_811, help="M for the melding experiment (default: greedy's size on transistor)")
    parser.add_argument("--meld-epochs", type=int, default=10)
    parser.add_argument("--tiling-method", default="sequential_patchcore")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/sequential_vs_greedy.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    results = {"settings": vars(args)}
    for part in args.parts:
        results[part] = {"auroc": part_auroc, "meld": part_meld, "tiling": part_tiling}[part](args, data)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
