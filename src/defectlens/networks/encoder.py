"""A registered backbone as a part of a trained method's network.

``PretrainedEncoder(images in [0, 1]) -> [feature map per chosen layer]``: normalizes with the
backbone's own mean/std, runs only up to the deepest chosen layer, returns the raw layer
outputs (no aggregation, no resizing - unlike `backbones.FeatureExtractor`, which makes
PatchCore / PaDiM features). Frozen (a teacher, a fixed encoder) or trainable (a student
initialized at random or from the same weights), optionally periodic in x (roll-out bands).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from defectlens.backbones.features import make_padding_circular_in_x
from defectlens.backbones.registry import FeatureLayer, build_backbone, get_backbone_spec


class PretrainedEncoder(nn.Module):
    """Layer outputs of a registered backbone.

    Args:
        backbone: a name of `defectlens.backbones.available_backbones()`.
        layers: layer names (``spec.layer_names``); default: the stride-8 and stride-16 stage ends.
        weights: a state-dict file; None = the bundled ImageNet weights.
        pretrained: False builds the architecture with PyTorch's random initialization (a
            student trained from scratch); ``weights`` is then ignored.
        trainable: parameters get gradients and BatchNorm follows ``train()``; otherwise the
            encoder is frozen and always in eval mode.
        circular_padding: every convolution wraps around in x.
        device: where the parameters live.
    """

    def __init__(
        self, backbone: str = "efficientnet_lite0", layers: Sequence[str] | None = None,
        weights: str | Path | None = None, pretrained: bool = True, trainable: bool = False,
        circular_padding: bool = False, device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.spec = get_backbone_spec(backbone)
        self.layers: tuple[FeatureLayer, ...] = (
            tuple(self.spec.layer(name) for name in layers) if layers else self.spec.default_layers
        )
        self.network = build_backbone(self.spec, weights, device) if pretrained else self.spec.builder().to(device)
        if circular_padding:
            make_padding_circular_in_x(self.network)
        self.trainable = trainable
        self.network.requires_grad_(trainable)
        self.register_buffer("mean", torch.tensor(self.spec.mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std, device=device).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    @property
    def channels(self) -> list[int]:
        """Channels of each chosen layer's output, in order."""
        return [layer.channels for layer in self.layers]

    @property
    def strides(self) -> list[int]:
        """Input pixels per output cell of each chosen layer."""
        return [layer.stride for layer in self.layers]

    def train(self, mode: bool = True) -> "PretrainedEncoder":
        """A frozen encoder stays in eval mode (its BatchNorm keeps the pretrained statistics)."""
        return super().train(mode and self.trainable)

    def normalize(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> the backbone's normalized input."""
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> list[Tensor]:
        """(N, 3, H, W) RGB in [0, 1] -> one (N, C_l, H / s_l, W / s_l) map per chosen layer."""
        names = [layer.name for layer in self.layers]
        outputs = self.network.forward_features(self.normalize(images), names)
        return [outputs[name] for name in names]
