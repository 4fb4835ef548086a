"""Inspection rules stored in the model file: where to look, how big a defect must be, how many
are allowed, and per-zone thresholds. Applied identically by predict, evaluate, serve and the
exports (`verdicts.judge`); edited without refitting (`defectlens rules MODEL ...`).

Geometry is in pixels of the *prepared* image (after the ROI steps - the image the maps refer
to). A mask is a PNG (white = selected), resized with nearest neighbour to each map; a polygon
is a list of (x, y) vertices. A zone selects pixels by a polygon or a mask and gives them their
own threshold, absolute or as a factor of the model's, and optionally its own minimum area.

JSON form (``InspectionRules.to_dict()``)::

    {"care": {"polygons": [[[x, y], ...]], "mask_png": "<base64>"},      # inspect only here
     "dont_care": {"polygons": [...], "mask_png": null},                # never inspect here
     "zones": [{"name": "seal", "polygons": [...], "threshold_scale": 0.8, "min_area_px": 10}],
     "min_defect_area_px": 50, "min_defect_area_mm2": null, "mm_per_px": null,
     "max_defect_count": 0}
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from defectlens.errors import ConfigError

Polygon = tuple[tuple[float, float], ...]


def _polygons(value: Any, where: str) -> tuple[Polygon, ...]:
    try:
        polygons = tuple(tuple((float(x), float(y)) for x, y in polygon) for polygon in (value or ()))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: polygons must be lists of [x, y] vertices, got {value!r}") from None
    for polygon in polygons:
        if len(polygon) < 3:
            raise ConfigError(f"{where}: a polygon needs at least 3 vertices, got {len(polygon)}")
    return polygons


def _mask_from_png(data: str | None, where: str) -> np.ndarray | None:
    if not data:
        return None
    try:
        decoded = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_GRAYSCALE)
    except (ValueError, cv2.error):
        decoded = None
    if decoded is None:
        raise ConfigError(f"{where}: mask_png is not a base64 PNG")
    return decoded > 127


def mask_to_png(mask: np.ndarray) -> str:
    """A bool mask (H, W) as base64 PNG text (for the JSON rules)."""
    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:  # pragma: no cover
        raise ConfigError("cannot encode the mask as PNG")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


@dataclass(frozen=True)
class Region:
    """Pixels chosen by polygons and/or a mask (their union)."""

    polygons: tuple[Polygon, ...] = ()
    mask_png: str | None = None

    @classmethod
    def from_dict(cls, document: Mapping[str, Any] | None, where: str) -> "Region":
        document = document or {}
        unknown = set(document) - {"polygons", "mask_png"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; use polygons and mask_png")
        region = cls(_polygons(document.get("polygons"), where), document.get("mask_png") or None)
        _mask_from_png(region.mask_png, where)  # checked now, not at the first inspection
        return region

    def __bool__(self) -> bool:
        return bool(self.polygons or self.mask_png)

    def rasterize(self, shape: tuple[int, int]) -> np.ndarray:
        """Bool (H, W): the region's pixels in an image of ``shape``."""
        selected = np.zeros(shape, np.uint8)
        for polygon in self.polygons:
            cv2.fillPoly(selected, [np.round(np.asarray(polygon)).astype(np.int32)], 1)
        mask = _mask_from_png(self.mask_png, "mask")
        if mask is not None:
            resized = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
            selected |= resized
        return selected.astype(bool)

    def to_dict(self) -> dict[str, Any]:
        return {"polygons": [[list(point) for point in polygon] for polygon in self.polygons], "mask_png": self.mask_png}


@dataclass(frozen=True)
class Zone:
    """A part of the image with its own threshold (absolute, or a factor of the model's) and
    minimum defect area; later zones win where zones overlap."""

    name: str
    region: Region
    threshold: float | None = None
    threshold_scale: float = 1.0
    min_area_px: float | None = None

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "Zone":
        known = {"name", "polygons", "mask_png", "threshold", "threshold_scale", "min_area_px"}
        unknown = set(document) - known
        if unknown or "name" not in document:
            raise ConfigError(f"a zone needs a name and may have {sorted(known - {'name'})}; got {dict(document)!r}")
        name = str(document["name"])
        region = Region.from_dict({k: document[k] for k in ("polygons", "mask_png") if k in document}, f"zone {name!r}")
        if not region:
            raise ConfigError(f"zone {name!r} selects no pixel: give polygons or mask_png")
        scale = float(document.get("threshold_scale", 1.0))
        if scale <= 0:
            raise ConfigError(f"zone {name!r}: threshold_scale must be > 0, got {scale}")
        threshold = document.get("threshold")
        area = document.get("min_area_px")
        return cls(name, region, None if threshold is None else float(threshold), scale, None if area is None else float(area))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.region.to_dict(), "threshold": self.threshold,
                "threshold_scale": self.threshold_scale, "min_area_px": self.min_area_px}


