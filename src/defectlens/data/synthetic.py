"""Synthetic anomalies with pixel-exact ground-truth masks, and synthetic MVTec-layout test sets.

Every generator has the signature ``fn(image, rng, **params) -> (anomalous_image, mask)``:

* ``image``: float32 RGB ``(H, W, 3)`` in ``[0, 1]`` (other dtypes/layouts are converted by
  :func:`defectlens.data.images.as_float_rgb`); it is never modified in place.
* ``rng``: an ``int`` seed or a :class:`numpy.random.Generator`; the same seed gives the same
  output, bit for bit.
* ``anomalous_image``: float32 ``(H, W, 3)`` in ``[0, 1]``.
* ``mask``: bool ``(H, W)``, **exactly** the pixels that differ from ``image``. Each generator
  paints a geometric region; :func:`finalize_anomaly` then keeps in the mask only the region
  pixels whose largest channel change exceeds ``CHANGE_TOLERANCE`` (1/255) and restores every
  other pixel to its original value, so ``(anomalous != image).any(-1) == mask`` holds exactly
  and every masked pixel changed by more than one grey level (e.g. a black confetti on a black
  background, or a nearly transparent Perlin blend, is not labelled as a defect).

Generators (``SYNTHETIC_KINDS`` maps the CLI names to them):

``confetti``            :func:`confetti_noise` — FCDD's confetti noise: a few axis-aligned
                        rectangles or rotated elliptic blobs, each of one random colour.
``blackened_confetti``  :func:`blackened_confetti_noise` — the PET-preform variant: the same
                        shapes, painted black.
``stain``               :func:`stain_noise` — stain-shaped noise (Collin & De Vleeschouwer
                        2021): ellipses whose outline is perturbed by random low harmonics,
                        filled with one random colour.
``perlin``              :func:`perlin_anomaly` — DRAEM: a thresholded Perlin-noise mask filled
                        with a texture, blended with opacity β.
``water_stain``         :func:`water_stain` — the water-stain impurity of the Sequential
                        PatchCore study (Mao et al. 2025, Algorithm 1): jittered-grid centres,
                        Perlin-perturbed radii, reflectance change ``α·(d/r')^γ``.

:func:`make_synthetic_testset` turns a folder of good images into an MVTec-AD-layout test set
(``test/good``, ``test/<kind>``, ``ground_truth/<kind>``) for the ``defectlens synth`` command.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import cv2
import numpy as np

from defectlens.data.images import as_float_rgb, read_image, save_png
from defectlens.data.transforms import SeedLike, as_generator, check_range
from defectlens.errors import ConfigError, DatasetError, ImageReadError

logger = logging.getLogger(__name__)

__all__ = [
    "CHANGE_TOLERANCE",
    "AnomalyGenerator",
    "SYNTHETIC_KINDS",
    "finalize_anomaly",
    "perlin_noise",
    "confetti_noise",
    "blackened_confetti_noise",
    "stain_noise",
    "perlin_anomaly",
    "water_stain",
    "cut_paste",
    "generate_anomaly",
    "make_synthetic_testset",
]

CHANGE_TOLERANCE: float = 1.0 / 255.0
"""A pixel counts as changed when one of its channels moved by more than this (one grey level)."""

AnomalyResult = tuple[np.ndarray, np.ndarray]
AnomalyGenerator = Callable[..., AnomalyResult]
Pair = tuple[float, float]


# ---------------------------------------------------------------------------------------------
# shared pieces


def finalize_anomaly(
    original: np.ndarray, altered: np.ndarray, region: np.ndarray, tolerance: float = CHANGE_TOLERANCE
) -> AnomalyResult:
    """Make the mask exact: keep region pixels that changed by more than ``tolerance``.

    Args:
        original: float32 (H, W, 3), the clean image.
        altered: float (H, W, 3), the painted image (clipped to [0, 1] here).
        region: bool (H, W), where the generator painted.
        tolerance: the largest per-channel change that still counts as "unchanged".

    Returns:
        ``(image, mask)`` where ``image`` equals ``original`` outside ``mask`` bit for bit and
        differs by more than ``tolerance`` in at least one channel everywhere inside it.
    """
    altered = np.clip(altered, 0.0, 1.0).astype(np.float32, copy=False)
    changed = np.abs(altered - original).max(axis=2) > tolerance
    mask = np.asarray(region, dtype=bool) & changed
    image = np.where(mask[:, :, None], altered, original).astype(np.float32, copy=False)
    return image, mask


def _prepare(image: np.ndarray) -> np.ndarray:
    """Our image convention, as a private copy."""
    return as_float_rgb(np.asarray(image)).copy()


def _check_instances(min_instances: int, max_instances: int) -> None:
    if not 1 <= int(min_instances) <= int(max_instances):
        raise ConfigError(
            f"need 1 <= min_instances <= max_instances, got min_instances={min_instances}, max_instances={max_instances}"
        )


def _random_color(rng: np.random.Generator, color: Optional[Sequence[float]]) -> np.ndarray:
    if color is None:
        return rng.random(3).astype(np.float32)
    rgb = np.asarray(color, dtype=np.float32).reshape(-1)
    if rgb.size != 3 or rgb.min() < 0.0 or rgb.max() > 1.0:
        raise ConfigError(f"color must be three values in [0, 1], got {color!r}")
    return rgb


def _center_inside(
    rng: np.random.Generator, half_height: float, half_width: float, height: int, width: int
) -> tuple[float, float]:
    """A centre (row, col) keeping a shape of these half extents inside the image when it fits."""
    row = rng.uniform(min(half_height, height / 2), max(height - half_height, height / 2))
    col = rng.uniform(min(half_width, width / 2), max(width - half_width, width / 2))
    return float(row), float(col)


def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as broadcastable (H, 1) and (1, W) float arrays."""
    rows = (np.arange(height, dtype=np.float64) + 0.5)[:, None]
    cols = (np.arange(width, dtype=np.float64) + 0.5)[None, :]
    return rows, cols


