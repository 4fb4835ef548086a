"""Exported model (ONNX: onnxruntime, OpenVINO) vs the torch model on a category's test set.

For each model (--model FILE, or fitted here: --method on the category's train/good): export to
ONNX + OpenVINO IR, predict every test image with torch, onnxruntime and OpenVINO, and report
the max relative difference of image scores, of maps (max |difference| / max of the torch map),
the verdicts that differ, and ms/image at batch 1 and 16 for each runtime (best of --repeats over
--timed images, after a warm-up; the load average is printed: a loaded machine is slower).

    .venv/bin/python benchmarks/export_parity.py --model /tmp/transistor_patchcore.dlens
    .venv/bin/python benchmarks/export_parity.py --method padim --method sequential_patchcore --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectlens.detector import Detector
from defectlens.export import export_detector
from defectlens.export.runtime import ExportedDetector
from defectlens.inputs import load_input

DEFAULT_DATA = Path(os.environ.get("DEFECTLENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _best_ms(fn, images: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) * 1000 / images)
    return round(best, 1)


def compare(detector: Detector, name: str, paths: list[str], args: argparse.Namespace) -> dict:
    directory = Path(tempfile.mkdtemp(prefix=f"export_{name}_"))
    start = time.perf_counter()
    export_detector(detector, directory, "openvino")
    row: dict = {"model": name, "export_s": round(time.perf_counter() - start, 1),
                 "onnx_mib": round((directory / "model.onnx").stat().st_size / 2**20, 1)}
    want = detector.predict_batch(paths)
    pixels = [load_input(p)[0] for p in paths[: args.timed]]
    runtimes = {"torch": detector}
    for runtime in ("onnxruntime", "openvino"):
        runtimes[runtime] = ExportedDetector(directory, runtime, threads=torch.get_num_threads(), batch_size=16)
        got = runtimes[runtime].predict_batch(paths)
        row[runtime] = {
            "max_rel_score_diff": max(abs(g.score - w.score) / abs(w.score) for g, w in zip(got, want)),
            "max_rel_map_diff": max(float(np.abs(g.anomaly_map - w.anomaly_map).max() / np.abs(w.anomaly_map).max())
                                    for g, w in zip(got, want)),
            "verdicts_differ": sum(g.verdict != w.verdict for g, w in zip(got, want)),
        }
    for runtime, model in runtimes.items():
        for batch in (1, 16):
            model.batch_size = batch
            row.setdefault("ms_per_image", {})[f"{runtime}_b{batch}"] = _best_ms(
                lambda: model.predict_batch(pixels), len(pixels), args.repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "mvtec_ad" / "transistor")
    parser.add_argument("--model", type=Path, action="append", default=[], help="saved models (repeatable)")
    parser.add_argument("--method", action="append", default=[], help="methods fitted here (repeatable)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--timed", type=int, default=16, help="test images timed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [str(p) for p in sorted((args.data / "test").glob("*/*.png"))]
    models = [(path.stem, Detector.load(path)) for path in args.model]
    models += [(m, Detector(method=m, image_size=args.image_size).fit(args.data)) for m in args.method]
    rows = []
    for name, detector in models:
        rows.append(compare(detector, name, paths, args))
        print(json.dumps(rows[-1]), flush=True)
    result = {"test_images": len(paths), "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
