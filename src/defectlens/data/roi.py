"""Region-of-interest extraction: template crop, circle roll-out, background removal, orientation.

All functions take and return images in our convention — float32 RGB ``(H, W, 3)`` in
``[0, 1]`` — and are deterministic. Coordinates are pixels, ``x`` to the right, ``y`` down.

* :func:`match_template` — find a part in an overview image from a template
  (``cv2.matchTemplate``) and crop it; returns crop, box and score.
* :func:`find_circle` + :func:`polar_unwrap` (or :func:`roll_out`, both at once) — locate a
  round closure such as a PET preform neck with the circular Hough transform
  (``cv2.HoughCircles``) and unwrap the annulus between ``r_inner`` and ``r_outer`` into a
  straight "roll-out" band: rows are radii (row 0 = ``r_inner``), columns are angles
  (column ``j`` ↔ angle ``start_angle_deg + 360·j / out_width``, measured from +x towards +y,
  i.e. clockwise on screen). A roll-out wraps around at its left/right edges; backbones can
  pad circularly for it (``FeatureExtractor(circular_padding=True)``).
* :func:`remove_background` — separate a part from a plain background and fill the
  background with a constant.
* :func:`standardize_orientation` — rotate (and re-centre) the part so its principal axis
  lies at a canonical angle.
* :class:`Preprocess` — a JSON-safe list of these steps with ``apply(image) -> image``, stored
  in a model file so ``predict`` applies exactly the ROI steps ``fit`` used.

Classical background removal versus a learned U-Net
---------------------------------------------------
The reusable-cup inspection pipeline segments the cup with a U-Net trained on annotated
masks, then rotates it to a canonical pose. We cannot ship such a network (it is trained on
one product and its images), so :func:`remove_background` is classical: Otsu's global
threshold on the grey image (the polarity is chosen so the image border is background),
morphological closing/opening, the largest connected component and hole filling — or
OpenCV's GrabCut seeded with a rectangle inset from the border. This is exact, fast,
needs no training and is fully explained by two or three parameters, and it works whenever
the part contrasts with a plain, evenly lit background (light table, dark conveyor belt).
It fails where a U-Net shines: transparent or glossy parts whose grey levels overlap the
background, strong shadows or reflections, cluttered or textured backgrounds, and parts
touching the image border. A learned model also produces the orientation cue implicitly,
whereas we take it from image moments (principal axis, with the sign fixed by the
third-order moment), which is ambiguous for nearly round parts (both eigenvalues close) —
for those, leave orientation off or use a template / Hough step instead.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from defectlens.data.images import as_float_rgb, decode_image_bytes
from defectlens.errors import ConfigError, DefectlensError
from defectlens.params import dataclass_from_dict

__all__ = [
    "RoiNotFoundError",
    "Box",
    "TemplateMatch",
    "Circle",
    "RollOutResult",
    "ForegroundResult",
    "OrientationResult",
    "match_template",
    "find_circle",
    "polar_unwrap",
    "roll_out",
    "remove_background",
    "principal_axis",
    "standardize_orientation",
    "RoiStep",
    "FixedCrop",
    "TemplateCrop",
    "RollOut",
    "RemoveBackground",
    "StandardizeOrientation",
    "Preprocess",
    "ROI_STEP_TYPES",
]


class RoiNotFoundError(DefectlensError):
    """The region of interest (template, circle, foreground) was not found in an image."""


def _image(image: np.ndarray, name: str = "<array>") -> np.ndarray:
    return as_float_rgb(np.asarray(image), name)


def _gray_uint8(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return np.round(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# template matching


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels: top-left corner (x, y), width and height."""

    x: int
    y: int
    width: int
    height: int

    def crop(self, image: np.ndarray) -> np.ndarray:
        """``image[y : y + height, x : x + width]`` as a new array."""
        return image[self.y : self.y + self.height, self.x : self.x + self.width].copy()