@dataclass(frozen=True)
class InspectionRules:
    """What turns an anomaly map into a verdict beyond the thresholds (see the module docstring).

    Attributes:
        care: inspect only these pixels (empty: everywhere).
        dont_care: never inspect these pixels.
        zones: per-zone thresholds and minimum areas.
        min_defect_area_px: a connected region above the threshold is a defect only from this
            many pixels (0: any pixel).
        min_defect_area_mm2, mm_per_px: the same in mm² with the image scale (mm per pixel of
            the prepared image); the larger of the two minimums applies.
        max_defect_count: NOT OK only with more defects than this (default 0: any defect).
    """

    care: Region = field(default_factory=Region)
    dont_care: Region = field(default_factory=Region)
    zones: tuple[Zone, ...] = ()
    min_defect_area_px: float = 0.0
    min_defect_area_mm2: float | None = None
    mm_per_px: float | None = None
    max_defect_count: int = 0

    def __post_init__(self) -> None:
        if self.min_defect_area_px < 0 or self.max_defect_count < 0:
            raise ConfigError("min_defect_area_px and max_defect_count must be >= 0")
        if (self.min_defect_area_mm2 is None) != (self.mm_per_px is None):
            raise ConfigError("min_defect_area_mm2 needs mm_per_px (the image scale), and the other way round")
        if self.mm_per_px is not None and self.mm_per_px <= 0:
            raise ConfigError(f"mm_per_px must be > 0, got {self.mm_per_px}")

    @property
    def empty(self) -> bool:
        """No rule at all: the verdict is the image score against the thresholds."""
        return self == InspectionRules()

    @property
    def min_area_px(self) -> float:
        """The minimum defect area in pixels (from px and mm², the larger)."""
        from_mm = 0.0 if self.min_defect_area_mm2 is None else self.min_defect_area_mm2 / float(self.mm_per_px) ** 2
        return max(float(self.min_defect_area_px), from_mm)

    @classmethod
    def from_dict(cls, document: "InspectionRules | Mapping[str, Any] | None") -> "InspectionRules":
        if isinstance(document, InspectionRules):
            return document
        document = dict(document or {})
        known = {"care", "dont_care", "zones", "min_defect_area_px", "min_defect_area_mm2", "mm_per_px", "max_defect_count"}
        unknown = set(document) - known
        if unknown:
            raise ConfigError(f"unknown inspection rule(s) {sorted(unknown)}; known: {sorted(known)}")
        zones = tuple(Zone.from_dict(zone) for zone in document.get("zones") or ())
        if len({zone.name for zone in zones}) != len(zones):
            raise ConfigError("zone names must be unique")
        mm2, scale = document.get("min_defect_area_mm2"), document.get("mm_per_px")
        return cls(
            care=Region.from_dict(document.get("care"), "care"),
            dont_care=Region.from_dict(document.get("dont_care"), "dont_care"),
            zones=zones,
            min_defect_area_px=float(document.get("min_defect_area_px") or 0.0),
            min_defect_area_mm2=None if mm2 is None else float(mm2),
            mm_per_px=None if scale is None else float(scale),
            max_defect_count=int(document.get("max_defect_count") or 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "care": self.care.to_dict(), "dont_care": self.dont_care.to_dict(),
            "zones": [zone.to_dict() for zone in self.zones],
            "min_defect_area_px": self.min_defect_area_px, "min_defect_area_mm2": self.min_defect_area_mm2,
            "mm_per_px": self.mm_per_px, "max_defect_count": self.max_defect_count,
        }

    def inspected(self, shape: tuple[int, int]) -> np.ndarray:
        """Bool (H, W): pixels the rules look at (care minus don't-care)."""
        inspected = self.care.rasterize(shape) if self.care else np.ones(shape, bool)
        if self.dont_care:
            inspected &= ~self.dont_care.rasterize(shape)
        return inspected

    def zone_index(self, shape: tuple[int, int]) -> np.ndarray:
        """Int (H, W): 0 outside every zone, k for the k-th zone (later zones win)."""
        index = np.zeros(shape, np.int32)
        for k, zone in enumerate(self.zones, start=1):
            index[zone.region.rasterize(shape)] = k
        return index

    def with_changes(self, **changes: Any) -> "InspectionRules":
        """A copy with fields replaced (values in JSON form, as ``from_dict`` takes them)."""
        return InspectionRules.from_dict({**self.to_dict(), **changes})


def region_of(value: Sequence[Any] | str | None) -> dict[str, Any]:
    """A `Region` document from polygons (a JSON list) or a PNG mask path."""
    if value is None:
        return {}
    if isinstance(value, str):
        mask = cv2.imread(value, cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ConfigError(f"cannot read the mask image {value}")
        return {"polygons": [], "mask_png": mask_to_png(mask > 127)}
    return {"polygons": value, "mask_png": None}
