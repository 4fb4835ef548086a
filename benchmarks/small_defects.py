"""Small-defect localisation (issue 16, item 3): feature strides and blur on PIPED at 256 px.

PIPED defects cover ~1 % of a 128 px patch. anomalib's PaDiM reads EfficientNet-Lite0 at strides
4, 8 and 16; ours by default at 8 and 16, blurred with sigma 4. This fits PaDiM and PatchCore on
the PIPED classes of the anomalib comparison (upsampled to 256 px, as anomalib ran them) with
the default layers and with an extra stride-4 level, at blur sigma 4 and 2, with and without
PatchCore's 3x3 local feature aggregation (the PaDiM paper has none), and prints image
AUROC, pixel AUROC and AUPRO@0.3 next to anomalib's figures (issue 16's table).

    .venv/bin/python benchmarks/small_defects.py [--data ../shared/data] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from defectlens.data.datasets import MVTecAD
from defectlens.detector import Detector
from defectlens.evaluation import evaluate

STRIDE_4_8_16 = ["_blocks.2", "_blocks.4", "_blocks.10"]  # EfficientNet-Lite0 stage ends at strides 4, 8, 16
CONFIGS: dict[str, dict[str, Any]] = {
    "padim default (s8+16, blur 4)": {"method": "padim"},
    "padim s4+8+16, blur 4": {"method": "padim", "layers": STRIDE_4_8_16},
    "padim s4+8+16, blur 2": {"method": "padim", "layers": STRIDE_4_8_16, "blur_sigma": 2.0},
    "padim s4+8+16, no aggregation, blur 2": {"method": "padim", "layers": STRIDE_4_8_16, "blur_sigma": 2.0,
                                              "feature_aggregation": 1},
    "patchcore default (s8+16, blur 4)": {"method": "patchcore"},
    "patchcore s8+16, blur 2": {"method": "patchcore", "blur_sigma": 2.0},
    "patchcore s4+8+16, blur 2": {"method": "patchcore", "layers": STRIDE_4_8_16, "blur_sigma": 2.0},
    "patchcore s4+8+16, no aggregation, blur 2": {"method": "patchcore", "layers": STRIDE_4_8_16, "blur_sigma": 2.0,
                                                  "feature_aggregation": 1},
}
ANOMALIB = {  # pixel AUROC / AUPRO, issue 16's side-by-side run (same weights, 256 px)
    "PA_BDP01_TL": {"padim": (0.988, 0.932), "patchcore": (0.978, 0.837)},
    "PA_BFT01_TL": {"padim": (0.994, 0.926), "patchcore": (0.988, 0.807)},
    "PA_BRG01_RL": {"padim": (0.983, 0.753), "patchcore": (0.955, 0.475)},
}


def run(category: Path, config: dict[str, Any], image_size: int) -> dict[str, float]:
    detector = Detector(image_size=image_size, calibration_images=10, **config)
    started = time.perf_counter()
    detector.fit(category)
    fit_seconds = time.perf_counter() - started
    report = evaluate(detector, MVTecAD(category))
    return {
        "image_auroc": report["image"]["auroc"],
        "pixel_auroc": report["pixel"]["auroc"],
        "aupro": report["pixel"]["aupro"]["0.3"],
        "fit_s": fit_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--categories", nargs="+", default=list(ANOMALIB))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out", help="write all rows as JSON here")
    args = parser.parse_args()
    rows = []
    print("| class | config | image AUROC | pixel AUROC | AUPRO@0.3 | fit s | anomalib pix / AUPRO |")
    print("|---|---|---|---|---|---|---|")
    for name in args.categories:
        for label, config in CONFIGS.items():
            result = run(Path(args.data) / "piped" / name, config, args.image_size)
            reference = ANOMALIB.get(name, {}).get(config["method"])
            rows.append({"category": name, "config": label, **result})
            anomalib = f"{reference[0]:.3f} / {reference[1]:.3f}" if reference else "-"
            print(f"| {name} | {label} | {result['image_auroc']:.3f} | {result['pixel_auroc']:.3f} | "
                  f"{result['aupro']:.3f} | {result['fit_s']:.1f} | {anomalib} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