@dataclass(frozen=True)
class TemplateMatch:
    """Result of :func:`match_template`.

    Attributes:
        crop: float32 (height, width, 3), the overview cut out at ``box``.
        box: where the crop comes from (the matched box grown by ``margin``, clipped to the image).
        score: the matching score at the best position (``ccoeff_normed``/``ccorr_normed``: higher
            is better, at most 1; ``sqdiff_normed``: reported as ``1 - distance``).
    """

    crop: np.ndarray
    box: Box
    score: float


_TEMPLATE_METHODS = {
    "ccoeff_normed": cv2.TM_CCOEFF_NORMED,
    "ccorr_normed": cv2.TM_CCORR_NORMED,
    "sqdiff_normed": cv2.TM_SQDIFF_NORMED,
}


def match_template(
    overview: np.ndarray, template: np.ndarray, *, method: str = "ccoeff_normed", margin: int = 0
) -> TemplateMatch:
    """Find ``template`` in ``overview`` (same scale and rotation) and crop the part.

    Args:
        overview: the large image, float32 (H, W, 3).
        template: the part as it appears in overview images, float32 (h, w, 3), h <= H, w <= W.
        method: ``"ccoeff_normed"`` (default; robust to brightness offsets), ``"ccorr_normed"``
            or ``"sqdiff_normed"``. Matching uses all three colour channels.
        margin: pixels added around the matched box before cropping (clipped to the image).
    """
    overview = _image(overview, "overview")
    template = _image(template, "template")
    if method not in _TEMPLATE_METHODS:
        raise ConfigError(f"template matching method must be one of {sorted(_TEMPLATE_METHODS)}, got {method!r}")
    height, width = overview.shape[:2]
    t_height, t_width = template.shape[:2]
    if t_height > height or t_width > width:
        raise ConfigError(f"template {t_width}x{t_height} is larger than the overview image {width}x{height}")
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin!r}")
    response = cv2.matchTemplate(overview, template, _TEMPLATE_METHODS[method])
    min_value, max_value, min_loc, max_loc = cv2.minMaxLoc(response)
    if method == "sqdiff_normed":
        score, (x, y) = 1.0 - float(min_value), min_loc
    else:
        score, (x, y) = float(max_value), max_loc
    left, top = max(0, x - margin), max(0, y - margin)
    right, bottom = min(width, x + t_width + margin), min(height, y + t_height + margin)
    box = Box(int(left), int(top), int(right - left), int(bottom - top))
    return TemplateMatch(crop=box.crop(overview), box=box, score=score if math.isfinite(score) else 0.0)


# ---------------------------------------------------------------------------------------------
# circles and roll-outs


@dataclass(frozen=True)
class Circle:
    """A circle in pixels: centre (x, y) and radius."""

    x: float
    y: float
    radius: float


def find_circle(
    image: np.ndarray,
    *,
    min_radius: int = 0,
    max_radius: int = 0,
    dp: float = 1.0,
    canny_threshold: float = 100.0,
    accumulator_threshold: float = 30.0,
    blur_sigma: float = 1.5,
    refine: bool = True,
) -> Circle:
    """The strongest circle in the image by the circular Hough transform (``cv2.HoughCircles``).

    Args:
        min_radius, max_radius: search range in pixels; 0 means unbounded (OpenCV's convention).
            Giving the expected range makes the search faster and more reliable.
        dp: inverse accumulator resolution (1: full resolution; larger is faster, coarser).
        canny_threshold: upper Canny threshold on the 0–255 grey image (OpenCV ``param1``).
        accumulator_threshold: votes a centre needs (OpenCV ``param2``); lower finds more circles.
        blur_sigma: Gaussian blur before the transform, to suppress texture edges.
        refine: refine the Hough circle to sub-pixel accuracy by a least-squares (Kåsa) circle
            fit to the Canny edge pixels within ``max(2, 4 %·r)`` px of it (two passes); the
            Hough centre alone is only as precise as its accumulator cell.

    Raises:
        RoiNotFoundError: no circle reaches the vote threshold.
    """
    gray = _gray_uint8(_image(image))
    if blur_sigma > 0:
        gray = cv2.GaussianBlur(gray, (0, 0), blur_sigma)
    if min_radius < 0 or max_radius < 0 or (max_radius and max_radius < min_radius):
        raise ConfigError(f"need 0 <= min_radius <= max_radius (0 = unbounded), got {min_radius}, {max_radius}")
    circles = cv2.HoughCircles(
        gray,
        cv2.HOUGH_GRADIENT,
        dp=float(dp),
        minDist=float(max(gray.shape)),  # we want one circle: suppress concentric duplicates
        param1=float(canny_threshold),
        param2=float(accumulator_threshold),
        minRadius=int(min_radius),
        maxRadius=int(max_radius),
    )
    if circles is None or len(circles) == 0 or circles.reshape(-1, circles.shape[-1]).shape[0] == 0:
        raise RoiNotFoundError(
            f"no circle found (radius {min_radius}..{max_radius or 'any'} px, accumulator_threshold={accumulator_threshold})"
        )
    x, y, radius = (float(v) for v in circles.reshape(-1, circles.shape[-1])[0][:3])
    circle = Circle(x, y, radius)
    if refine:
        edges = cv2.Canny(gray, canny_threshold / 2.0, canny_threshold) > 0
        for _ in range(2):
            circle = _refine_circle(edges, circle)
    return circle


