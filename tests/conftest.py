"""Shared fixtures: the real data in ../shared/data (or $DEFECTLENS_DATA).

Outside CI a missing data folder skips the tests that need it, with a message; under CI
(CI=true) it fails them, so a broken checkout can never pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    configured = os.environ.get("DEFECTLENS_DATA")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


def require_data(relative: str) -> Path:
    path = shared_data_root() / relative
    if not path.exists():
        message = f"shared data not found: {path} (set DEFECTLENS_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def transistor_root() -> Path:
    return require_data("mvtec_ad/transistor")


@pytest.fixture(scope="session")
def piped_root() -> Path:
    return require_data("piped")


def textured_images(count: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> list[np.ndarray]:
    """Small float32 RGB images of one smooth stripe texture with a little noise (normal data)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
    images = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi)
        stripes = 0.5 + 0.25 * np.sin(cols / 3.0 + phase) * np.cos(rows / 7.0)
        noisy = stripes[:, :, None] + rng.normal(0, 0.02, size=(*size, 3)).astype(np.float32)
        images.append(np.clip(noisy, 0, 1).astype(np.float32))
    return images


def with_square_defect(image: np.ndarray, top: int, left: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the image with a bright square; returns it and its bool mask."""
    defective = image.copy()
    defective[top : top + side, left : left + side] = [1.0, 0.1, 0.1]
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[top : top + side, left : left + side] = True
    return defective, mask
