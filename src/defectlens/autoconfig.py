"""Choosing a configuration without defect images (``defectlens fit --auto``).

The training images are split (seeded) into a fitting part and a validation part. Every
candidate configuration is fitted on the fitting part and scored on a validation set made only
of good images: the validation images themselves (normal) plus copies into which our
generators paste synthetic anomalies with exact masks - several kinds in turn (confetti,
stains, Perlin, water stains, cut-paste), so that no single kind is tuned to. The selection
rule is fixed in advance: the highest mean of image AUROC and AUPRO@0.3 on that set (ties: the
earlier candidate, so cheaper and default configurations are listed first). The winner is then
fitted on all training images. No test image is read: only the images given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from defectlens.data.synthetic import generate_anomaly
from defectlens.errors import ConfigError, ImageReadError
from defectlens.inputs import ImageInput, expand_inputs
from defectlens.metrics import aupro, image_auroc

SYNTHETIC_VALIDATION_KINDS = ("confetti", "stain", "perlin", "water_stain", "cut_paste")
SELECTION_RULE = "mean of image AUROC and AUPRO@0.3 on held-out good images + synthetic anomalies"
STRIDE_4_8_16 = ["_blocks.2", "_blocks.4", "_blocks.10"]  # EfficientNet-Lite0 stage ends at strides 4, 8, 16


@dataclass(frozen=True)
class Candidate:
    """One configuration: a label and the `Detector` keyword arguments it changes."""

    name: str
    params: Mapping[str, Any]


def default_candidates(native_size: int) -> list[Candidate]:
    """The configurations `--auto` tries, cheapest first: methods, layers (an extra stride-4
    level for small defects), blur, a second backbone, an ensemble, and the native resolution."""
    candidates = [
        Candidate("patchcore", {"method": "patchcore"}),
        Candidate("patchcore blur 2", {"method": "patchcore", "blur_sigma": 2.0}),
        Candidate("padim", {"method": "padim"}),
        Candidate("padim s4+8+16 blur 2", {"method": "padim", "layers": STRIDE_4_8_16, "blur_sigma": 2.0}),
        Candidate("padim s4+8+16 no aggregation blur 2",
                  {"method": "padim", "layers": STRIDE_4_8_16, "blur_sigma": 2.0, "feature_aggregation": 1}),
        Candidate("patchcore s4+8+16 blur 2", {"method": "patchcore", "layers": STRIDE_4_8_16, "blur_sigma": 2.0}),
        Candidate("patchcore lite2", {"method": "patchcore", "backbone": "efficientnet_lite2"}),
        Candidate("ensemble patchcore lite0+lite2", {"method": "ensemble", "blur_sigma": 2.0}),
    ]
    if native_size > 256:
        candidates.append(Candidate(f"patchcore at {native_size} px", {"method": "patchcore", "image_size": native_size}))
    return candidates


@dataclass
class ValidationSet:
    """Held-out good images and synthetic anomalies made from them (images float32 RGB)."""

    images: list[np.ndarray]
    masks: list[np.ndarray | None]
    kinds: list[str]

    @property
    def labels(self) -> np.ndarray:
        return np.array([mask is not None for mask in self.masks], dtype=int)


@dataclass
class AutoResult:
    """The chosen candidate and every candidate's validation scores (a row each)."""

    chosen: Candidate
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": SELECTION_RULE, "chosen": self.chosen.name, "chosen_params": dict(self.chosen.params), "candidates": self.rows}

    def table(self) -> str:
        """The candidates' scores as a Markdown table, the chosen one marked."""
        lines = ["| candidate | synthetic image AUROC | synthetic AUPRO@0.3 | selection score | fit s | |", "|---|---|---|---|---|---|"]
        for row in self.rows:
            if row.get("error"):
                lines.append(f"| {row['name']} | - | - | - | - | {row['error']} |")
                continue
            mark = "chosen" if row["name"] == self.chosen.name else ""
            lines.append(f"| {row['name']} | {row['image_auroc']:.3f} | {row['aupro']:.3f} | {row['selection_score']:.3f} | "
                         f"{row['fit_seconds']:.1f} | {mark} |")
        return "\n".join(lines)


