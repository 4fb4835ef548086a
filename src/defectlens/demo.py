"""`defectlens demo`: the whole workflow offline, on a data set built from scikit-image.

Good parts are crops of scikit-image's brick-wall photo (a regular texture, like a machined or
woven surface); defective parts are held-out crops with synthetic stains and confetti whose
masks are exact. The demo fits PatchCore, evaluates it, writes heat maps and prints where.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from skimage import data as skimage_data
from skimage.transform import resize

from defectlens.data.images import save_png
from defectlens.data.synthetic import generate_anomaly

CROP = 96
DEMO_KINDS = ("stain", "confetti")


def _brick_crops(count: int, seed: int) -> list[np.ndarray]:
    """`count` random (CROP x CROP x 3) float32 crops of the brick photo, upscaled 2x."""
    wall = skimage_data.brick().astype(np.float32) / 255.0  # (512, 512) grayscale
    wall = resize(wall, (wall.shape[0] * 2, wall.shape[1] * 2), order=1, anti_aliasing=False)
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        top, left = rng.integers(0, wall.shape[0] - CROP, size=2)
        crop = wall[top : top + CROP, left : left + CROP]
        crops.append(np.repeat(crop[:, :, None], 3, axis=2).astype(np.float32))
    return crops


def build_demo_dataset(root: Path, seed: int = 0, train_count: int = 40, test_good: int = 12, per_kind: int = 12) -> Path:
    """Write an MVTec-layout data set under root (train/good, test/*, ground_truth/*)."""
    crops = _brick_crops(train_count + test_good + per_kind * len(DEMO_KINDS), seed)
    for index in range(train_count):
        save_png(root / "train" / "good" / f"{index:03d}.png", (crops[index] * 255).astype(np.uint8))
    for index in range(test_good):
        save_png(root / "test" / "good" / f"{index:03d}.png", (crops[train_count + index] * 255).astype(np.uint8))
    rng = np.random.default_rng(seed + 1)
    start = train_count + test_good
    for kind_index, kind in enumerate(DEMO_KINDS):
        for index in range(per_kind):
            source = crops[start + kind_index * per_kind + index]
            defective, mask = generate_anomaly(source, kind, rng)
            save_png(root / "test" / kind / f"{index:03d}.png", (np.clip(defective, 0, 1) * 255).astype(np.uint8))
            save_png(root / "ground_truth" / kind / f"{index:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


def run_demo(out: Path, quiet: bool = False) -> int:
    """Build the data, fit, evaluate, write heat maps; print where everything is. Returns 0."""
    from defectlens.data.datasets import MVTecAD
    from defectlens.detector import Detector
    from defectlens.evaluation import evaluate
    from defectlens.outputs import ResultsWriter
    from defectlens.progress import ProgressBars

    out.mkdir(parents=True, exist_ok=True)
    data_root = build_demo_dataset(out / "data" / "bricks")
    print(f"demo data set (good brick-wall crops, synthetic stains and confetti): {data_root}")
    progress = ProgressBars(not quiet)
    detector = Detector(method="patchcore", image_size=CROP * 2, coreset_ratio=0.1)
    detector.fit(data_root, progress=progress)
    model_path = detector.save(out / "bricks.dlens")
    report = evaluate(detector, MVTecAD(data_root), progress=progress)
    progress.close()
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
    samples = [sample.path for sample in MVTecAD(data_root).test_samples()]
    with ResultsWriter(out, append=False) as writer:
        for sample, outcome in detector.iter_predictions(samples):
            if isinstance(outcome, Exception):
                writer.write_error(sample, outcome)
                continue
            writer.write(f"{Path(sample).parent.name}_{Path(sample).stem}", outcome)
    image, pixel = report["image"], report["pixel"]
    print(f"model:    {model_path}")
    print(f"accuracy: image AUROC {image['auroc']:.3f}, pixel AUROC {pixel['auroc']:.3f}, AUPRO@0.3 {pixel['aupro']['0.3']:.3f}")
    at = image.get("at_threshold", {})
    print(f"verdicts at the model's threshold {detector.threshold:.3f}: recall {at.get('recall', 0):.2f}, precision {at.get('precision', 0) or 0:.2f}")
    print(f"report:   {out / 'report.json'}")
    print(f"results:  {writer.results_path}")
    print(f"heat maps: {out / 'heatmaps'}/ (jet colour over the image, white outline = defect mask)")
    return 0
