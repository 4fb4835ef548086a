"""PaDiM covariance models (full / tied / global) x reductions: AUROCs and model-file size.

The PET-preform study claims tied/global covariance cut memory ~3x at equal accuracy. This
fits each variant on MVTec transistor (256 px) and the 12 PIPED classes (128 px) and prints
image AUROC, pixel AUROC, AUPRO@0.3 and the model file size.

    .venv/bin/python benchmarks/padim_covariance.py [--data ../shared/data] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from defectlens.data.datasets import MVTecAD
from defectlens.detector import Detector
from defectlens.evaluation import evaluate


def run(category: Path, image_size: int, covariance: str, reduction: str) -> dict[str, float]:
    detector = Detector(method="padim", image_size=image_size, covariance=covariance, reduction=reduction)
    detector.fit(category)
    with tempfile.TemporaryDirectory() as folder:
        size_mb = detector.save(Path(folder) / "m.dlens").stat().st_size / 1e6
    report = evaluate(detector, MVTecAD(category))
    return {
        "image_auroc": report["image"]["auroc"],
        "pixel_auroc": report["pixel"]["auroc"],
        "aupro": report["pixel"]["aupro"]["0.3"],
        "model_mb": size_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="benchmarks/results/padim_covariance.json")
    parser.add_argument("--reductions", nargs="+", default=["random", "negated_pca"])
    args = parser.parse_args()
    data = Path(args.data)
    categories = [(data / "mvtec_ad" / "transistor", 256)] + [
        (path, 128) for path in sorted((data / "piped").iterdir()) if path.is_dir()
    ]
    results: dict[str, dict] = {}
    for reduction in args.reductions:
        for covariance in ("full", "tied", "global"):
            key = f"{covariance}/{reduction}"
            results[key] = {category.name: run(category, size, covariance, reduction) for category, size in categories}
            piped = [v for name, v in results[key].items() if name != "transistor"]
            summary = {metric: float(np.mean([v[metric] for v in piped])) for metric in piped[0]}
            t = results[key]["transistor"]
            print(
                f"{key:20s} transistor img {t['image_auroc']:.3f} pix {t['pixel_auroc']:.3f} aupro {t['aupro']:.3f} "
                f"{t['model_mb']:7.2f} MB | PIPED mean img {summary['image_auroc']:.3f} pix {summary['pixel_auroc']:.3f} "
                f"aupro {summary['aupro']:.3f} {summary['model_mb']:6.2f} MB",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