# ---------------------------------------------------------------------------------------------
# Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _gradient_noise(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One octave of 2-D gradient (Perlin) noise at lattice coordinates (u, v), in [-1, 1].

    Random unit gradients sit on the integer lattice covering the points; the value is the
    fade-interpolated dot product of each corner's gradient with the offset to the point.
    """
    u_floor = np.floor(u)
    v_floor = np.floor(v)
    col = (u_floor - u_floor.min()).astype(np.intp)
    row = (v_floor - v_floor.min()).astype(np.intp)
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(int(row.max()) + 2, int(col.max()) + 2))
    grad_u, grad_v = np.cos(angles), np.sin(angles)
    frac_u, frac_v = u - u_floor, v - v_floor

    def corner(d_row: int, d_col: int) -> np.ndarray:
        return grad_u[row + d_row, col + d_col] * (frac_u - d_col) + grad_v[row + d_row, col + d_col] * (frac_v - d_row)

    weight_u, weight_v = _fade(frac_u), _fade(frac_v)
    top = corner(0, 0) + weight_u * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + weight_u * (corner(1, 1) - corner(1, 0))
    # The largest value of 2-D gradient noise is sqrt(2)/2: rescale to [-1, 1].
    return np.clip((top + weight_v * (bottom - top)) * math.sqrt(2.0), -1.0, 1.0)


def perlin_noise(
    shape: tuple[int, int],
    scale: Union[float, tuple[float, float]],
    rng: SeedLike,
    *,
    octaves: int = 1,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    angle_deg: float = 0.0,
) -> np.ndarray:
    """Seeded 2-D Perlin noise, vectorised in numpy.

    Args:
        shape: (H, W) of the output.
        scale: lattice cells across the image, one number or (cells along y, cells along x);
            larger means finer blobs. Need not be an integer.
        rng: seed or Generator.
        octaves: number of summed octaves (fractal noise); octave k has ``scale·lacunarity^k``
            cells and weight ``persistence^k``.
        angle_deg: rotates the lattice (DRAEM rotates its noise image instead; same effect).

    Returns:
        float32 (H, W) in [-1, 1] (the sum of octaves is divided by the sum of weights).
    """
    generator = as_generator(rng)
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ConfigError(f"perlin_noise: shape must be positive, got {shape!r}")
    scale_y, scale_x = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
    if scale_y <= 0 or scale_x <= 0 or octaves < 1:
        raise ConfigError(f"perlin_noise: scale must be > 0 and octaves >= 1, got scale={scale!r}, octaves={octaves}")
    rows, cols = _pixel_grid(height, width)
    y_unit = np.broadcast_to(rows / height - 0.5, (height, width))
    x_unit = np.broadcast_to(cols / width - 0.5, (height, width))
    theta = math.radians(angle_deg)
    x_rot = math.cos(theta) * x_unit - math.sin(theta) * y_unit
    y_rot = math.sin(theta) * x_unit + math.cos(theta) * y_unit
    total = np.zeros((height, width), dtype=np.float64)
    weight_sum = 0.0
    for octave in range(int(octaves)):
        frequency = lacunarity**octave
        weight = persistence**octave
        offset_u, offset_v = generator.uniform(0.0, 1.0, size=2)
        total += weight * _gradient_noise(
            x_rot * scale_x * frequency + offset_u, y_rot * scale_y * frequency + offset_v, generator
        )
        weight_sum += weight
    return (total / weight_sum).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# confetti (FCDD) and its blackened PET-preform variant


def _shape_region(
    rows: np.ndarray,
    cols: np.ndarray,
    center: tuple[float, float],
    size: tuple[float, float],
    angle: float,
    rectangle: bool,
) -> np.ndarray:
    """Axis-aligned rectangle, or ellipse rotated by ``angle`` (radians); size = full extents."""
    d_row, d_col = rows - center[0], cols - center[1]
    half_h, half_w = size[0] / 2.0, size[1] / 2.0
    if rectangle:
        return (np.abs(d_row) <= half_h) & (np.abs(d_col) <= half_w)
    along = d_col * math.cos(angle) + d_row * math.sin(angle)
    across = -d_col * math.sin(angle) + d_row * math.cos(angle)
    return (along / half_w) ** 2 + (across / half_h) ** 2 <= 1.0


def confetti_noise(
    image: np.ndarray,
    rng: SeedLike,
    *,
    min_instances: int = 1,
    max_instances: int = 2,
    size_range: Pair = (0.04, 0.15),
    shape: str = "mixed",
    color: Optional[Sequence[float]] = None,
) -> AnomalyResult:
    """Confetti noise (FCDD): solid shapes of random colour pasted onto the image.

    Args:
        min_instances, max_instances: the number of shapes is drawn uniformly from this range
            (default 1–2: a local defect, not the dense confetti FCDD uses as outlier exposure).
        size_range: each side (or ellipse diameter) as a fraction of the shorter image side,
            drawn independently for height and width (default 4–15 %: about 10–38 px at 256 px,
            large enough to survive an 8-px feature stride).
        shape: ``"rectangle"`` (axis-aligned, as FCDD), ``"blob"`` (rotated ellipse) or
            ``"mixed"`` (each shape picks one).
        color: RGB in [0, 1] for every shape; None draws one uniform random colour per shape.

    Returns:
        ``(image, mask)``; shapes lie inside the image (unless larger than it).
    """
    original = _prepare(image)
    generator = as_generator(rng)
    _check_instances(min_instances, max_instances)
    low, high = check_range("size_range", size_range, 0.0, 1.0)
    if shape not in ("rectangle", "blob", "mixed"):
        raise ConfigError(f"confetti shape must be 'rectangle', 'blob' or 'mixed', got {shape!r}")
    height, width = original.shape[:2]
    rows, cols = _pixel_grid(height, width)
    side = min(height, width)
    altered = original.copy()
    region = np.zeros((height, width), dtype=bool)
    for _ in range(int(generator.integers(min_instances, max_instances + 1))):
        size = (max(1.0, generator.uniform(low, high) * side), max(1.0, generator.uniform(low, high) * side))
        rectangle = shape == "rectangle" or (shape == "mixed" and generator.random() < 0.5)
        angle = generator.uniform(0.0, math.pi)
        if rectangle:
            half_extents = (size[0] / 2, size[1] / 2)
        else:  # bounding box of the rotated ellipse
            half_extents = (
                math.hypot(size[1] / 2 * math.sin(angle), size[0] / 2 * math.cos(angle)),
                math.hypot(size[1] / 2 * math.cos(angle), size[0] / 2 * math.sin(angle)),
            )
        center = _center_inside(generator, half_extents[0], half_extents[1], height, width)
        painted = _shape_region(rows, cols, center, size, angle, rectangle)
        altered[painted] = _random_color(generator, color)
        region |= painted
    return finalize_anomaly(original, altered, region)


def blackened_confetti_noise(
    image: np.ndarray,
    rng: SeedLike,
    *,
    min_instances: int = 1,
    max_instances: int = 2,
    size_range: Pair = (0.04, 0.15),
    shape: str = "mixed",
) -> AnomalyResult:
    """Blackened confetti (the PET-preform variant): :func:`confetti_noise` painted black.

    Black shapes mimic burnt or dark inclusions in the preform; on an already black pixel
    nothing changes, so such pixels stay out of the mask.
    """
    return confetti_noise(
        image,
        rng,
        min_instances=min_instances,
        max_instances=max_instances,
        size_range=size_range,
        shape=shape,
        color=(0.0, 0.0, 0.0),
    )


# ---------------------------------------------------------------------------------------------
# stain-shaped noise (Collin & De Vleeschouwer 2021)


def stain_noise(
    image: np.ndarray,
    rng: SeedLike,
    *,
    min_instances: int = 1,
    max_instances: int = 2,
    size_range: Pair = (0.05, 0.18),
    aspect_range: Pair = (0.35, 1.0),
    irregularity: float = 0.3,
    harmonics: int = 7,
    color: Optional[Sequence[float]] = None,
) -> AnomalyResult:
    """Stain-shaped noise: irregular ellipse-like shapes of one random colour each.

    The outline in polar coordinates about the stain centre is the ellipse's radius times
    ``1 + Σ_k c_k cos(k·t + φ_k)`` for harmonics k = 2..``harmonics``, with ``c_k ∝ 1/k``
    scaled so the largest relative deviation is ``irregularity``: a smooth, lobed blob that
    always contains its centre (star-shaped), like the stains of Collin & De Vleeschouwer.

    Args:
        size_range: the semi-major axis as a fraction of the shorter image side
            (default 5–18 %: 13–46 px at 256 px).
        aspect_range: semi-minor / semi-major axis (default 0.35–1: elongated to round).
        irregularity: largest relative deviation of the outline from the ellipse (default 0.3).
        harmonics: highest harmonic of the outline perturbation (default 7).
        color: RGB in [0, 1]; None draws a uniform random colour per stain.
    """
    original = _prepare(image)
    generator = as_generator(rng)
    _check_instances(min_instances, max_instances)
    size_low, size_high = check_range("size_range", size_range, 0.0, 1.0)
    aspect_low, aspect_high = check_range("aspect_range", aspect_range, 0.0, 1.0)
    if not 0.0 <= irregularity < 1.0 or harmonics < 2:
        raise ConfigError(
            f"stain: need 0 <= irregularity < 1 and harmonics >= 2, got {irregularity!r}, {harmonics!r}"
        )
    height, width = original.shape[:2]
    rows, cols = _pixel_grid(height, width)
    side = min(height, width)
    altered = original.copy()
    region = np.zeros((height, width), dtype=bool)
    orders = np.arange(2, int(harmonics) + 1, dtype=np.float64)
    probe = np.linspace(0.0, 2.0 * math.pi, 720, endpoint=False)
    for _ in range(int(generator.integers(min_instances, max_instances + 1))):
        semi_major = max(1.0, generator.uniform(size_low, size_high) * side)
        semi_minor = max(1.0, semi_major * generator.uniform(max(aspect_low, 1e-3), aspect_high))
        reach = semi_major * (1.0 + irregularity)
        center = _center_inside(generator, reach, reach, height, width)
        rotation = generator.uniform(0.0, math.pi)
        amplitudes = generator.uniform(-1.0, 1.0, size=orders.size) / orders
        phases = generator.uniform(0.0, 2.0 * math.pi, size=orders.size)
        peak = np.abs(np.cos(np.outer(probe, orders) + phases) @ amplitudes).max()
        amplitudes *= irregularity / peak if peak > 0 else 0.0

        d_row, d_col = rows - center[0], cols - center[1]
        along = d_col * math.cos(rotation) + d_row * math.sin(rotation)
        across = -d_col * math.sin(rotation) + d_row * math.cos(rotation)
        t = np.arctan2(across, along)
        ellipse_radius = semi_major * semi_minor / np.sqrt((semi_minor * np.cos(t)) ** 2 + (semi_major * np.sin(t)) ** 2)
        wobble = 1.0 + np.tensordot(np.cos(t[..., None] * orders + phases), amplitudes, axes=([-1], [0]))
        painted = np.hypot(along, across) <= ellipse_radius * wobble
        altered[painted] = _random_color(generator, color)
        region |= painted
    return finalize_anomaly(original, altered, region)


# ---------------------------------------------------------------------------------------------
# Perlin-noise anomalies (DRAEM)


def _procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A colourful fractal-noise texture standing in for DRAEM's DTD anomaly source."""
    height, width = shape
    base = perlin_noise(shape, float(rng.uniform(3.0, 12.0)), rng, octaves=4, angle_deg=float(rng.uniform(0, 180)))
    detail = perlin_noise(shape, float(rng.uniform(16.0, 48.0)), rng, octaves=2)
    palette = rng.random((3, 3)).astype(np.float32)  # three random colours
    t = (base + 1.0) / 2.0
    low_mix = np.clip(2.0 * t, 0.0, 1.0)[..., None]
    high_mix = np.clip(2.0 * t - 1.0, 0.0, 1.0)[..., None]
    texture = palette[0] * (1 - low_mix) + palette[1] * low_mix
    texture = texture * (1 - high_mix) + palette[2] * high_mix
    texture = texture * (0.75 + 0.25 * detail[..., None])
    return np.clip(texture, 0.0, 1.0).astype(np.float32).reshape(height, width, 3)


