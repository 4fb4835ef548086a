"""Peak RSS and time of `Detector.fit` for 100, 400 and 1600 training images of 512 px:
greedy PatchCore (keeps every patch feature, then subsamples) vs Sequential PatchCore
(streaming coreset of fixed size M, one batch of features at a time).

The images are made from MVTec AD transistor's 213 training images (256 px): upscaled to
512 px and augmented (seeded, preset "sequential": brightness/contrast, flips, blur, noise,
small masked patches), written once as PNG files to a cache folder, so a fit reads them from
disk like a user's folder and never holds the data set. Each fit runs in a fresh Python process
and reports its own peak resident memory, ``VmHWM`` of /proc/self/status (whole process:
Python, torch, backbone, data, features, method). Not ``ru_maxrss``: on Linux a child
started by fork/vfork + exec inherits the parent's high-water mark in ``ru_maxrss``.

    .venv/bin/python benchmarks/memory_scaling.py                        # 100 400 1600
    .venv/bin/python benchmarks/memory_scaling.py --counts 100 400 --methods sequential_patchcore
    .venv/bin/python benchmarks/memory_scaling.py --greedy-max 400       # skip greedy above 400

Greedy PatchCore at 1600 x 512 px holds 1600 x 64 x 64 patches x 152 float32 = 4.0 GB of
features, twice during concatenation, plus a random projection (3.3 GB) and the selection's
distance block (256 x N floats, 6.7 GB): more than this 23 GB shared machine can spare, so
``--greedy-max`` (default 400) skips it and the table says so, with a linear extrapolation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def make_images(source: Path, out: Path, count: int, size: int = 512, seed: int = 0) -> list[Path]:
    """`count` augmented, upscaled training images as PNG files in `out` (made once, reused)."""
    import numpy as np
    import cv2

    from defectlens.data.datasets import training_images
    from defectlens.data.images import read_image, save_png
    from defectlens.data.transforms import AugmentationPipeline
    import defectlens.methods  # noqa: F401  (registers the "sequential" preset)

    out.mkdir(parents=True, exist_ok=True)
    sources = training_images(source)
    pipeline = AugmentationPipeline.from_config("sequential")
    paths = []
    for index in range(count):
        path = out / f"{index:05d}.png"
        paths.append(path)
        if path.exists():
            continue
        image = read_image(sources[index % len(sources)])
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1).astype(np.float32)
        image = pipeline(image, np.random.default_rng([seed, index]))
        save_png(path, (image * 255 + 0.5).astype(np.uint8))
    return paths


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it was exec'd (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> None:
    """One fit in this fresh process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from defectlens.detector import Detector

    paths = sorted(Path(args.images).glob("*.png"))[: args.count]
    options = (
        {"coreset_ratio": args.coreset_ratio}
        if args.method == "patchcore"
        else {"coreset_size": args.coreset_size, "epochs": args.epochs}
    )
    detector = Detector(method=args.method, image_size=512, batch_size=8, **options)
    started = time.perf_counter()
    detector.fit(paths)
    seconds = time.perf_counter() - started
    info = detector.fit_info
    print(
        json.dumps(
            {
                "method": args.method,
                "images": len(paths),
                "peak_rss_mib": peak_rss_mib(),
                "fit_seconds": seconds,
                "feature_seconds": info.feature_seconds,
                "method_seconds": info.method_seconds,
                "calibration_seconds": info.calibration_seconds,
                "coreset": int(detector.method.memory_bank.shape[0]),
                "method_info": info.method,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--cache", default="/tmp/defectlens_bench_512", help="folder for the generated 512 px images")
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--methods", nargs="+", default=["sequential_patchcore", "patchcore"])
    parser.add_argument("--greedy-max", type=int, default=400, help="largest image count greedy PatchCore is run on")
    parser.add_argument("--coreset-size", type=int, default=4096, help="M of the streaming coreset")
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="greedy coreset ratio")
    parser.add_argument("--epochs", type=int, default=1, help="streaming epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per fit")
    parser.add_argument("--out", default="benchmarks/results/memory_scaling.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    make_images(Path(args.data) / "mvtec_ad" / "transistor", Path(args.cache), max(args.counts))
    print(f"{max(args.counts)} images of 512 px ready in {args.cache} ({time.perf_counter() - started:.0f} s)", flush=True)
    results = []
    for method in args.methods:
        for count in args.counts:
            if method == "patchcore" and count > args.greedy_max:
                results.append({"method": method, "images": count, "skipped": f"not run above --greedy-max {args.greedy_max}"})
                print(json.dumps(results[-1]), flush=True)
                continue
            command = [
                sys.executable, __file__, "--worker", "--images", args.cache, "--count", str(count),
                "--method", method, "--coreset-size", str(args.coreset_size), "--coreset-ratio",
                str(args.coreset_ratio), "--epochs", str(args.epochs), "--threads", str(args.threads),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                results.append({"method": method, "images": count, "failed": done.stderr.strip().splitlines()[-1:]})
            else:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print()
    print("| method | images | peak RSS (MiB) | fit (s) | features (s) | method (s) | calibration (s) | coreset |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        if "peak_rss_mib" not in row:
            print(f"| {row['method']} | {row['images']} | {row.get('skipped') or row.get('failed')} | | | | | |")
            continue
        print(
            f"| {row['method']} | {row['images']} | {row['peak_rss_mib']:.0f} | {row['fit_seconds']:.0f} | "
            f"{row['feature_seconds']:.0f} | {row['method_seconds']:.0f} | {row['calibration_seconds']:.0f} | {row['coreset']} |"
        )
    for method in args.methods:
        rows = [row for row in results if row["method"] == method and "peak_rss_mib" in row]
        if len(rows) >= 2:
            peaks = [row["peak_rss_mib"] for row in rows]
            print(f"{method}: peak RSS max/min = {max(peaks) / min(peaks):.3f} over {[row['images'] for row in rows]} images")
            if method == "patchcore" and any("skipped" in row for row in results if row["method"] == method):
                (x0, y0), (x1, y1) = [(row["images"], row["peak_rss_mib"]) for row in rows[-2:]]
                slope = (y1 - y0) / (x1 - x0)
                for row in results:
                    if row["method"] == method and "skipped" in row:
                        estimate = y1 + slope * (row["images"] - x1)
                        print(f"patchcore at {row['images']} images: not run; linear extrapolation {estimate / 1024:.1f} GiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "images", "count", "method")}, "results": results}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
