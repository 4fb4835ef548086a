"""Render docs/gallery/*.png: one figure per synthetic-anomaly generator, augmentation and ROI step.

Run from the repository root::

    .venv/bin/python docs/make_gallery.py [--data ../shared/data/mvtec_ad/transistor/train/good]

Generators are shown on MVTec AD transistor good images when the folder exists (otherwise on
scikit-image sample images), water stains also on a synthetic brushed-aluminium surface, and
the roll-out on a synthetic PET-preform neck (top view). Everything is seeded: re-running
gives identical PNGs.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage import data as skdata  # noqa: E402

from defectlens.data import roi, synthetic  # noqa: E402
from defectlens.data.images import as_float_rgb, read_image  # noqa: E402
from defectlens.data.transforms import STEP_TYPES  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("DEFECTLENS_DATA", HERE.parent.parent / "shared" / "data")) / "mvtec_ad/transistor/train/good"
SIZE = 256
DPI = 72


def good_images(folder: Path, count: int = 4) -> list[np.ndarray]:
    """Good images resized to SIZE×SIZE: transistor if available, else scikit-image samples."""
    files = sorted(folder.glob("*.png"))[:count] if folder.is_dir() else []
    if files:
        images = [read_image(path) for path in files]
    else:
        images = [as_float_rgb(getattr(skdata, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")][:count]
    return [cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for image in images]


def brushed_aluminium(seed: int = 0) -> np.ndarray:
    """A grey surface with horizontal brushing streaks and a soft light falloff."""
    rng = np.random.default_rng(seed)
    streaks = cv2.GaussianBlur(rng.normal(0.0, 1.0, (SIZE, SIZE)).astype(np.float32), (0, 0), sigmaX=25, sigmaY=0.6)
    streaks /= np.abs(streaks).max()
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    shade = 0.62 + 0.08 * np.cos((cols - 0.4) * 2.5) - 0.05 * rows
    surface = np.clip(shade + 0.05 * streaks, 0, 1)
    return np.repeat(surface[..., None], 3, axis=2).astype(np.float32) * np.array([0.97, 0.99, 1.0], np.float32)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask outline in green."""
    out = image.copy()
    edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    out[edge] = (0.1, 1.0, 0.2)
    return out


