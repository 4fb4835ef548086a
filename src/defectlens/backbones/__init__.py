"""Pretrained CNN backbones (plain PyTorch) and the patch-feature extractor built on them.

>>> extractor = FeatureExtractor("efficientnet_lite0")
>>> extractor(images).shape      # images (N, 3, H, W) in [0, 1]
(N, 152, ceil(H / 8), ceil(W / 8))
"""

from __future__ import annotations

from defectlens.backbones.features import FeatureExtractor
from defectlens.backbones.registry import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    FeatureLayer,
    available_backbones,
    build_backbone,
    get_backbone_spec,
    read_state_dict,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneSpec",
    "FeatureExtractor",
    "FeatureLayer",
    "available_backbones",
    "build_backbone",
    "get_backbone_spec",
    "read_state_dict",
]