def _refine_circle(edges: np.ndarray, circle: Circle) -> Circle:
    """Least-squares circle through the edge pixels near ``circle``; ``circle`` if too few."""
    rows, cols = np.nonzero(edges)
    distance = np.hypot(cols - circle.x, rows - circle.y)
    near = np.abs(distance - circle.radius) <= max(2.0, 0.04 * circle.radius)
    if near.sum() < 12:
        return circle
    xs, ys = cols[near].astype(np.float64), rows[near].astype(np.float64)
    # x² + y² + D·x + E·y + F = 0  (Kåsa): linear least squares in D, E, F
    design = np.column_stack([xs, ys, np.ones_like(xs)])
    (d, e, f), *_ = np.linalg.lstsq(design, -(xs**2 + ys**2), rcond=None)
    center_x, center_y = -d / 2.0, -e / 2.0
    radius_sq = center_x**2 + center_y**2 - f
    if radius_sq <= 0 or math.hypot(center_x - circle.x, center_y - circle.y) > 0.25 * circle.radius:
        return circle
    return Circle(float(center_x), float(center_y), float(math.sqrt(radius_sq)))


def polar_unwrap(
    image: np.ndarray,
    center: tuple[float, float],
    r_inner: float,
    r_outer: float,
    *,
    out_height: int = 24,
    out_width: int = 800,
    start_angle_deg: float = 0.0,
) -> np.ndarray:
    """Unwrap the annulus r_inner <= r < r_outer around ``center`` (x, y) into a straight band.

    Output pixel (i, j) samples the image (bilinear, ``cv2.remap``) at radius
    ``r_inner + (i + 0.5)·(r_outer - r_inner)/out_height`` and angle
    ``start_angle_deg + 360·j/out_width`` degrees from +x towards +y (clockwise on screen).
    Points outside the image read as black.

    Returns:
        float32 (out_height, out_width, 3).
    """
    image = _image(image)
    if not 0 <= r_inner < r_outer:
        raise ConfigError(f"need 0 <= r_inner < r_outer, got r_inner={r_inner!r}, r_outer={r_outer!r}")
    if out_height < 1 or out_width < 1:
        raise ConfigError(f"roll-out size must be positive, got {out_height}x{out_width}")
    radii = r_inner + (np.arange(out_height, dtype=np.float64) + 0.5) * (r_outer - r_inner) / out_height
    angles = np.deg2rad(start_angle_deg + 360.0 * np.arange(out_width, dtype=np.float64) / out_width)
    map_x = (center[0] + radii[:, None] * np.cos(angles)[None, :]).astype(np.float32)
    map_y = (center[1] + radii[:, None] * np.sin(angles)[None, :]).astype(np.float32)
    band = cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.clip(band, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class RollOutResult:
    """Result of :func:`roll_out`: the band and the circle it was unwrapped around."""

    band: np.ndarray
    circle: Circle
    r_inner: float
    r_outer: float


def roll_out(
    image: np.ndarray,
    r_inner: float,
    r_outer: float,
    *,
    relative_radii: bool = False,
    circle: Optional[Circle] = None,
    out_height: int = 24,
    out_width: int = 800,
    start_angle_deg: float = 0.0,
    **hough: Any,
) -> RollOutResult:
    """Find the round closure (unless ``circle`` is given) and unwrap an annulus around it.

    Args:
        r_inner, r_outer: annulus radii in pixels, or — with ``relative_radii`` — as fractions
            of the detected radius (e.g. 0.8 and 1.05 for the rim of a preform neck).
        circle: a known circle; skips the Hough transform.
        hough: keyword arguments for :func:`find_circle`.
    """
    image = _image(image)
    found = circle if circle is not None else find_circle(image, **hough)
    inner = r_inner * found.radius if relative_radii else r_inner
    outer = r_outer * found.radius if relative_radii else r_outer
    band = polar_unwrap(
        image, (found.x, found.y), inner, outer, out_height=out_height, out_width=out_width,
        start_angle_deg=start_angle_deg,
    )
    return RollOutResult(band=band, circle=found, r_inner=float(inner), r_outer=float(outer))


# ---------------------------------------------------------------------------------------------
# background removal and orientation


@dataclass(frozen=True)
class ForegroundResult:
    """Result of :func:`remove_background`: the image with its background filled, and the part mask."""

    image: np.ndarray
    mask: np.ndarray


def _clean_mask(mask: np.ndarray, morph_radius: int, keep_largest: bool, fill_holes: bool) -> np.ndarray:
    if morph_radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * morph_radius + 1, 2 * morph_radius + 1))
        as_uint8 = mask.astype(np.uint8)
        as_uint8 = cv2.morphologyEx(as_uint8, cv2.MORPH_CLOSE, kernel)
        as_uint8 = cv2.morphologyEx(as_uint8, cv2.MORPH_OPEN, kernel)
        mask = as_uint8.astype(bool)
    if keep_largest and mask.any():
        labels, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask) if fill_holes else mask