def make_validation_set(
    images: Sequence[np.ndarray], seed: int = 0, kinds: Sequence[str] = SYNTHETIC_VALIDATION_KINDS, per_image: int = 2,
) -> ValidationSet:
    """The good images as they are plus ``per_image`` anomalous copies of each, cycling through ``kinds``."""
    if not images:
        raise ConfigError("auto-configuration needs held-out good images")
    rng = np.random.default_rng([seed, 7])
    out = ValidationSet([], [], [])
    turn = 0
    for image in images:
        out.images.append(image)
        out.masks.append(None)
        out.kinds.append("good")
        for _ in range(per_image):
            kind = kinds[turn % len(kinds)]
            turn += 1
            altered, mask = generate_anomaly(image, kind, rng)
            if not mask.any():
                continue
            out.images.append(altered)
            out.masks.append(mask)
            out.kinds.append(kind)
    return out


def score_candidate(make_detector: Callable[..., Any], candidate: Candidate, fit_images: Sequence[ImageInput],
                    validation: ValidationSet) -> dict[str, Any]:
    """Fit ``candidate`` on ``fit_images``; image AUROC and AUPRO@0.3 on ``validation``."""
    started = time.perf_counter()
    detector = make_detector(**candidate.params)
    detector.fit(list(fit_images))
    fit_seconds = time.perf_counter() - started
    predictions = detector.predict_batch(validation.images)
    maps = [prediction.anomaly_map for prediction in predictions]
    image_score = image_auroc([prediction.score for prediction in predictions], validation.labels)
    region_score = aupro(maps, validation.masks, limits=(0.3,))[0.3]
    if image_score is None or region_score is None:
        raise ConfigError("the synthetic validation set has no anomalies: the images may be flat")
    return {
        "name": candidate.name, "params": dict(candidate.params), "image_auroc": image_score, "aupro": region_score,
        "selection_score": 0.5 * (image_score + region_score), "fit_seconds": fit_seconds,
    }


def auto_configure(
    make_detector: Callable[..., Any], images: ImageInput | Iterable[ImageInput], candidates: Sequence[Candidate] | None = None,
    budget_minutes: float | None = None, validation_fraction: float = 0.25, seed: int = 0,
    read: Callable[[ImageInput], np.ndarray] | None = None, report: Callable[[str], None] | None = None,
) -> AutoResult:
    """Score ``candidates`` on synthetic anomalies in held-out training images; pick by the rule.

    Args:
        make_detector: ``make_detector(**candidate.params)`` -> an unfitted Detector (the user's
            other settings bound in).
        images: the training images (good only); nothing else is read.
        candidates: default: `default_candidates` at the images' native size.
        budget_minutes: stop trying further candidates once this much time is spent (the first
            candidate is always scored).
        validation_fraction: share of the training images held out for validation.
        read: image reader (default: `defectlens.data.images.read_image`).
        report: called with one line per scored candidate (progress for people).
    """
    from defectlens.data.images import read_image

    inputs = expand_inputs(images)
    if len(inputs) < 4:
        raise ConfigError(f"--auto needs at least 4 training images (a fitting part and a validation part), got {len(inputs)}")
    order = np.random.default_rng([seed, 3]).permutation(len(inputs))
    held = max(1, int(round(validation_fraction * len(inputs))))
    validation_inputs, fit_inputs = [inputs[i] for i in order[:held]], [inputs[i] for i in order[held:]]
    reader = read or read_image
    held_images = [reader(item) for item in validation_inputs]
    validation = make_validation_set(held_images, seed)
    candidates = list(candidates) if candidates is not None else default_candidates(max(held_images[0].shape[:2]))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for candidate in candidates:
        if rows and budget_minutes is not None and time.perf_counter() - started > budget_minutes * 60:
            rows.append({"name": candidate.name, "params": dict(candidate.params), "error": "not tried: budget spent"})
            continue
        try:
            row = score_candidate(make_detector, candidate, fit_inputs, validation)
        except (ConfigError, ImageReadError, RuntimeError) as error:
            row = {"name": candidate.name, "params": dict(candidate.params), "error": str(error)}
        rows.append(row)
        if report:
            report(_row_line(row))
    scored = [row for row in rows if "error" not in row]
    if not scored:
        raise ConfigError("no candidate configuration could be fitted: " + "; ".join(row["error"] for row in rows))
    best = max(scored, key=lambda row: row["selection_score"])  # max keeps the first of equal scores
    chosen = next(candidate for candidate in candidates if candidate.name == best["name"])
    return AutoResult(chosen, rows)


def _row_line(row: Mapping[str, Any]) -> str:
    if "error" in row:
        return f"{row['name']}: {row['error']}"
    return (f"{row['name']}: synthetic image AUROC {row['image_auroc']:.3f}, AUPRO {row['aupro']:.3f}, "
            f"score {row['selection_score']:.3f} ({row['fit_seconds']:.1f} s)")
