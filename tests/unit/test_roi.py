"""ROI extraction: template crop, Hough circle, roll-out, background removal, orientation, Preprocess."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from defectlens.data.roi import (
    Circle,
    FixedCrop,
    Preprocess,
    RemoveBackground,
    RoiNotFoundError,
    RollOut,
    StandardizeOrientation,
    TemplateCrop,
    find_circle,
    match_template,
    polar_unwrap,
    principal_axis,
    remove_background,
    roll_out,
    standardize_orientation,
)
from defectlens.errors import ConfigError

CENTER = (131, 122)  # x, y
MARK_DEG = 60.0


def ring_image(size: int = 256) -> np.ndarray:
    """A bright ring (radius 80, 20 px thick) on a plain background with a red radial mark at 60°."""
    image = np.full((size, size, 3), 0.2, np.float32)
    cv2.circle(image, CENTER, 80, (0.9, 0.9, 0.9), thickness=20)
    angle = math.radians(MARK_DEG)
    start = (round(CENTER[0] + 68 * math.cos(angle)), round(CENTER[1] + 68 * math.sin(angle)))
    end = (round(CENTER[0] + 92 * math.cos(angle)), round(CENTER[1] + 92 * math.sin(angle)))
    cv2.line(image, start, end, (0.9, 0.1, 0.1), 3)
    return image


def test_hough_finds_the_ring_centre() -> None:
    circle = find_circle(ring_image(), min_radius=50, max_radius=120)
    assert math.hypot(circle.x - CENTER[0], circle.y - CENTER[1]) < 1.0  # with the least-squares refinement
    coarse = find_circle(ring_image(), min_radius=50, max_radius=120, refine=False)
    assert math.hypot(coarse.x - CENTER[0], coarse.y - CENTER[1]) < 3.0
    assert 65 <= circle.radius <= 95  # the inner or the outer edge of the ring
    with pytest.raises(RoiNotFoundError):
        find_circle(np.full((64, 64, 3), 0.5, np.float32))


def test_roll_out_gives_a_straight_band_with_the_mark_at_its_angle() -> None:
    band = polar_unwrap(ring_image(), CENTER, 72, 88, out_height=24, out_width=800)
    assert band.shape == (24, 800, 3) and band.dtype == np.float32
    redness = band[..., 0] - band[..., 1]
    mark_column = int(np.argmax(redness.mean(axis=0)))
    assert abs(mark_column - MARK_DEG / 360 * 800) <= 6
    # away from the mark, each row is constant along x: the ring became a straight band
    columns = np.abs(np.arange(800) - mark_column) > 20
    assert band[:, columns].std(axis=1).max() < 0.02
    assert abs(band[:, columns].mean() - 0.9) < 0.03
    # starting the roll-out at the mark puts it at column 0 (or wrapped to the last columns)
    shifted = polar_unwrap(ring_image(), CENTER, 72, 88, out_width=800, start_angle_deg=MARK_DEG)
    column = int(np.argmax((shifted[..., 0] - shifted[..., 1]).mean(axis=0)))
    assert min(column, 800 - column) <= 6


def test_roll_out_with_hough_and_relative_radii() -> None:
    result = roll_out(ring_image(), 0.6, 1.4, relative_radii=True, out_height=16, out_width=360, min_radius=50, max_radius=120)
    assert result.band.shape == (16, 360, 3)
    assert result.r_outer == pytest.approx(1.4 * result.circle.radius)
    with pytest.raises(ConfigError):
        polar_unwrap(ring_image(), CENTER, 50, 40)


def test_template_matching_finds_the_pasted_part() -> None:
    rng = np.random.default_rng(0)
    overview = rng.random((160, 200, 3)).astype(np.float32) * 0.3
    template = rng.random((30, 40, 3)).astype(np.float32)
    overview[70:100, 110:150] = template
    match = match_template(overview, template)
    assert (match.box.x, match.box.y, match.box.width, match.box.height) == (110, 70, 40, 30)
    assert match.score > 0.99 and np.array_equal(match.crop, template)
    padded = match_template(overview, template, margin=5)
    assert (padded.box.x, padded.box.y, padded.box.width, padded.box.height) == (105, 65, 50, 40)
    with pytest.raises(ConfigError):
        match_template(template, overview)


def part_image(angle_deg: float, size: int = 128) -> np.ndarray:
    """A bright asymmetric part (an ellipse with a knob on one end) on a dark background."""
    image = np.full((size, size, 3), 0.1, np.float32)
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (64, 64), (40, 14), 0, 0, 360, 1, -1)
    cv2.circle(mask, (98, 64), 12, 1, -1)
    rotation = cv2.getRotationMatrix2D((64, 64), angle_deg, 1.0)
    mask = cv2.warpAffine(mask, rotation, (size, size), flags=cv2.INTER_NEAREST)
    image[mask > 0] = (0.8, 0.7, 0.6)
    return image


def test_background_removal_and_orientation_standardisation() -> None:
    image = part_image(0)
    result = remove_background(image, fill_value=0.0)
    truth = image[..., 0] > 0.5
    assert (result.mask != truth).mean() < 0.01
    assert np.all(result.image[~result.mask] == 0.0)
    grabcut = remove_background(image, method="grabcut", grabcut_iterations=2)
    assert (grabcut.mask != truth).mean() < 0.03

    canonical_angles = []
    reference = None
    for angle in (0, 35, 120, 250):
        oriented = standardize_orientation(part_image(angle))
        canonical_angles.append(principal_axis(oriented.mask)[2])
        if reference is None:
            reference = oriented.mask
        else:
            assert (oriented.mask != reference).mean() < 0.02
    for angle in canonical_angles:
        assert min(angle, 360 - angle) < 3.0


def test_preprocess_round_trips_and_applies_the_same_steps() -> None:
    template = ring_image()[100:140, 180:230]
    pre = Preprocess(
        [
            FixedCrop(0, 0, 256, 256),
            TemplateCrop.from_image(template, margin=2, min_score=0.5),
        ]
    )
    restored = Preprocess.from_json(json.dumps(json.loads(pre.to_json())))
    assert restored == pre
    assert np.array_equal(restored.apply(ring_image()), pre.apply(ring_image()))
    assert pre.apply(ring_image()).shape == (44, 54, 3)

    rolls = Preprocess([RollOut(r_inner=72, r_outer=88, center=CENTER, out_width=400)])
    again = Preprocess.from_dict(json.loads(json.dumps(rolls.to_dict())))
    assert again == rolls and again.apply(ring_image()).shape == (24, 400, 3)
    hough = Preprocess.from_dict({"version": 1, "steps": [{"kind": "roll_out", "r_inner": 0.8, "r_outer": 1.2,
                                                          "relative_radii": True, "min_radius": 50, "max_radius": 120}]})
    assert hough.apply(ring_image()).shape == (24, 800, 3)

    parts = Preprocess([RemoveBackground(), StandardizeOrientation()])
    assert Preprocess.from_dict(parts.to_dict()) == parts
    assert parts.apply(part_image(40)).shape == (128, 128, 3)
    assert np.array_equal(Preprocess().apply(ring_image()), ring_image())


@pytest.mark.parametrize(
    "config",
    [
        {"steps": [{"kind": "warp"}]},
        {"steps": [{"kind": "crop", "x": 0}]},
        {"steps": [{"kind": "crop", "x": 0, "y": 0, "width": 4, "height": 4, "depth": 3}]},
        {"version": 99, "steps": []},
        {"steps": [{"kind": "roll_out", "r_inner": 5, "r_outer": 2}]},
    ],
)
def test_bad_preprocess_configs(config) -> None:
    with pytest.raises(ConfigError):
        Preprocess.from_dict(config)


def test_fixed_crop_outside_the_image() -> None:
    with pytest.raises(RoiNotFoundError):
        FixedCrop(200, 200, 100, 100).apply(ring_image())
    assert Circle(1.0, 2.0, 3.0).radius == 3.0