def remove_background(
    image: np.ndarray,
    *,
    method: str = "otsu",
    fill_value: float = 0.0,
    morph_radius: int = 3,
    keep_largest: bool = True,
    fill_holes: bool = True,
    grabcut_iterations: int = 5,
    grabcut_margin: float = 0.05,
) -> ForegroundResult:
    """Separate a part from a plain background; fill the background with ``fill_value``.

    ``method="otsu"``: Otsu threshold of the blurred grey image; the class holding most of the
    image border is background. ``method="grabcut"``: OpenCV GrabCut initialised with a
    rectangle inset by ``grabcut_margin`` (fraction of each side); slower, copes with coloured
    or graded backgrounds. Both then close/open with a disc of ``morph_radius`` px, keep the
    largest component (``keep_largest``) and fill holes (``fill_holes``: right for highlights
    inside the part, wrong for parts with through-holes or loops, e.g. a cup handle, whose
    inside then keeps the background). See the module docstring for how this compares with a
    learned U-Net.

    Raises:
        RoiNotFoundError: no foreground pixel is left.
    """
    image = _image(image)
    if not 0.0 <= fill_value <= 1.0:
        raise ConfigError(f"fill_value must be in [0, 1], got {fill_value!r}")
    if method == "otsu":
        gray = cv2.GaussianBlur(_gray_uint8(image), (0, 0), 1.0)
        _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        mask = binary > 0
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        if border.mean() > 0.5:
            mask = ~mask
    elif method == "grabcut":
        height, width = image.shape[:2]
        inset_x, inset_y = max(1, int(grabcut_margin * width)), max(1, int(grabcut_margin * height))
        rect = (inset_x, inset_y, max(1, width - 2 * inset_x), max(1, height - 2 * inset_y))
        labels = np.zeros((height, width), dtype=np.uint8)
        background_model = np.zeros((1, 65), dtype=np.float64)
        foreground_model = np.zeros((1, 65), dtype=np.float64)
        cv2.setRNGSeed(0)  # GrabCut's k-means initialisation: keep it reproducible
        image_bgr = cv2.cvtColor(np.round(image * 255.0).astype(np.uint8), cv2.COLOR_RGB2BGR)
        cv2.grabCut(image_bgr, labels, rect, background_model, foreground_model, int(grabcut_iterations), cv2.GC_INIT_WITH_RECT)
        mask = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    else:
        raise ConfigError(f"background removal method must be 'otsu' or 'grabcut', got {method!r}")
    mask = _clean_mask(mask, int(morph_radius), keep_largest, fill_holes)
    if not mask.any():
        raise RoiNotFoundError(f"background removal ({method}) found no foreground")
    out = np.where(mask[:, :, None], image, np.float32(fill_value)).astype(np.float32)
    return ForegroundResult(image=out, mask=mask)


