"""sPRO curve and AUsPRO as MVTec LOCO AD defines them - computed exactly.

Definitions (official MVTec LOCO AD evaluation code, ``src/metrics.py`` / ``src/image.py``):

* Ground truth of an image is a list of *channels*, one binary image per defect (a defect
  may consist of several blobs; channels may overlap); a defect-free image has none.
  Each channel's non-zero value is its defect type's ``pixel_value`` in
  ``defects_config.json`` (entries ``defect_name, pixel_value, saturation_threshold,
  relative_saturation``).
* A pixel is positive when its score is strictly greater than the threshold.
* sPRO of a channel = ``min(TP / saturation_area, 1)``, TP = positive pixels in the channel,
  ``saturation_area = floor(saturation_threshold * defect_area)`` (relative) or
  ``min(saturation_threshold, defect_area)`` (absolute).
* y = mean sPRO over all channels of all images. A false positive is a positive pixel in no
  channel of its image; the FPR pools all images, defect-free ones included.
* AUsPRO at a limit = area under (FPR, mean sPRO) from 0 to the limit (trapezoid, linear
  interpolation at the limit) divided by the limit; limits 0.01, 0.05, 0.1, 0.3, 1.0.

Unlike the LOCO program, which samples about 1000 thresholds and so approximates the area
(errors up to 6 % relative at limit 0.01), every distinct score is a threshold here. That
is hand-written on the streaming core of :mod:`defectlens.metrics.pixel`: a channel's sPRO is
a sum of per-pixel weights - ranked by descending score, its first ``saturation_area``
pixels weigh ``1 / saturation_area`` each, the rest 0 (tied pixels always change state
together, so the split inside a tie run does not matter) - which is the same weighted sweep
as the PRO curve, with channels in place of regions.

Pitfall guarded: a relative saturation that rounds down to 0 pixels (e.g. threshold 0.5 on
a 1-pixel defect) makes the LOCO code divide by zero. Here it raises ``ValueError`` naming
the image, the channel and the defect, unless ``on_zero_saturation="one_pixel"``: then the
saturation area is 1 pixel (the defect counts as fully found once any pixel is flagged).
An empty channel (no non-zero pixel) is always an error, as in LOCO.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from defectlens.errors import ConfigError, DatasetError
from defectlens.metrics.pixel import (
    MapCollection,
    PositiveAccumulator,
    as_reiterable,
    build_sweep,
    exact_curve_points,
    iter_pairs,
    load_score_map,
    trapezoid_area,
    validate_limits,
)

__all__ = [
    "DEFAULT_SPRO_LIMITS",
    "DefectType",
    "LocoGroundTruth",
    "SproCurve",
    "auspro",
    "channels_per_image",
    "load_defects_config",
    "read_channel_dir",
    "spro_curve",
]

DEFAULT_SPRO_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)
ZeroSaturationPolicy = Literal["raise", "one_pixel"]


@dataclass(frozen=True)
class DefectType:
    """One entry of LOCO's ``defects_config.json``."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def __post_init__(self) -> None:
        if not 1 <= int(self.pixel_value) <= 255:
            raise ConfigError(f"defect {self.defect_name!r}: pixel_value {self.pixel_value} "
                              "outside 1..255")
        if self.relative_saturation and not 0.0 < self.saturation_threshold <= 1.0:
            raise ConfigError(f"defect {self.defect_name!r}: relative saturation_threshold "
                              f"{self.saturation_threshold} outside (0, 1]")
        if not self.relative_saturation and not self.saturation_threshold > 0:
            raise ConfigError(f"defect {self.defect_name!r}: absolute saturation_threshold "
                              f"{self.saturation_threshold} must be positive")

    def saturation_area(self, defect_area: int, *,
                        on_zero_saturation: ZeroSaturationPolicy = "raise",
                        where: str = "") -> float:
        """Pixels a channel of ``defect_area`` pixels needs for sPRO = 1 (LOCO's rule).

        Relative: ``floor(saturation_threshold * defect_area)``; absolute:
        ``min(saturation_threshold, defect_area)`` (LOCO requires an integer absolute
        threshold; a fractional one is accepted here and handled exactly). A result of 0
        raises ``ValueError`` (``on_zero_saturation="raise"``) or becomes 1 (``"one_pixel"``).
        """
        if defect_area <= 0:
            raise ValueError(f"{where}empty channel for defect {self.defect_name!r}")
        if self.relative_saturation:
            area = float(math.floor(self.saturation_threshold * defect_area))
        else:
            area = float(min(self.saturation_threshold, defect_area))
        if area <= 0:
            if on_zero_saturation == "one_pixel":
                return 1.0
            raise ValueError(
                f"{where}defect {self.defect_name!r} covers {defect_area} pixel(s); its relative "
                f"saturation {self.saturation_threshold} rounds down to 0 pixels (sPRO would "
                "divide by zero). Pass on_zero_saturation='one_pixel' to count such a defect "
                "as found once one pixel is flagged."
            )
        return area

    def to_dict(self) -> dict[str, Any]:
        return {"defect_name": self.defect_name, "pixel_value": self.pixel_value,
                "saturation_threshold": self.saturation_threshold,
                "relative_saturation": self.relative_saturation}