def _anomaly_source(
    source: Union[None, np.ndarray, Sequence[np.ndarray]], shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """The texture pasted into the Perlin mask, resized to ``shape``."""
    if source is None:
        return _procedural_texture(shape, rng)
    if isinstance(source, np.ndarray):
        chosen = source
    else:
        options = list(source)
        if not options:
            raise ConfigError("perlin_anomaly: source is an empty sequence")
        chosen = options[int(rng.integers(len(options)))]
    texture = as_float_rgb(np.asarray(chosen), "<anomaly source>")
    if texture.shape[:2] != shape:
        texture = cv2.resize(texture, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return texture


def perlin_anomaly(
    image: np.ndarray,
    rng: SeedLike,
    *,
    source: Union[None, np.ndarray, Sequence[np.ndarray]] = None,
    scale_exponent_range: tuple[int, int] = (0, 5),
    threshold: float = 0.5,
    beta_range: Pair = (0.0, 0.8),
    rotate: bool = True,
    min_area_fraction: float = 0.002,
    max_tries: int = 20,
) -> AnomalyResult:
    """DRAEM-style anomaly: a thresholded Perlin mask filled with a texture, blended with β.

    ``out = image`` outside the mask and ``(1 - β)·source + β·image`` inside, where β ~ U(beta_range)
    is DRAEM's opacity of the *original* image (β = 0: the texture replaces the image).

    Args:
        source: texture image(s) (any size; resized to the image) or None for a procedural
            colourful fractal-noise texture (DRAEM uses DTD textures, which we cannot ship).
        scale_exponent_range: lattice cells per axis are ``2^k`` with k drawn independently
            per axis from this inclusive range (DRAEM: 0..5, i.e. 1 to 32 cells).
        threshold: noise level above which pixels join the mask (DRAEM: 0.5).
        beta_range: DRAEM's (0, 0.8).
        rotate: rotate the noise lattice by a random angle (DRAEM rotates its noise ±90°).
        min_area_fraction: redraw the noise (up to ``max_tries`` times) until the mask covers
            at least this fraction of the image, so the result is never an empty anomaly.
    """
    original = _prepare(image)
    generator = as_generator(rng)
    low_exp, high_exp = (int(v) for v in scale_exponent_range)
    if not 0 <= low_exp <= high_exp <= 10:
        raise ConfigError(f"perlin: scale_exponent_range must be 0 <= min <= max <= 10, got {scale_exponent_range!r}")
    beta_low, beta_high = check_range("beta_range", beta_range, 0.0, 1.0)
    if not -1.0 < threshold < 1.0:
        raise ConfigError(f"perlin: threshold must be in (-1, 1), got {threshold!r}")
    height, width = original.shape[:2]
    best_region = np.zeros((height, width), dtype=bool)
    for _ in range(max(1, int(max_tries))):
        scale = (2.0 ** generator.integers(low_exp, high_exp + 1), 2.0 ** generator.integers(low_exp, high_exp + 1))
        angle = float(generator.uniform(-90.0, 90.0)) if rotate else 0.0
        region = perlin_noise((height, width), scale, generator, angle_deg=angle) > threshold
        if region.sum() > best_region.sum():
            best_region = region
        if best_region.mean() >= min_area_fraction:
            break
    texture = _anomaly_source(source, (height, width), generator)
    beta = float(generator.uniform(beta_low, beta_high))
    blended = (1.0 - beta) * texture + beta * original
    altered = np.where(best_region[..., None], blended, original)
    return finalize_anomaly(original, altered, best_region)


# ---------------------------------------------------------------------------------------------
# water stains (Sequential PatchCore study, Algorithm 1)


def water_stain(
    image: np.ndarray,
    rng: SeedLike,
    *,
    cell_size: Optional[float] = None,
    stain_probability: float = 0.35,
    min_stains: int = 1,
    max_stains: Optional[int] = None,
    radius_range: Pair = (0.2, 0.45),
    perlin_frequency: float = 6.0,
    perlin_amplitude: float = 0.3,
    perlin_octaves: int = 2,
    gamma_range: Pair = (1.0, 3.0),
    alpha_range: Pair = (0.08, 0.25),
    polarity: str = "random",
) -> AnomalyResult:
    """Procedural water stains after Algorithm 1 of the Sequential PatchCore study (Mao et al.).

    1. The image is tiled by square cells of ``cell_size`` G pixels; each cell holds one stain
       with probability ``stain_probability``, its centre drawn uniformly inside the cell
       (jittered grid sampling), its base radius r = G·U(radius_range), exponent γ ~
       U(gamma_range), strength α ~ U(alpha_range) and a sign from ``polarity``.
    2. For each pixel the nearest stain centre is searched in the pixel's own cell and its 8
       neighbours (enough because every perturbed radius stays below G).
    3. The radius is perturbed by fractal Perlin noise evaluated at the pixel position
       (solid texturing): ``r' = r·(1 + A·N(p))`` with amplitude A = ``perlin_amplitude`` and
       ``perlin_frequency`` noise cells per grid cell, giving a ragged outline.
    4. Inside the outline (d < r', d = distance to the centre) the reflectance changes by
       ``±α·(d/r')^γ``: nearly nothing at the centre, strongest at the rim — the dried ring of a
       water drop. The same pass writes the mask (then made exact by :func:`finalize_anomaly`;
       the tiny centre where ``α·(d/r')^γ`` is below one grey level is left out).

    Defaults, in the study's spirit, for a 256-px image: G = shorter side / 3 (85 px, a 3×3
    grid, about 3 stains at p = 0.35), radii
    17–38 px, A = 0.3 with 6 noise cells per G and 2 octaves (a ragged, lobed outline rather
    than a circle), γ in 1–3 (from a filled spot with a soft rim to a thin dried ring), α in
    0.08–0.25 (a faint to a clearly visible stain), darker or lighter at random (mineral residue
    shows either way depending on the lighting). Lengths are fractions of G, so they scale
    with the image.

    Args:
        cell_size: G in pixels (need not be an integer); None → ``max(8, min(H, W) / 3)``.
        max_stains: optional cap on the number of stains (a random subset is kept).
        min_stains: at least this many cells get a stain.
        polarity: ``"dark"``, ``"bright"`` or ``"random"`` (per stain).
    """
    original = _prepare(image)
    generator = as_generator(rng)
    height, width = original.shape[:2]
    grid = float(cell_size) if cell_size is not None else max(8.0, min(height, width) / 3.0)
    r_low, r_high = check_range("radius_range", radius_range, 0.0, 1.0)
    g_low, g_high = check_range("gamma_range", gamma_range, 0.0)
    a_low, a_high = check_range("alpha_range", alpha_range, 0.0, 1.0)
    if grid < 2:
        raise ConfigError(f"water_stain: cell_size must be >= 2 pixels, got {cell_size!r}")
    if not 0.0 <= perlin_amplitude < 1.0 or r_high * (1.0 + perlin_amplitude) >= 1.0:
        raise ConfigError(
            "water_stain: need 0 <= perlin_amplitude < 1 and radius_range max * (1 + perlin_amplitude) < 1 "
            f"(a stain must fit the 3x3-cell search), got radius_range={radius_range!r}, perlin_amplitude={perlin_amplitude!r}"
        )
    if polarity not in ("dark", "bright", "random"):
        raise ConfigError(f"water_stain: polarity must be 'dark', 'bright' or 'random', got {polarity!r}")
    if not 0.0 <= stain_probability <= 1.0 or min_stains < 0 or (max_stains is not None and max_stains < max(1, min_stains)):
        raise ConfigError(
            f"water_stain: need stain_probability in [0, 1] and 0 <= min_stains <= max_stains, got "
            f"{stain_probability!r}, {min_stains!r}, {max_stains!r}"
        )

    # 1. one jittered centre per cell, a stain in some of them
    cells_y, cells_x = max(1, math.ceil(height / grid - 1e-9)), max(1, math.ceil(width / grid - 1e-9))
    # uniform inside the part of each cell that lies in the image (the last row/column may be cut)
    cell_top = np.arange(cells_y)[:, None] * grid
    cell_left = np.arange(cells_x)[None, :] * grid
    center_y = cell_top + generator.random((cells_y, cells_x)) * np.minimum(grid, height - cell_top)
    center_x = cell_left + generator.random((cells_y, cells_x)) * np.minimum(grid, width - cell_left)
    has_stain = (generator.random((cells_y, cells_x)) < stain_probability).reshape(-1)
    stained = np.flatnonzero(has_stain)
    if stained.size < min_stains:
        empty = np.flatnonzero(~has_stain)
        has_stain[generator.choice(empty, size=min(min_stains - stained.size, empty.size), replace=False)] = True
    elif max_stains is not None and stained.size > max_stains:
        has_stain[generator.choice(stained, size=stained.size - max_stains, replace=False)] = False
    has_stain = has_stain.reshape(cells_y, cells_x)
    radius = generator.uniform(r_low, r_high, (cells_y, cells_x)) * grid
    gamma = generator.uniform(g_low, g_high, (cells_y, cells_x))
    signs = {"dark": -np.ones((cells_y, cells_x)), "bright": np.ones((cells_y, cells_x))}.get(
        polarity, generator.choice([-1.0, 1.0], size=(cells_y, cells_x))
    )
    strength = generator.uniform(a_low, a_high, (cells_y, cells_x)) * signs

    # 2. nearest stained centre among the 3x3 cells around each pixel (one-cell padding)
    def padded(values: np.ndarray, fill: float) -> np.ndarray:
        return np.pad(values, 1, constant_values=fill)

    center_y_p, center_x_p = padded(center_y, 0.0), padded(center_x, 0.0)
    has_stain_p = np.pad(has_stain, 1, constant_values=False)
    rows, cols = _pixel_grid(height, width)
    cell_row = np.minimum(rows // grid, cells_y - 1).astype(np.intp) + 1
    cell_col = np.minimum(cols // grid, cells_x - 1).astype(np.intp) + 1
    best_d2 = np.full((height, width), np.inf)
    best_row = np.zeros((height, width), dtype=np.intp)
    best_col = np.zeros((height, width), dtype=np.intp)
    for d_row in (-1, 0, 1):
        for d_col in (-1, 0, 1):
            nb_row = np.broadcast_to(cell_row + d_row, (height, width))
            nb_col = np.broadcast_to(cell_col + d_col, (height, width))
            d2 = (rows - center_y_p[nb_row, nb_col]) ** 2 + (cols - center_x_p[nb_row, nb_col]) ** 2
            d2 = np.where(has_stain_p[nb_row, nb_col], d2, np.inf)
            closer = d2 < best_d2
            best_d2 = np.where(closer, d2, best_d2)
            best_row = np.where(closer, nb_row, best_row)
            best_col = np.where(closer, nb_col, best_col)
    found = np.isfinite(best_d2)

    # 3. Perlin-perturbed radius at each pixel
    noise = perlin_noise(
        (height, width), (height / grid * perlin_frequency, width / grid * perlin_frequency), generator,
        octaves=perlin_octaves,
    ).astype(np.float64)
    base_radius = padded(radius, 0.0)[best_row, best_col]
    perturbed_radius = np.maximum(base_radius * (1.0 + perlin_amplitude * noise), 1e-6)
    distance = np.sqrt(np.where(found, best_d2, 0.0))
    inside = found & (distance < perturbed_radius)

    # 4. reflectance change ±α·(d/r')^γ inside the outline
    ratio = np.where(inside, distance / perturbed_radius, 0.0)
    change = padded(strength, 0.0)[best_row, best_col] * ratio ** padded(gamma, 1.0)[best_row, best_col]
    altered = original + np.where(inside, change, 0.0)[..., None].astype(np.float32)
    return finalize_anomaly(original, altered, inside)


def cut_paste(
    image: np.ndarray,
    rng: SeedLike,
    *,
    size_range: Pair = (0.06, 0.2),
    rotate: bool = True,
) -> AnomalyResult:
    """CutPaste (Li et al. 2021): a rectangular patch of the image itself, optionally turned by
    90 / 180 / 270 degrees and jittered in brightness, pasted at another place.

    Args:
        size_range: patch sides as fractions of the shorter image side.
        rotate: turn the patch by a random multiple of 90 degrees.

    Returns:
        ``(image, mask)``: the mask is where the pasted patch changed the image.
    """
    original = _prepare(image)
    generator = as_generator(rng)
    low, high = check_range("size_range", size_range, 0.0, 1.0)
    height, width = original.shape[:2]
    side = max(1, int(round(generator.uniform(low, high) * min(height, width))))
    patch_rows, patch_cols = side, max(1, int(round(side * generator.uniform(0.5, 2.0))))
    patch_cols = min(patch_cols, width)
    top, left = int(generator.integers(0, height - patch_rows + 1)), int(generator.integers(0, width - patch_cols + 1))
    patch = original[top:top + patch_rows, left:left + patch_cols]
    if rotate:
        patch = np.rot90(patch, int(generator.integers(1, 4)))
    patch = np.clip(patch * generator.uniform(0.8, 1.2), 0.0, 1.0)
    rows, cols = patch.shape[:2]
    rows, cols = min(rows, height), min(cols, width)
    to_top, to_left = int(generator.integers(0, height - rows + 1)), int(generator.integers(0, width - cols + 1))
    altered = original.copy()
    altered[to_top:to_top + rows, to_left:to_left + cols] = patch[:rows, :cols]
    region = np.zeros((height, width), dtype=bool)
    region[to_top:to_top + rows, to_left:to_left + cols] = True
    return finalize_anomaly(original, altered, region)


# ---------------------------------------------------------------------------------------------
# registry and test-set writer

SYNTHETIC_KINDS: dict[str, AnomalyGenerator] = {
    "confetti": confetti_noise,
    "blackened_confetti": blackened_confetti_noise,
    "stain": stain_noise,
    "perlin": perlin_anomaly,
    "water_stain": water_stain,
    "cut_paste": cut_paste,
}
"""CLI kind name → generator."""


def _generator_for(kind: str) -> AnomalyGenerator:
    generator = SYNTHETIC_KINDS.get(kind) if isinstance(kind, str) else None
    if generator is None:
        raise ConfigError(f"unknown synthetic anomaly kind {kind!r}; choose one of: {', '.join(SYNTHETIC_KINDS)}")
    return generator


def generate_anomaly(image: np.ndarray, kind: str, rng: SeedLike, **params: Any) -> AnomalyResult:
    """Dispatch to the generator named ``kind`` (see :data:`SYNTHETIC_KINDS`)."""
    generator = _generator_for(kind)
    try:
        return generator(image, rng, **params)
    except TypeError as error:
        raise ConfigError(f"synthetic anomaly {kind!r}: {error}") from None


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_synthetic_testset(
    good_images: Sequence[Union[str, Path]],
    kind: str,
    count: int,
    out_dir: Union[str, Path],
    seed: int = 0,
    good_count: Optional[int] = None,
    params: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write an MVTec-AD-layout test set of synthetic anomalies made from good images.

    Layout under ``out_dir``::

        test/good/000.png ...            untouched good images (decoded and re-encoded as PNG)
        test/<kind>/000.png ...          good images with one synthetic anomaly each
        ground_truth/<kind>/000_mask.png uint8 0/255 masks, same size as their image
        synthetic_<kind>.json            provenance: kind, seed, params, source file per output

    No ``train`` folder is written. Good images are drawn without repetition using ``seed``;
    anomalous images start from the images not used as good ones and cycle when ``count``
    exceeds them. An image whose anomaly ends up (nearly) invisible is redrawn with a new
    random state (up to 10 times).

    Args:
        good_images: paths of defect-free images.
        kind: one of :data:`SYNTHETIC_KINDS`.
        count: number of anomalous images (>= 1).
        seed: the whole set is a function of (good_images, kind, count, seed, params).
        good_count: number of good test images; None → ``min(count, len(good_images))``.
        params: keyword parameters for the generator.

    Raises:
        ConfigError: unknown kind, bad count / good_count / params, or target folders that
            already hold images (a second kind may share ``out_dir``; the same kind may not).
        DatasetError: no readable good image.
    """
    generator_fn = _generator_for(kind)
    params = dict(params or {})
    paths = [Path(p) for p in good_images]
    if not paths:
        raise DatasetError("make_synthetic_testset: no good images given")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ConfigError(f"count must be a positive integer, got {count!r}")
    n_good = min(int(count), len(paths)) if good_count is None else int(good_count)
    if not 0 <= n_good <= len(paths):
        raise ConfigError(f"good_count must be in [0, {len(paths)}] (the number of good images), got {good_count!r}")

    root = Path(out_dir)
    good_dir, anomaly_dir, mask_dir = root / "test" / "good", root / "test" / kind, root / "ground_truth" / kind
    for folder in (anomaly_dir, mask_dir):
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(f"{folder} already holds files; choose another output folder or remove it")

    rng = np.random.default_rng(seed)
    order = [paths[i] for i in rng.permutation(len(paths))]
    good_paths = order[:n_good]
    source_paths = order[n_good:] or order
    unreadable: set[Path] = set()

    def read_or_skip(path: Path) -> Optional[np.ndarray]:
        if path in unreadable:
            return None
        try:
            return read_image(path)
        except ImageReadError as error:
            logger.warning("skipping unreadable good image: %s", error)
            unreadable.add(path)
            return None

    manifest: dict[str, Any] = {"kind": kind, "seed": seed, "count": int(count), "params": params, "good": [], "anomalous": []}
    good_dir.mkdir(parents=True, exist_ok=True)
    written_good = 0
    for path in good_paths:
        image = read_or_skip(path)
        if image is None:
            continue
        name = f"{written_good:03d}.png"
        save_png(good_dir / name, _to_uint8(image))
        manifest["good"].append({"image": f"test/good/{name}", "source": str(path)})
        written_good += 1

    children = np.random.SeedSequence(seed).spawn(int(count))
    position = 0
    for index in range(int(count)):
        image = None
        for _ in range(len(source_paths) + 1):
            image = read_or_skip(source_paths[position % len(source_paths)])
            source = source_paths[position % len(source_paths)]
            position += 1
            if image is not None:
                break
        if image is None:
            raise DatasetError(f"none of the {len(paths)} good images could be read (first: {paths[0]})")
        child = np.random.default_rng(children[index])
        min_pixels = max(16, int(0.0005 * image.shape[0] * image.shape[1]))
        best: Optional[AnomalyResult] = None
        for _ in range(10):
            try:
                anomalous, mask = generator_fn(image, child, **params)
            except TypeError as error:
                raise ConfigError(f"synthetic anomaly {kind!r}: {error}") from None
            if best is None or mask.sum() > best[1].sum():
                best = (anomalous, mask)
            if mask.sum() >= min_pixels:
                break
        assert best is not None
        anomalous, mask = best
        if not mask.any():
            logger.warning("synthetic %s anomaly on %s changed no pixel after 10 tries", kind, source)
        name = f"{index:03d}"
        save_png(anomaly_dir / f"{name}.png", _to_uint8(anomalous))
        save_png(mask_dir / f"{name}_mask.png", mask.astype(np.uint8) * 255)
        manifest["anomalous"].append(
            {"image": f"test/{kind}/{name}.png", "mask": f"ground_truth/{kind}/{name}_mask.png", "source": str(source)}
        )
    if unreadable:
        manifest["unreadable"] = sorted(str(p) for p in unreadable)
    (root / f"synthetic_{kind}.json").write_text(json.dumps(manifest, indent=2, default=str))
    return root