def principal_axis(mask: np.ndarray) -> tuple[float, float, float]:
    """Centroid (x, y) and principal-axis angle (degrees, from +x towards +y) of a bool mask.

    The angle's sign ambiguity (θ vs θ + 180°) is resolved by the third-order moment along the
    axis: the axis points towards the longer tail of the shape. Returns angle in [0, 360).
    """
    mask = np.asarray(mask, dtype=bool)
    moments = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    if moments["m00"] <= 0:
        raise RoiNotFoundError("orientation: the mask is empty")
    center_x, center_y = moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]
    theta = 0.5 * math.atan2(2.0 * moments["mu11"], moments["mu20"] - moments["mu02"])
    ys, xs = np.nonzero(mask)
    projection = (xs - center_x) * math.cos(theta) + (ys - center_y) * math.sin(theta)
    if float(np.mean(projection**3)) < 0:
        theta += math.pi
    return float(center_x), float(center_y), math.degrees(theta) % 360.0


@dataclass(frozen=True)
class OrientationResult:
    """Result of :func:`standardize_orientation`.

    Attributes:
        image: the rotated (and re-centred) image.
        mask: the part mask, transformed the same way.
        rotation_deg: the counter-clockwise (on screen) rotation applied.
        matrix: the 2x3 affine matrix applied (``cv2.warpAffine`` convention).
    """

    image: np.ndarray
    mask: np.ndarray
    rotation_deg: float
    matrix: np.ndarray


def standardize_orientation(
    image: np.ndarray,
    mask: Optional[np.ndarray] = None,
    *,
    target_angle_deg: float = 0.0,
    recenter: bool = True,
    fill_value: float = 0.0,
) -> OrientationResult:
    """Rotate the part so its principal axis points at ``target_angle_deg`` (from +x towards +y).

    The axis comes from the image moments of ``mask`` (by default the Otsu foreground of
    :func:`remove_background`), its direction from the third-order moment (see
    :func:`principal_axis`), so the same part in any pose ends up in the same pose. With
    ``recenter`` the part's centroid moves to the image centre. The output keeps the input
    size; uncovered corners get ``fill_value``.
    """
    image = _image(image)
    if mask is None:
        mask = remove_background(image).mask
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ConfigError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    center_x, center_y, angle = principal_axis(mask)
    # cv2 rotates counter-clockwise on screen by a positive angle, which lowers our angle.
    rotation = angle - float(target_angle_deg)
    matrix = cv2.getRotationMatrix2D((center_x, center_y), rotation, 1.0)
    height, width = image.shape[:2]
    if recenter:
        matrix[0, 2] += (width - 1) / 2.0 - center_x
        matrix[1, 2] += (height - 1) / 2.0 - center_y
    rotated = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill_value, fill_value, fill_value),
    )
    rotated_mask = cv2.warpAffine(mask.astype(np.uint8), matrix, (width, height), flags=cv2.INTER_NEAREST) > 0
    return OrientationResult(
        image=np.clip(rotated, 0.0, 1.0).astype(np.float32), mask=rotated_mask, rotation_deg=rotation, matrix=matrix
    )