DefectsConfigLike = Union[str, Path, Sequence[Mapping[str, Any]], Mapping[int, DefectType]]


def load_defects_config(source: DefectsConfigLike) -> dict[int, DefectType]:
    """``{pixel_value: DefectType}`` from a ``defects_config.json`` path, its parsed list, a
    JSON string, or an existing mapping."""
    if isinstance(source, Mapping):
        return {int(value): entry if isinstance(entry, DefectType) else DefectType(**entry)
                for value, entry in source.items()}
    is_json_text = isinstance(source, str) and source.lstrip().startswith("[")
    if isinstance(source, Path) or (isinstance(source, str) and not is_json_text):
        path = Path(source)
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DatasetError(f"cannot read defects config {path}: {error}") from error
    elif isinstance(source, str):
        entries = json.loads(source)
    else:
        entries = list(source)
    config: dict[int, DefectType] = {}
    for entry in entries:
        defect = DefectType(
            defect_name=str(entry["defect_name"]),
            pixel_value=int(entry["pixel_value"]),
            saturation_threshold=entry["saturation_threshold"],
            relative_saturation=bool(entry["relative_saturation"]),
        )
        if defect.pixel_value in config:
            raise ConfigError(f"two defect types share pixel_value {defect.pixel_value}")
        config[defect.pixel_value] = defect
    return config


def _natural_key(path: Path) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem))


def read_channel_dir(png_dir: str | Path) -> list[np.ndarray]:
    """Read one image's LOCO ground truth: every ``<k>.png`` in ``png_dir`` (2-D uint8)."""
    from PIL import Image  # pillow is a core dependency; imported here to keep import light

    directory = Path(png_dir)
    paths = sorted(directory.glob("*.png"), key=_natural_key)
    if not paths:
        raise DatasetError(f"ground-truth folder {directory} holds no .png channel")
    channels = []
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.array(image)
        except OSError as error:
            raise DatasetError(f"cannot read ground-truth channel {path}: {error}") from error
        if array.ndim != 2:
            raise DatasetError(f"ground-truth channel {path} is not a single-channel image "
                               f"(shape {array.shape})")
        channels.append(array)
    return channels


class LocoGroundTruth(Sequence[list[np.ndarray]]):
    """Lazy per-image channels of a MVTec LOCO AD category (read when indexed).

    Layout: ``<category_root>/defects_config.json`` and
    ``<category_root>/ground_truth/<defect_type>/<image_stem>/<k>.png``; test images are
    ``<category_root>/test/<defect_type>/<image_stem>.png``. Item ``i`` is the list of
    channels (2-D uint8 arrays) of ``test_images[i]``; empty for a ``good`` image.

    Args:
        category_root: the category folder (e.g. ``.../breakfast_box``).
        test_images: image keys ``"<defect_type>/<image_stem>"`` (a file suffix is
            ignored); default: every ``test/*/*.png`` in sorted order.
    """

    def __init__(self, category_root: str | Path,
                 test_images: Sequence[str | Path] | None = None) -> None:
        self.category_root = Path(category_root)
        self.defects_config = load_defects_config(self.category_root / "defects_config.json")
        if test_images is None:
            test_dir = self.category_root / "test"
            if not test_dir.is_dir():
                raise DatasetError(f"no test folder in {self.category_root}")
            test_images = [path.relative_to(test_dir).as_posix()
                           for path in sorted(test_dir.glob("*/*.png"))]
        self.test_images: list[str] = []
        for key in test_images:
            parts = Path(key).with_suffix("").parts
            if len(parts) != 2:
                raise ValueError(f"test image key {key!r} is not '<defect_type>/<image_stem>'")
            self.test_images.append("/".join(parts))

    def __len__(self) -> int:
        return len(self.test_images)

    def __getitem__(self, index: int) -> list[np.ndarray]:  # type: ignore[override]
        key = self.test_images[index]
        defect_type, stem = key.split("/")
        directory = self.category_root / "ground_truth" / defect_type / stem
        if directory.is_dir():
            return read_channel_dir(directory)
        if defect_type == "good":
            return []
        raise DatasetError(f"no ground truth for test image {key}: {directory} is missing")