def save(figure: plt.Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    print(f"{path}  {path.stat().st_size // 1024} KB")


def generator_figure(name: str, title: str, inputs: list[np.ndarray], out_dir: Path, **params) -> None:
    """Row 1: anomalous images, row 2: exact masks, row 3: mask outline on the result."""
    columns = len(inputs)
    figure, axes = plt.subplots(3, columns, figsize=(2.2 * columns, 6.9))
    for column, image in enumerate(inputs):
        anomalous, mask = synthetic.SYNTHETIC_KINDS[name](image, column, **params)
        for row, (panel, label) in enumerate(
            [(anomalous, f"seed {column}"), (mask, f"mask: {mask.mean() * 100:.1f} %"), (overlay(anomalous, mask), "outline")]
        ):
            axis = axes[row, column]
            axis.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axis.set_title(label, fontsize=8)
            axis.axis("off")
    figure.suptitle(title, fontsize=10)
    save(figure, out_dir / f"synthetic_{name}.png")


def perlin_figure(inputs: list[np.ndarray], out_dir: Path) -> None:
    """DRAEM Perlin anomalies: procedural texture source and scikit-image textures as source."""
    sources = [None, as_float_rgb(skdata.coffee()), as_float_rgb(skdata.brick()), as_float_rgb(skdata.gravel())]
    labels = ["procedural", "coffee", "brick", "gravel"]
    figure, axes = plt.subplots(3, len(inputs), figsize=(2.2 * len(inputs), 6.9))
    for column, (image, source, label) in enumerate(zip(inputs, sources, labels)):
        anomalous, mask = synthetic.perlin_anomaly(image, column + 10, source=source)
        for row, panel in enumerate([anomalous, mask, overlay(anomalous, mask)]):
            axes[row, column].imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[row, column].axis("off")
        axes[0, column].set_title(f"source: {label}", fontsize=8)
        axes[1, column].set_title(f"mask: {mask.mean() * 100:.1f} %", fontsize=8)
    figure.suptitle("Perlin-noise anomalies (DRAEM): thresholded Perlin mask, texture, opacity β ~ U(0, 0.8)", fontsize=10)
    save(figure, out_dir / "synthetic_perlin.png")


def perlin_noise_figure(out_dir: Path) -> None:
    figure, axes = plt.subplots(1, 4, figsize=(8.8, 2.5))
    for axis, (scale, octaves) in zip(axes, [(2, 1), (8, 1), ((2, 16), 1), (4, 4)]):
        axis.imshow(synthetic.perlin_noise((SIZE, SIZE), scale, 0, octaves=octaves), cmap="gray", vmin=-1, vmax=1)
        axis.set_title(f"scale {scale}, octaves {octaves}", fontsize=8)
        axis.axis("off")
    figure.suptitle("perlin_noise (numpy, seeded)", fontsize=10)
    save(figure, out_dir / "perlin_noise.png")


def augmentation_figure(image: np.ndarray, out_dir: Path) -> None:
    names = ["rotate", "brightness_contrast", "hflip", "vflip", "gaussian_blur", "gaussian_noise", "random_erasing"]
    figure, axes = plt.subplots(2, 4, figsize=(8.8, 4.8))
    axes = axes.ravel()
    axes[0].imshow(image)
    axes[0].set_title("original", fontsize=8)
    for axis, name in zip(axes[1:], names):
        step = STEP_TYPES[name](p=1.0)
        axis.imshow(step(image, 3))
        axis.set_title(name, fontsize=8)
    for axis in axes:
        axis.axis("off")
    figure.suptitle("augmentations (seed 3, defaults: rotate ±15°, noise σ² ~ U(10, 120))", fontsize=10)
    save(figure, out_dir / "augmentations.png")


def preform_neck(seed: int = 0, size: int = 320) -> tuple[np.ndarray, tuple[int, int]]:
    """Top view of a PET-preform neck: a bright sealing ring with thread lugs and one dark nick."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 0.08, np.float32)
    center = (163, 154)
    cv2.circle(image, center, 118, (0.35, 0.45, 0.55), thickness=-1, lineType=cv2.LINE_AA)  # support ring
    cv2.circle(image, center, 100, (0.78, 0.84, 0.9), thickness=-1, lineType=cv2.LINE_AA)  # neck finish
    cv2.circle(image, center, 78, (0.05, 0.05, 0.06), thickness=-1, lineType=cv2.LINE_AA)  # bore
    for start in range(0, 360, 90):  # four thread lugs on the outer edge
        cv2.ellipse(image, center, (104, 104), 0, start + 10, start + 60, (0.95, 0.97, 1.0), 5, cv2.LINE_AA)
    nick = math.radians(200)
    cv2.circle(image, (round(center[0] + 90 * math.cos(nick)), round(center[1] + 90 * math.sin(nick))), 5, (0.1, 0.1, 0.1), -1)
    image += rng.normal(0, 0.015, image.shape).astype(np.float32)
    return np.clip(image, 0, 1), center


def rollout_figure(out_dir: Path) -> None:
    image, _ = preform_neck()
    circle = roi.find_circle(image, min_radius=85, max_radius=112, accumulator_threshold=40)
    result = roi.roll_out(image, 0.8, 1.08, relative_radii=True, circle=circle, out_height=24, out_width=800)
    shown = image.copy()
    center = (round(circle.x), round(circle.y))
    cv2.circle(shown, center, round(circle.radius), (1.0, 0.2, 0.2), 1)
    for radius in (result.r_inner, result.r_outer):
        cv2.circle(shown, center, round(radius), (0.2, 1.0, 0.2), 1)
    cv2.drawMarker(shown, center, (1.0, 0.2, 0.2), cv2.MARKER_CROSS, 12, 1)
    figure = plt.figure(figsize=(9.0, 4.6))
    grid = figure.add_gridspec(2, 1, height_ratios=[4, 1])
    axis = figure.add_subplot(grid[0])
    axis.imshow(shown)
    axis.set_title(
        f"Hough circle (red) x={circle.x:.0f}, y={circle.y:.0f}, r={circle.radius:.0f}; annulus 0.8r–1.08r (green)", fontsize=8
    )
    axis.axis("off")
    band_axis = figure.add_subplot(grid[1])
    band_axis.imshow(result.band, aspect="auto", interpolation="nearest")
    band_axis.set_title("roll-out 24×800 (rows: radius inner→outer, columns: angle 0→360° clockwise from +x)", fontsize=8)
    band_axis.set_xticks([0, 200, 400, 600, 799])
    band_axis.set_xticklabels(["0°", "90°", "180°", "270°", "360°"], fontsize=7)
    band_axis.set_yticks([])
    save(figure, out_dir / "roi_rollout.png")


def template_figure(images: list[np.ndarray], out_dir: Path) -> None:
    """Paste a part into a larger cluttered overview and find it again from a template."""
    rng = np.random.default_rng(1)
    overview = np.clip(0.25 + 0.1 * rng.standard_normal((300, 420, 3)), 0, 1).astype(np.float32)
    overview = cv2.GaussianBlur(overview, (0, 0), 3)
    part = cv2.resize(images[0], (140, 140), interpolation=cv2.INTER_AREA)
    overview[120:260, 230:370] = part
    template = cv2.resize(images[1], (140, 140), interpolation=cv2.INTER_AREA)  # another good part as template
    match = roi.match_template(overview, template, margin=6)
    shown = overview.copy()
    box = match.box
    cv2.rectangle(shown, (box.x, box.y), (box.x + box.width - 1, box.y + box.height - 1), (0.1, 1.0, 0.2), 2)
    figure, axes = plt.subplots(1, 3, figsize=(9.5, 3.0), gridspec_kw={"width_ratios": [3, 1.1, 1.1]})
    for axis, panel, label in zip(
        axes,
        [shown, template, match.crop],
        [f"overview, match box {box.width}×{box.height} at ({box.x}, {box.y})", "template (another good part)", f"crop, score {match.score:.2f}"],
    ):
        axis.imshow(panel)
        axis.set_title(label, fontsize=8)
        axis.axis("off")
    save(figure, out_dir / "roi_template_match.png")


def part_on_table(angle_deg: float, seed: int) -> np.ndarray:
    """A cup-like part (body + handle) on a light table, at some angle, with mild shading."""
    rng = np.random.default_rng(seed)
    size = 220
    image = np.full((size, size, 3), (0.86, 0.87, 0.88), np.float32)
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (110, 110), (62, 40), 0, 0, 360, 1, -1)
    cv2.ellipse(mask, (178, 110), (18, 14), 0, 0, 360, 1, 8)
    rotation = cv2.getRotationMatrix2D((110, 110), angle_deg, 1.0)
    rotation[:, 2] += rng.uniform(-15, 15, 2)
    mask = cv2.warpAffine(mask, rotation, (size, size), flags=cv2.INTER_NEAREST)
    shade = np.linspace(0.9, 1.05, size, dtype=np.float32)[None, :, None]
    image[mask > 0] = (0.2, 0.35, 0.6)
    image = image * shade + rng.normal(0, 0.01, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def background_orientation_figure(out_dir: Path) -> None:
    angles = [0, 50, 140, 260]
    figure, axes = plt.subplots(3, len(angles), figsize=(8.8, 6.8))
    for column, angle in enumerate(angles):
        image = part_on_table(angle, column)
        removed = roi.remove_background(image, method="otsu", fill_value=0.0, fill_holes=column % 2 == 0)
        oriented = roi.standardize_orientation(removed.image, removed.mask)
        for row, (panel, label) in enumerate(
            [(image, f"input, part at {angle}°"), (removed.image, f"Otsu, fill_holes={column % 2 == 0}"), (oriented.image, f"rotated {oriented.rotation_deg:.0f}°")]
        ):
            axes[row, column].imshow(panel)
            axes[row, column].set_title(label, fontsize=8)
            axes[row, column].axis("off")
    figure.suptitle("background removal and orientation standardisation (principal axis + 3rd moment)", fontsize=10)
    save(figure, out_dir / "roi_background_orientation.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of good images for the generators")
    parser.add_argument("--out", type=Path, default=HERE / "gallery")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images = good_images(args.data)

    generator_figure("confetti", "confetti noise (FCDD): ≤ 2 rectangles / blobs of random colour", images, args.out)
    generator_figure("blackened_confetti", "blackened confetti (PET-preform variant)", images, args.out)
    generator_figure("stain", "stain-shaped noise (Collin & De Vleeschouwer 2021)", images, args.out)
    perlin_figure(images, args.out)
    water_inputs = [brushed_aluminium(0), brushed_aluminium(1), images[0], images[1]]
    generator_figure("water_stain", "water stains (Sequential PatchCore, Alg. 1): jittered grid, Perlin radius, α·(d/r')^γ", water_inputs, args.out)
    perlin_noise_figure(args.out)
    augmentation_figure(images[0], args.out)
    template_figure(images, args.out)
    rollout_figure(args.out)
    background_orientation_figure(args.out)


if __name__ == "__main__":
    main()