# ---------------------------------------------------------------------------------------------
# serializable preprocessing


@dataclass(frozen=True)
class RoiStep:
    """One ROI step of a :class:`Preprocess`: ``apply(image) -> image``, JSON-safe fields."""

    kind: ClassVar[str] = ""

    def apply(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": ..., <field>: <value>}``; tuples become lists."""
        values = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            values[item.name] = list(value) if isinstance(value, tuple) else value
        return {"kind": self.kind, **values}


@dataclass(frozen=True)
class FixedCrop(RoiStep):
    """Crop a fixed box (the fixture holds the part in place)."""

    kind: ClassVar[str] = "crop"
    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.x < 0 or self.y < 0 or self.width < 1 or self.height < 1:
            raise ConfigError(f"crop box must have x, y >= 0 and a positive size, got {self}")

    def apply(self, image: np.ndarray) -> np.ndarray:
        image = _image(image)
        if self.x + self.width > image.shape[1] or self.y + self.height > image.shape[0]:
            raise RoiNotFoundError(
                f"crop box {self.width}x{self.height}+{self.x}+{self.y} exceeds the image {image.shape[1]}x{image.shape[0]}"
            )
        return Box(self.x, self.y, self.width, self.height).crop(image)


def _encode_png_base64(image: np.ndarray) -> str:
    pixels = np.round(np.clip(_image(image), 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class TemplateCrop(RoiStep):
    """Crop the part located by template matching; the template travels inside the config.

    ``template_png`` is the template as a base64-encoded 8-bit PNG, so the step stays JSON-safe;
    build it with :meth:`from_image`. With ``min_score`` set, a weaker match raises
    :class:`RoiNotFoundError` instead of cropping the wrong place.
    """

    kind: ClassVar[str] = "template_crop"
    template_png: str
    margin: int = 0
    method: str = "ccoeff_normed"
    min_score: Optional[float] = None

    @classmethod
    def from_image(cls, template: np.ndarray, **options: Any) -> "TemplateCrop":
        return cls(template_png=_encode_png_base64(template), **options)

    @cached_property
    def template(self) -> np.ndarray:
        """The decoded template, float32 (h, w, 3)."""
        try:
            data = base64.b64decode(self.template_png.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as error:
            raise ConfigError(f"template_crop: template_png is not valid base64 ({error})") from None
        return decode_image_bytes(data, "<template_crop template>")

    def apply(self, image: np.ndarray) -> np.ndarray:
        match = match_template(image, self.template, method=self.method, margin=self.margin)
        if self.min_score is not None and match.score < self.min_score:
            raise RoiNotFoundError(f"template match score {match.score:.3f} is below min_score {self.min_score}")
        return match.crop


@dataclass(frozen=True)
class RollOut(RoiStep):
    """Hough-detect the round closure (or use a fixed ``center``) and unwrap the annulus.

    Radii are pixels, or fractions of the detected radius with ``relative_radii``. Defaults
    give a 24×800 band (24 radial samples, 800 angular samples).
    """

    kind: ClassVar[str] = "roll_out"
    r_inner: float
    r_outer: float
    relative_radii: bool = False
    out_height: int = 24
    out_width: int = 800
    start_angle_deg: float = 0.0
    center: Optional[tuple[float, float]] = None
    min_radius: int = 0
    max_radius: int = 0
    dp: float = 1.0
    canny_threshold: float = 100.0
    accumulator_threshold: float = 30.0
    blur_sigma: float = 1.5
    refine: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.r_inner < self.r_outer:
            raise ConfigError(f"roll_out: need 0 <= r_inner < r_outer, got {self.r_inner}, {self.r_outer}")
        if self.center is not None:
            if self.relative_radii:
                raise ConfigError("roll_out: relative_radii needs a detected circle; do not give a fixed center")
            object.__setattr__(self, "center", tuple(float(v) for v in self.center))

    def apply(self, image: np.ndarray) -> np.ndarray:
        if self.center is not None:
            circle: Optional[Circle] = Circle(self.center[0], self.center[1], float(self.r_outer))
        else:
            circle = None
        return roll_out(
            image, self.r_inner, self.r_outer, relative_radii=self.relative_radii, circle=circle,
            out_height=self.out_height, out_width=self.out_width, start_angle_deg=self.start_angle_deg,
            min_radius=self.min_radius, max_radius=self.max_radius, dp=self.dp,
            canny_threshold=self.canny_threshold, accumulator_threshold=self.accumulator_threshold,
            blur_sigma=self.blur_sigma, refine=self.refine,
        ).band


@dataclass(frozen=True)
class RemoveBackground(RoiStep):
    """:func:`remove_background` as a step: the part stays, the background becomes ``fill_value``."""

    kind: ClassVar[str] = "remove_background"
    method: str = "otsu"
    fill_value: float = 0.0
    morph_radius: int = 3
    fill_holes: bool = True

    def apply(self, image: np.ndarray) -> np.ndarray:
        return remove_background(
            image, method=self.method, fill_value=self.fill_value, morph_radius=self.morph_radius,
            fill_holes=self.fill_holes,
        ).image


@dataclass(frozen=True)
class StandardizeOrientation(RoiStep):
    """:func:`standardize_orientation` as a step (mask from Otsu background removal)."""

    kind: ClassVar[str] = "orientation"
    target_angle_deg: float = 0.0
    recenter: bool = True
    fill_value: float = 0.0

    def apply(self, image: np.ndarray) -> np.ndarray:
        return standardize_orientation(
            image, target_angle_deg=self.target_angle_deg, recenter=self.recenter, fill_value=self.fill_value
        ).image


ROI_STEP_TYPES: dict[str, type[RoiStep]] = {
    step.kind: step for step in (FixedCrop, TemplateCrop, RollOut, RemoveBackground, StandardizeOrientation)
}
"""Config ``kind`` → step class."""


def _step_from_dict(config: Mapping[str, Any]) -> RoiStep:
    return dataclass_from_dict(config, "kind", ROI_STEP_TYPES, "preprocessing step")


@dataclass(frozen=True)
class Preprocess:
    """The ROI steps a model applies to every image before feature extraction, in order.

    JSON-safe round trip: ``Preprocess.from_dict(json.loads(json.dumps(p.to_dict()))) == p``.
    Deterministic and independent of any model code; an empty ``Preprocess()`` is the identity.

    Example::

        pre = Preprocess([RollOut(r_inner=0.75, r_outer=1.0, relative_radii=True)])
        band = pre.apply(image)                  # (24, 800, 3)
        metadata["preprocess"] = pre.to_dict()
    """

    steps: tuple[RoiStep, ...] = field(default_factory=tuple)

    FORMAT_VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        for step in steps:
            if not isinstance(step, RoiStep):
                raise ConfigError(f"Preprocess steps must be RoiStep objects, got {step!r}")
        object.__setattr__(self, "steps", steps)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Run every step in order on a float32 (H, W, 3) image; returns float32 (h, w, 3)."""
        out = _image(image)
        for step in self.steps:
            out = step.apply(out)
        return out

    __call__ = apply

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.FORMAT_VERSION, "steps": [step.to_dict() for step in self.steps]}

    @classmethod
    def from_dict(cls, config: Union[Mapping[str, Any], Sequence[Mapping[str, Any]], None]) -> "Preprocess":
        """Accept ``{"version": 1, "steps": [...]}``, a bare list of step dicts, or None."""
        if config is None:
            return cls()
        if isinstance(config, Mapping):
            version = config.get("version", cls.FORMAT_VERSION)
            if version != cls.FORMAT_VERSION:
                raise ConfigError(f"preprocess config version {version!r} is not supported (expected {cls.FORMAT_VERSION})")
            steps = config.get("steps", [])
        else:
            steps = config
        return cls(tuple(_step_from_dict(item) for item in steps))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise ConfigError(f"preprocess config is not valid JSON: {error}") from None

    def __len__(self) -> int:
        return len(self.steps)
