"""Outputs of a frozen encoder per training input, so that it runs once per input, not once per step.

A method that trains a decoder on a frozen pretrained encoder (``fpn_autoencoder``,
``supervised_fpn``) sees the same unaugmented inputs in every epoch; their encoder outputs do
not change, so they are computed on first sight and kept, keyed by (image index, tile box),
while the memory budget lasts (later inputs are encoded each time). Only valid while the
inputs do not change between epochs: `FeatureCache.usable` says so (no augmentation, encoder
frozen). On 2 cores the encoder is most of a step's time (EfficientNet-Lite0 at 256 px).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from defectlens.samples import Batch, FitData


class FeatureCache:
    """Encoder outputs (one list of level maps per model input) computed once.

    Args:
        encoder: maps images (n, 3, H, W) to a list of (n, C_l, h_l, w_l) tensors; frozen.
        enabled: cache at all (see `usable`); when False every call runs the encoder.
        max_megabytes: most memory the cached tensors may take.
    """

    def __init__(self, encoder: nn.Module, enabled: bool = True, max_megabytes: float = 1024.0) -> None:
        self.encoder = encoder
        self.enabled = enabled
        self._bytes_left = max_megabytes * 2**20
        self._full = False
        self._store: dict[Hashable, list[Tensor]] = {}

    @staticmethod
    def usable(data: "FitData", encoder_trainable: bool) -> bool:
        """True when the fitting inputs are the same in every epoch and the encoder is frozen."""
        augmentation = data.augmentation
        return not encoder_trainable and (augmentation is None or len(augmentation) == 0)

    def __call__(self, batch: "Batch") -> list[Tensor]:
        """The encoder's levels for ``batch`` (n inputs): a list of (n, C_l, h_l, w_l); without
        caching the encoder simply runs (with gradients, if it is trained)."""
        if not self.enabled:
            return list(self.encoder(batch.x))
        with torch.no_grad():
            return self._cached(batch)

    def _cached(self, batch: "Batch") -> list[Tensor]:
        keys = [(int(index), box) for index, box in zip(batch.image_index.tolist(), batch.boxes)]
        missing = [row for row, key in enumerate(keys) if key not in self._store]
        fresh: dict[int, int] = {}  # row -> position in `computed`
        computed: list[Tensor] = []
        if missing:
            computed = list(self.encoder(batch.x[missing]))
            for position, row in enumerate(missing):
                fresh[row] = position
                levels = [level[position : position + 1].clone() for level in computed]
                size = sum(level.numel() * level.element_size() for level in levels)
                if not self._full and size <= self._bytes_left:
                    self._store[keys[row]] = levels
                    self._bytes_left -= size
                else:
                    self._full = True  # the budget is spent: later inputs are encoded every time
        num_levels = len(computed) if computed else len(self._store[keys[0]])
        return [
            torch.cat([computed[level][fresh[row] : fresh[row] + 1] if row in fresh else self._store[key][level]
                       for row, key in enumerate(keys)])
            for level in range(num_levels)
        ]

    def clear(self) -> None:
        """Drop every cached tensor (after training)."""
        self._store.clear()
