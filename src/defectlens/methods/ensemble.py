"""Ensemble of methods and backbones (the PatchCore paper's best configuration is a backbone
ensemble), one model file.

fit:   each member (a method on a backbone and layers of its own) is fitted on the same
       training images; then each member's anomaly map is normalized by its own statistics on
       the held-out normal images (never fitted on): z = (s - mean) / std over every map value.
score: the members' z-maps, resized bilinearly to the finest member grid, combined by their
       mean (or max). The image score is the maximum of the combined, post-processed map.

The ensemble consumes images (each member encodes them with its own feature extractor) and is
calibrated on the held-out split, like a trained method: its thresholds and the members'
normalization come from images no member saw. Members are any registered single method
(``patchcore``, ``padim``, ``spade``, ... and the trained ones); a member's own image score
(e.g. PatchCore's reweighting) is not used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from defectlens.backbones.features import FeatureExtractor
from defectlens.backbones.registry import get_backbone_spec
from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod, MethodContext, ProgressCallback
from defectlens.methods.registry import build_method, method_class

if TYPE_CHECKING:
    from defectlens.samples import FitData

COMBINATIONS = ("mean", "max")
DEFAULT_MEMBERS: tuple[dict[str, Any], ...] = (
    {"method": "patchcore", "backbone": "efficientnet_lite0"},
    {"method": "patchcore", "backbone": "efficientnet_lite2"},
)
_MEMBER_KEYS = {"method", "backbone", "layers", "weights", "options"}


class Ensemble(AnomalyMethod):
    """Members' maps, each normalized by its held-out normal statistics, then combined.

    Args:
        members: the members, each a dict {"method": name, "backbone": name, "layers": [...],
            "weights": state-dict path, "options": {method options}}; backbone, layers and
            weights default to the detector's (layers: the member backbone's defaults when it
            names another backbone).
        combine: "mean" or "max" of the normalized member maps.
    """

    name = "ensemble"
    input = "images"
    calibration = "split"
    option_choices = {"combine": COMBINATIONS}

    def __init__(self, members: Sequence[Mapping[str, Any]] = DEFAULT_MEMBERS, combine: str = "mean") -> None:
        if combine not in COMBINATIONS:
            raise ConfigError(f"unknown combination {combine!r}; choose one of {', '.join(COMBINATIONS)}")
        self.members = [_checked_member(member, index) for index, member in enumerate(members)]
        if len(self.members) < 2:
            raise ConfigError(f"an ensemble needs at least two members, got {len(self.members)}")
        self.combine = combine
        self.normalization = torch.empty(0, 2, dtype=torch.float64)
        """(members, 2): mean and standard deviation of each member's held-out map values."""
        self.methods: list[AnomalyMethod] = []
        self._extractors: list[FeatureExtractor | None] = []

    def bind(self, context: MethodContext) -> None:
        super().bind(context)
        self.methods, self._extractors = [], []
        for member in self.members:
            options = dict(member.get("options", {}))
            if "seed" in method_class(member["method"]).parameters():
                options.setdefault("seed", context.seed)
            method = build_method(member["method"], **options)
            method.bind(_member_context(member, context))
            self.methods.append(method)
            self._extractors.append(None)

    # ------------------------------------------------------------------ member inputs
    def _member_input(self, index: int, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> what member ``index`` consumes."""
        method = self.methods[index]
        if method.input == "images":
            return images
        extractor = self._extractors[index]
        if extractor is None:
            context = method.context
            extractor = FeatureExtractor(
                context.backbone, context.layers, context.weights, context.device, circular_padding=context.circular_padding,
            )
            self._extractors[index] = extractor
        return extractor(images)

    # ------------------------------------------------------------------ fit
    def fit_batches(self, data: "FitData", progress: ProgressCallback | None = None) -> None:
        for index, method in enumerate(self.methods):
            member_data = data.encoded_by(lambda arrays, index=index: self._member_input(index, data.encode(arrays)))
            method.fit_batches(member_data, progress)
        self.normalization = self._held_out_statistics(data)

    def _held_out_statistics(self, data: "FitData") -> torch.Tensor:
        """(members, 2) mean and std of every member's map values on the held-out images."""
        sums = np.zeros((len(self.methods), 3))  # count, sum, sum of squares, in float64
        for batch in data.held_out("normalizing ensemble members"):
            for index in range(len(self.methods)):
                scores = self.methods[index].patch_scores(self._member_input(index, batch.x)).double()
                sums[index] += (scores.numel(), float(scores.sum()), float((scores**2).sum()))
        if sums[0, 0] == 0:
            raise ConfigError("the ensemble normalizes its members on held-out images: give it at least two training images")
        mean = sums[:, 1] / sums[:, 0]
        std = np.sqrt(np.maximum(sums[:, 2] / sums[:, 0] - mean**2, 0.0))
        return torch.tensor(np.stack([mean, np.maximum(std, 1e-12)], axis=1), dtype=torch.float64)

    # ------------------------------------------------------------------ score
    def member_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each member's normalized map (N, h_m, w_m) of images (N, 3, H, W) in [0, 1]."""
        if self.normalization.shape[0] != len(self.methods):
            raise ConfigError("the ensemble is not fitted")
        maps = []
        for index, method in enumerate(self.methods):
            scores = method.patch_scores(self._member_input(index, images))
            mean, std = self.normalization[index].tolist()
            maps.append((scores.float() - mean) / std)
        return maps

    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.member_maps(x)
        height, width = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
        resized = [
            m if m.shape[-2:] == (height, width)
            else F.interpolate(m[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            for m in maps
        ]
        stacked = torch.stack(resized)
        return stacked.mean(0) if self.combine == "mean" else stacked.amax(0)

    # ------------------------------------------------------------------ state
    def fit_summary(self) -> dict[str, Any]:
        return {
            "members": [
                {"method": m.name, "backbone": m.context.backbone, "layers": list(m.context.layers or ()), **m.fit_summary()}
                for m in self.methods
            ],
            "normalization_mean_std": self.normalization.tolist(),
        }

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {
            f"members.{index}.{key}": value for index, method in enumerate(self.methods) for key, value in method.state().items()
        }
        return {**tensors, "normalization": self.normalization}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for index, method in enumerate(self.methods):
            prefix = f"members.{index}."
            method.load_state({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
        self.normalization = tensors["normalization"].to(torch.float64)


def _checked_member(member: Mapping[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(member, Mapping) or "method" not in member:
        raise ConfigError(f"ensemble member {index} must be a dict with a 'method', got {member!r}")
    unknown = sorted(set(member) - _MEMBER_KEYS)
    if unknown:
        raise ConfigError(f"ensemble member {index} has unknown key(s) {unknown}; keys: {', '.join(sorted(_MEMBER_KEYS))}")
    if member["method"] == Ensemble.name:
        raise ConfigError("an ensemble member cannot be an ensemble")
    method_class(member["method"])  # unknown names fail now, with the list
    if "backbone" in member:
        get_backbone_spec(member["backbone"])
    checked = {key: value for key, value in member.items()}
    if "layers" in checked:
        checked["layers"] = [str(layer) for layer in checked["layers"]]
    checked["options"] = dict(member.get("options", {}))
    return checked


def _member_context(member: Mapping[str, Any], context: MethodContext) -> MethodContext:
    backbone = member.get("backbone", context.backbone)
    same_backbone = backbone == context.backbone
    layers = member.get("layers") or (context.layers if same_backbone else None)
    if layers is None:
        layers = [layer.name for layer in get_backbone_spec(backbone).default_layers]
    weights = member.get("weights", context.weights if same_backbone else None)
    return MethodContext(backbone, tuple(layers), weights, context.device, context.image_size, context.circular_padding, context.seed)
