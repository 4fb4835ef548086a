"""How visible is each synthetic anomaly kind to PatchCore on MVTec transistor?

Fits PatchCore (efficientnet_lite0, 256 px) on transistor train/good, builds a synthetic
test set of each kind from the *test* good images (never seen in training), evaluates it.

    .venv/bin/python benchmarks/synthetic_visibility.py [--data ../shared/data] [--count 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from defectlens.data.datasets import MVTecAD, list_images
from defectlens.data.synthetic import SYNTHETIC_KINDS, make_synthetic_testset
from defectlens.detector import Detector
from defectlens.evaluation import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/synthetic_visibility.json")
    args = parser.parse_args()
    root = Path(args.data) / "mvtec_ad" / "transistor"
    detector = Detector(method="patchcore").fit(root)
    good_test = list_images(root / "test" / "good")
    results = {}
    print(f"{'kind':20s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO@0.3':>9s}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in SYNTHETIC_KINDS:
            test_root = make_synthetic_testset(good_test, kind, args.count, Path(folder) / kind, seed=0, good_count=args.count)
            report = evaluate(detector, MVTecAD(test_root))
            results[kind] = {
                "image_auroc": report["image"]["auroc"],
                "pixel_auroc": report["pixel"]["auroc"],
                "aupro": report["pixel"]["aupro"]["0.3"],
            }
            r = results[kind]
            print(f"{kind:20s} {r['image_auroc']:11.3f} {r['pixel_auroc']:11.3f} {r['aupro']:9.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
