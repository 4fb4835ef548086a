"""The configurations and images of the golden (behaviour-unchanged) test."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import require_data

IMAGE_SIZE = 128
# defectlens 0.1 calibrated on at most 40 held-out images with the quantile rule: pinned here
COMMON = dict(image_size=IMAGE_SIZE, seed=3, batch_size=8, threshold_model="quantile", calibration_images=40)
CONFIGS: dict[str, dict] = {
    "patchcore": dict(method="patchcore", coreset_ratio=0.05, **COMMON),
    "patchcore_reweight_k3": dict(method="patchcore", coreset_ratio=0.05, num_neighbors=3, reweight=True, **COMMON),
    "patchcore_tiled_pool": dict(method="patchcore", coreset_ratio=0.01, tile_size=64, tile_overlap=16, pool_size=3,
                                 blur_sigma=2.0, **{**COMMON, "image_size": 64}),
    "sequential_patchcore": dict(method="sequential_patchcore", coreset_size=400, epochs=2, augmentation="light", **COMMON),
    "padim_full": dict(method="padim", covariance="full", reduced_dim=24, **COMMON),
    "padim_tied": dict(method="padim", covariance="tied", reduced_dim=24, **COMMON),
    "padim_global": dict(method="padim", covariance="global", reduced_dim=24, **COMMON),
}


def _transistor() -> Path:
    return require_data("mvtec_ad/transistor")


def golden_train_images() -> list[Path]:
    return sorted((_transistor() / "train" / "good").glob("*.png"))[:24]


def golden_test_images() -> list[Path]:
    root = _transistor() / "test"
    return [path for kind in ("good", "bent_lead", "misplaced") for path in sorted((root / kind).glob("*.png"))[:4]]
