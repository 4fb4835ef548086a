"""Robustness to small scene shifts (issue 16, item 4): image AUROC and the false-alarm rate at
the model's own threshold when every test image of transistor is shifted or rotated a little
(the scene moved between the day of the training images and the day of the test).

Each configuration is fitted once on train/good; the test set (good and defective images alike)
is then shifted by 0-16 px (diagonally) or rotated by 0-10 degrees about the centre (borders
replicated) and scored. Writes a Markdown table and a plot of the curves.

    .venv/bin/python benchmarks/shift_robustness.py [--out benchmarks/results/shift_robustness]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from defectlens.data.datasets import MVTecAD  # noqa: E402
from defectlens.data.images import read_image  # noqa: E402
from defectlens.data.roi import Preprocess, TemplateCrop  # noqa: E402
from defectlens.detector import Detector  # noqa: E402
from defectlens.metrics import image_auroc  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "patchcore": {"method": "patchcore"},
    "padim full": {"method": "padim"},
    "padim tied": {"method": "padim", "covariance": "tied"},
    "padim global": {"method": "padim", "covariance": "global"},
}
ALIGNED = ("patchcore, template-aligned", "padim full, template-aligned")
SHIFTS_PX = (0, 2, 4, 8, 16)
ROTATIONS_DEG = (2, 5, 10)


def moved(image: np.ndarray, shift_px: float = 0.0, rotation_deg: float = 0.0) -> np.ndarray:
    """The image shifted by (shift_px, shift_px) and rotated about its centre; borders replicated."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), rotation_deg, 1.0)
    matrix[:, 2] += shift_px
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def template_alignment(train_folder: Path, margin_px: int = 32) -> Preprocess:
    """ROI step that finds the part by template matching (the centre of the first training
    image, ``margin_px`` in from each side) and crops it: shifts of up to ``margin_px`` are undone."""
    first = read_image(sorted(train_folder.glob("*.png"))[0])
    template = first[margin_px:-margin_px, margin_px:-margin_px]
    return Preprocess((TemplateCrop.from_image(template),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "transistor"))
    parser.add_argument("--out", default="benchmarks/results/shift_robustness")
    parser.add_argument("--configs", nargs="+", default=[*CONFIGS, *ALIGNED], help="which rows to run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = MVTecAD(args.data).test_samples()
    images = [read_image(sample.path) for sample in samples]
    labels = np.array([sample.label for sample in samples])
    moves = [(f"shift {s} px", s, 0.0) for s in SHIFTS_PX] + [(f"rotate {r} deg", 0, r) for r in ROTATIONS_DEG]
    rows: list[dict[str, Any]] = []
    print("| config | " + " | ".join(name for name, _, _ in moves) + " |")
    print("|---|" + "---|" * len(moves))
    alignment = template_alignment(Path(args.data) / "train" / "good")
    for label in args.configs:
        config = CONFIGS[label] if label in CONFIGS else {**CONFIGS[label.split(",")[0]], "preprocess": alignment}
        detector = Detector(image_size=256, **config).fit(Path(args.data))
        cells = []
        for name, shift, rotation in moves:
            predictions = detector.predict_batch([moved(image, shift, rotation) for image in images])
            scores = np.array([p.score for p in predictions])
            false_alarms = float(np.mean([p.verdict != "OK" for p, y in zip(predictions, labels) if y == 0]))
            auroc = image_auroc(scores, labels)
            rows.append({"config": label, "move": name, "shift_px": shift, "rotation_deg": rotation,
                         "image_auroc": auroc, "false_alarm_rate": false_alarms})
            cells.append(f"{auroc:.3f} / {false_alarms:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print("\n(cells: image AUROC / false-alarm rate on test/good at the model's own threshold)")
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in args.configs:
        mine = [r for r in rows if r["config"] == label]
        shifts = [r for r in mine if r["rotation_deg"] == 0]
        turns = [mine[0]] + [r for r in mine if r["rotation_deg"] > 0]
        axes[0].plot([r["shift_px"] for r in shifts], [r["image_auroc"] for r in shifts], marker="o", label=label)
        axes[1].plot([r["rotation_deg"] for r in turns], [r["image_auroc"] for r in turns], marker="o", label=label)
    axes[0].set_xlabel("shift of every test image (px, diagonal)")
    axes[1].set_xlabel("rotation of every test image (degrees)")
    for axis in axes:
        axis.set_ylabel("image AUROC")
        axis.legend(fontsize=8)
    figure.suptitle("transistor, 256 px: robustness to scene shifts")
    figure.tight_layout()
    figure.savefig(out / "shift_robustness.png", dpi=120)
    print(f"plot: {out / 'shift_robustness.png'}")


if __name__ == "__main__":
    main()