def channels_per_image(channels: np.ndarray, channel_image: Sequence[int] | np.ndarray,
                       num_images: int) -> list[list[np.ndarray]]:
    """Group a (C, H, W) channel stack by image index ``channel_image`` (C,) into N lists."""
    grouped: list[list[np.ndarray]] = [[] for _ in range(num_images)]
    for channel, image_index in zip(channels, np.asarray(channel_image).tolist()):
        grouped[int(image_index)].append(channel)
    return grouped


def _image_channels(item: Any, shape: tuple[int, ...], index: int) -> list[np.ndarray]:
    if callable(item) and not isinstance(item, np.ndarray):
        item = item()
    if item is None:
        return []
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = [item]
        elif item.ndim != 3:
            raise ValueError(f"ground truth {index}: expected channels (C, H, W), "
                             f"got shape {item.shape}")
    channels = [np.asarray(channel) for channel in item]
    for number, channel in enumerate(channels):
        if channel.shape != tuple(shape):
            raise ValueError(f"ground truth {index}, channel {number}: shape {channel.shape} "
                             f"differs from its anomaly map's {tuple(shape)}")
    return channels


def _channel_defect(channel: np.ndarray, config: Mapping[int, DefectType], where: str
                    ) -> DefectType:
    values = np.unique(channel)
    values = values[values != 0]
    if values.size != 1:
        raise ValueError(f"{where}expected exactly one non-zero pixel value per channel, "
                         f"found {values.tolist()[:8]}")
    value = int(values[0]) if float(values[0]).is_integer() else None
    if value not in config:
        raise ValueError(f"{where}pixel value {values[0]} is not in the defects config "
                         f"(known: {sorted(config)})")
    return config[value]


def _spro_passes(anomaly_maps: MapCollection, ground_truth: Any,
                 defects_config: DefectsConfigLike, on_zero_saturation: ZeroSaturationPolicy,
                 ) -> tuple[PositiveAccumulator, Iterator[np.ndarray]]:
    if on_zero_saturation not in ("raise", "one_pixel"):
        raise ConfigError("on_zero_saturation must be 'raise' or 'one_pixel', "
                          f"got {on_zero_saturation!r}")
    config = load_defects_config(defects_config)
    maps_seq = as_reiterable(anomaly_maps, "anomaly_maps")
    truth_seq = as_reiterable(ground_truth, "ground_truth")
    accumulator = PositiveAccumulator()

    def images() -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
        for index, map_item, truth_item in iter_pairs(maps_seq, truth_seq,
                                                      ("anomaly_maps", "ground_truth")):
            score_map = load_score_map(map_item, index)
            yield index, score_map, _image_channels(truth_item, score_map.shape, index)

    for index, score_map, channels in images():
        accumulator.see_map(score_map)
        in_any_channel = np.zeros(score_map.shape, dtype=bool)
        for number, channel in enumerate(channels):
            where = f"image {index}, channel {number}: "
            defect = _channel_defect(channel, config, where)
            inside = channel != 0
            area = int(np.count_nonzero(inside))
            saturation = defect.saturation_area(area, on_zero_saturation=on_zero_saturation,
                                                where=where)
            scores = np.sort(score_map[inside])[::-1]  # descending
            ranks = np.arange(area, dtype=np.float64)
            # weight of the pixel of rank r (0-based): min(r+1, s) - min(r, s), over s
            weights = (np.minimum(ranks + 1.0, saturation) - np.minimum(ranks, saturation))
            weights /= saturation
            accumulator.add(scores, weights)
            accumulator.num_units += 1
            in_any_channel |= inside
        accumulator.num_negatives += score_map.size - int(np.count_nonzero(in_any_channel))

    def negatives() -> Iterator[np.ndarray]:
        for _, score_map, channels in images():
            if not channels:
                yield score_map
                continue
            in_any_channel = np.zeros(score_map.shape, dtype=bool)
            for channel in channels:
                in_any_channel |= channel != 0
            yield score_map[~in_any_channel]

    return accumulator, negatives()


