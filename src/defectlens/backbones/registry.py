"""Backbone registry: name -> architecture builder, weight file, normalization, feature layers.

Weights are always loaded strictly: every key of the architecture must be in the file and
nothing else, with matching shapes; otherwise a ``ConfigError`` names the file and the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from defectlens.backbones import efficientnet_lite, mobilenet_v2, resnet
from defectlens.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)
DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class FeatureLayer:
    """A named layer of a backbone whose output can serve as patch features."""

    name: str
    stride: int  # input pixels per feature-map cell
    channels: int


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone and read features from it.

    ``builder`` returns the bare architecture (parameters uninitialised or random);
    ``default_weights`` returns the path of the bundled ImageNet weights, or is None when the
    user must name a file. ``mean`` / ``std`` normalize RGB images in [0, 1].
    ``layers`` lists every selectable layer in forward order; ``default_layers`` are the
    ends of the last stride-8 and the last stride-16 stage.
    """

    name: str
    builder: Callable[[], nn.Module]
    default_weights: Callable[[], Path] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layers: tuple[FeatureLayer, ...]

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of all selectable layers, in forward order."""
        return tuple(layer.name for layer in self.layers)

    @property
    def default_layers(self) -> tuple[FeatureLayer, FeatureLayer]:
        """The last layer at stride 8 and the last layer at stride 16."""
        return (self._last_layer_at_stride(8), self._last_layer_at_stride(16))

    def layer(self, name: str) -> FeatureLayer:
        """The layer called ``name``; ConfigError listing the valid names otherwise."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ConfigError(
            f"backbone {self.name!r} has no layer {name!r}; valid layers: "
            + ", ".join(self.layer_names)
        )

    def _last_layer_at_stride(self, stride: int) -> FeatureLayer:
        return [layer for layer in self.layers if layer.stride == stride][-1]


def _feature_layers(points: tuple[tuple[str, int, int], ...]) -> tuple[FeatureLayer, ...]:
    return tuple(FeatureLayer(name, stride, channels) for name, stride, channels in points)


_REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="efficientnet_lite0",
            builder=efficientnet_lite.efficientnet_lite0,
            default_weights=efficientnet_lite.default_weights_lite0,
            mean=TF_LITE_MEAN,
            std=TF_LITE_STD,
            layers=_feature_layers(efficientnet_lite.feature_points("lite0")),
        ),
        BackboneSpec(
            name="efficientnet_lite2",
            builder=efficientnet_lite.efficientnet_lite2,
            default_weights=efficientnet_lite.default_weights_lite2,
            mean=TF_LITE_MEAN,
            std=TF_LITE_STD,
            layers=_feature_layers(efficientnet_lite.feature_points("lite2")),
        ),
        BackboneSpec(
            name="mobilenet_v2",
            builder=mobilenet_v2.mobilenet_v2,
            default_weights=mobilenet_v2.default_weights,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            layers=_feature_layers(mobilenet_v2.feature_points()),
        ),
        BackboneSpec(
            name="resnet18",
            builder=resnet.resnet18,
            default_weights=None,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            layers=_feature_layers(resnet.feature_points(resnet.BasicBlock.expansion)),
        ),
        BackboneSpec(
            name="wide_resnet50_2",
            builder=resnet.wide_resnet50_2,
            default_weights=None,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            layers=_feature_layers(resnet.feature_points(resnet.Bottleneck.expansion)),
        ),
    )
}


def available_backbones() -> tuple[str, ...]:
    """Names accepted by ``get_backbone_spec`` / ``FeatureExtractor``."""
    return tuple(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name``; ConfigError listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown backbone {name!r}; available backbones: " + ", ".join(_REGISTRY)
        ) from None


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``torch.load(weights_only=True)``).

    Floating-point tensors are returned as contiguous float32. ConfigError naming the file
    when it is missing, unreadable, or not a flat {name: tensor} mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickle with non-tensor objects, ...
        raise ConfigError(f"cannot read weights file {path}: {error}") from error
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()
    ):
        raise ConfigError(
            f"weights file {path} does not hold a state dict (a mapping of names to tensors)"
        )
    # contiguous: some files (e.g. the TF-ported EfficientNet-Lite) store permuted weights,
    # which makes every convolution several times slower
    return {
        key: (value.float() if value.is_floating_point() else value).contiguous()
        for key, value in loaded.items()
    }


def load_weights_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: Path) -> None:
    """Load ``state_dict`` into ``model`` with ``strict=True`` and ``assign=True``.

    ``model`` may live on the meta device (nothing allocated until now). BatchNorm's
    ``num_batches_tracked`` counters, absent from some old torchvision files and unused in
    eval mode, are filled with 0. Any other missing, unexpected or mis-shaped key raises
    ConfigError naming ``source``.
    """
    expected_shapes = {key: value.shape for key, value in model.state_dict().items()}
    state = dict(state_dict)
    for key in expected_shapes:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    missing = sorted(set(expected_shapes) - set(state))
    unexpected = sorted(set(state) - set(expected_shapes))
    mis_shaped = sorted(
        f"{key} {tuple(state[key].shape)} (expected {tuple(shape)})"
        for key, shape in expected_shapes.items()
        if key in state and state[key].shape != shape
    )
    if missing or unexpected or mis_shaped:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:5])
                if len(keys) > 5:
                    shown += f" ... ({len(keys)} in all)"
                problems.append(f"{label} keys: {shown}")
        raise ConfigError(
            f"weights file {source} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True, assign=True)


def build_backbone(
    spec: BackboneSpec | str, weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build the architecture of ``spec`` with its weights, in eval mode, without gradients.

    ``weights``: a torchvision/lukemelas-format state dict file (``.pth`` or
    ``.safetensors``); None uses the bundled ImageNet weights where the backbone has some,
    and is a ConfigError where it has none (no silent random initialisation).
    """
    if isinstance(spec, str):
        spec = get_backbone_spec(spec)
    if weights is None:
        if spec.default_weights is None:
            raise ConfigError(
                f"backbone {spec.name!r} ships no weights: pass weights=PATH to a local "
                "torchvision-format state dict (.pth or .safetensors)"
            )
        try:
            weights = spec.default_weights()
        except (ImportError, FileNotFoundError) as error:
            raise ConfigError(
                f"the bundled weights of backbone {spec.name!r} are not installed: {error}"
            ) from error
    weights_path = Path(weights)
    state_dict = read_state_dict(weights_path)
    with torch.device("meta"):
        model = spec.builder()
    load_weights_strict(model, state_dict, weights_path)
    model.eval().requires_grad_(False)
    return model.to(device)
