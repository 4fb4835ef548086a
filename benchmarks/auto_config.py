"""Honesty check of `fit --auto` (issue 16): does the synthetic validation score rank the
candidates as the real test set does?

For each category: `auto_configure` scores every default candidate on synthetic anomalies in
held-out training images (no test image read); then every candidate is fitted on all training
images and evaluated on the real test set. Prints per category the chosen candidate, the best
by the real test score (mean of image AUROC and AUPRO@0.3) and the gap, and the Spearman rank
correlation between the synthetic and the real scores over all candidates and categories;
writes a scatter plot.

    .venv/bin/python benchmarks/auto_config.py [--categories mvtec_ad/transistor:256 piped/PA_BDP01_TL:256 ...]
        [--out benchmarks/results/auto_config]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from defectlens.autoconfig import auto_configure, default_candidates  # noqa: E402
from defectlens.data.datasets import MVTecAD  # noqa: E402
from defectlens.detector import Detector  # noqa: E402
from defectlens.evaluation import evaluate  # noqa: E402

DEFAULT_CATEGORIES = ["mvtec_ad/transistor:256", "piped/PA_BDP01_TL:256", "piped/PA_BFT01_TL:256", "piped/PA_BRG01_RL:256"]


def real_scores(root: Path, image_size: int, params: dict[str, Any]) -> dict[str, float]:
    detector = Detector(image_size=image_size, calibration_images=10, **params).fit(root)
    report = evaluate(detector, MVTecAD(root))
    image, region = report["image"]["auroc"], report["pixel"]["aupro"]["0.3"]
    return {"test_image_auroc": image, "test_pixel_auroc": report["pixel"]["auroc"], "test_aupro": region,
            "test_score": 0.5 * (image + region)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--categories", nargs="+", default=DEFAULT_CATEGORIES, help="PATH:IMAGE_SIZE under --data")
    parser.add_argument("--out", default="benchmarks/results/auto_config")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    print("| category | chosen by --auto | its test score | best by test | best test score | gap (points) |")
    print("|---|---|---|---|---|---|")
    for entry in args.categories:
        path, size = entry.rsplit(":", 1)
        root, image_size = Path(args.data) / path, int(size)
        candidates = default_candidates(native_size=image_size)  # same image size for every candidate here
        result = auto_configure(lambda **p: Detector(image_size=image_size, calibration_images=10, **p),
                                root / "train" / "good", candidates)
        for row in result.rows:
            if "error" in row:
                continue
            rows.append({"category": path, **row, **real_scores(root, image_size, row["params"])})
        mine = [row for row in rows if row["category"] == path]
        chosen = next(row for row in mine if row["name"] == result.chosen.name)
        best = max(mine, key=lambda row: row["test_score"])
        print(f"| {path} | {chosen['name']} | {chosen['test_score']:.4f} | {best['name']} | {best['test_score']:.4f} | "
              f"{100 * (best['test_score'] - chosen['test_score']):.2f} |", flush=True)
    rho = spearmanr([r["selection_score"] for r in rows], [r["test_score"] for r in rows])
    within = [spearmanr([r["selection_score"] for r in rows if r["category"] == c],
                        [r["test_score"] for r in rows if r["category"] == c]).statistic
              for c in sorted({r["category"] for r in rows})]
    print(f"\nSpearman rank correlation, synthetic vs real test score, all {len(rows)} candidates: {rho.statistic:.3f} "
          f"(p = {rho.pvalue:.3g}); within categories: {', '.join(f'{w:.2f}' for w in within)}")
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    figure, axes = plt.subplots(figsize=(6, 5))
    for category in sorted({r["category"] for r in rows}):
        mine = [r for r in rows if r["category"] == category]
        axes.scatter([r["selection_score"] for r in mine], [r["test_score"] for r in mine], label=category)
    axes.set_xlabel("synthetic validation score (mean of image AUROC, AUPRO@0.3)")
    axes.set_ylabel("real test score (mean of image AUROC, AUPRO@0.3)")
    axes.set_title(f"--auto honesty check: Spearman {rho.statistic:.2f}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "synthetic_vs_real.png", dpi=120)
    print(f"plot: {out / 'synthetic_vs_real.png'}")


if __name__ == "__main__":
    main()