@dataclass(frozen=True)
class SproCurve:
    """Exact (FPR, mean sPRO) curve, LOCO convention.

    Attributes:
        fpr: (K,) float64, non-decreasing from 0 to 1.
        mean_spro: (K,) float64 mean sPRO over all channels.
        thresholds: (K,) float64; point i holds when pixels with ``score > thresholds[i]``
            are positive (first: the highest score -> (0, 0); last: -inf -> all positive).

    With ``merge_collinear=True`` points inside runs of defect-free-only scores (collinear,
    on one horizontal segment) are left out; areas are identical.
    """

    fpr: np.ndarray
    mean_spro: np.ndarray
    thresholds: np.ndarray

    def area(self, limit: float) -> float:
        """AUsPRO at ``limit``: area up to FPR ``limit`` divided by ``limit``."""
        return trapezoid_area(self.fpr, self.mean_spro, limit) / limit


def spro_curve(anomaly_maps: MapCollection, ground_truth: Any, defects_config: DefectsConfigLike,
               *, on_zero_saturation: ZeroSaturationPolicy = "raise",
               merge_collinear: bool = True) -> SproCurve | None:
    """The exact sPRO curve; None when there is no channel or no defect-free pixel.

    Args: as :func:`auspro`; ``merge_collinear=False`` gives one point per distinct score
    (LOCO's exhaustive list) at a memory cost growing with the number of distinct scores.
    """
    accumulator, negatives = _spro_passes(anomaly_maps, ground_truth, defects_config,
                                          on_zero_saturation)
    if merge_collinear:
        sweep = build_sweep(accumulator, negatives, track_extremes=True)
        if sweep.num_units == 0 or sweep.num_negatives == 0:
            return None
        fpr, y, _, exclusive = sweep.curve_points()
        return SproCurve(fpr=np.concatenate(([0.0], fpr)), mean_spro=np.concatenate(([0.0], y)),
                         thresholds=np.concatenate(([sweep.max_score()], exclusive)))
    if accumulator.num_units == 0 or accumulator.num_negatives == 0:
        return None
    fpr, y, scores = exact_curve_points(accumulator, negatives)
    # (0, 0) = nothing above the highest score; point i counts scores >= scores[i], i.e.
    # scores > scores[i + 1] (the next lower distinct score), and the last one everything.
    thresholds = np.concatenate((scores, [-np.inf]))
    return SproCurve(fpr=np.concatenate(([0.0], fpr)), mean_spro=np.concatenate(([0.0], y)),
                     thresholds=thresholds)


def auspro(anomaly_maps: MapCollection, ground_truth: Any, defects_config: DefectsConfigLike,
           limits: Iterable[float] = DEFAULT_SPRO_LIMITS, *,
           on_zero_saturation: ZeroSaturationPolicy = "raise") -> dict[float, float | None]:
    """Exact AUsPRO (every distinct score a threshold) at each FPR limit.

    Args:
        anomaly_maps: N maps (H_i, W_i), arrays or zero-argument loaders.
        ground_truth: N items, each the channels of one image: None or [] (defect-free), a
            list of 2-D integer arrays (0 outside, the defect's ``pixel_value`` inside), a
            (C, H, W) array, or a zero-argument loader of one of those (e.g.
            :class:`LocoGroundTruth`).
        defects_config: ``defects_config.json`` path, its parsed list, or ``{pixel_value:
            DefectType}``.
        limits: FPR limits in (0, 1].
        on_zero_saturation: "raise" (default) or "one_pixel", see the module docstring.

    Returns:
        ``{limit: AUsPRO}``; values None when no image has a channel or no pixel lies
        outside every channel.
    """
    checked = validate_limits(limits)
    accumulator, negatives = _spro_passes(anomaly_maps, ground_truth, defects_config,
                                          on_zero_saturation)
    sweep = build_sweep(accumulator, negatives, track_extremes=False)
    return sweep.normalized_areas(checked)
