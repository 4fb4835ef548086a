"""Supervised segmentation baseline of the PET-preform study: the FPN decoder trained with BCE on
normal AND labelled defective images.

    network   pretrained encoder (the detector's backbone, levels at strides 2 ... 32, frozen by
              default) + the FPN decoder (`networks.fpn`) with one output channel: logits
    train     per step ``train_batch_size`` normal images (target: all zeros) and
              ``defects_per_step`` labelled defective images drawn at random from ``defects``
              (target: their masks, resized like the images); pixel-wise binary cross-entropy;
              Adam, lr 1e-3 by default (the study's SGD with Nesterov momentum 0.9, lr 1e-2, is
              ``optimizer="sgd_nesterov"``; within the CPU budget it ended at BCE 0.237, the
              constant prediction, where Adam reaches ~0.1 in 80 steps)
    score     map = sigmoid(logits) (N, H, W); image score = the MEAN of the map (the study found
              the max worse for this baseline), via the protocol's ``image_scores`` hook

``defects``: a folder in MVTec layout (``test/<defect>/*.png`` with
``ground_truth/<defect>/<stem>_mask.png``; ``test/good`` is ignored) or a list of
(image path, mask path) pairs. The defective images are decoded and resized (and tiled) like
every model input; ROI steps are NOT applied to them (a mask cannot follow a template match or
a roll-out): give them in the prepared frame (e.g. already rolled out). NEVER evaluate the
detector on these images: it has seen their labels. ``defect_fraction`` < 1 trains on a
seeded fold of them only (e.g. 0.5 with ``--defects`` = the category being evaluated); the
fold is `labelled_training_images`, which `evaluation.evaluate_run` (``defectlens evaluate``)
leaves out of the evaluation, saying so. benchmarks/pet_table.py draws its own 20-image fold
and leaves it out of every method's evaluation.
The threshold comes, like every trained method's, from held-out NORMAL images only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlens.data.datasets import MVTecAD
from defectlens.data.images import read_mask
from defectlens.errors import ConfigError, DatasetError
from defectlens.inputs import load_input
from defectlens.methods.trained import TrainedMethod
from defectlens.networks.feature_cache import FeatureCache
from defectlens.networks.fpn import build_encoder_fpn

if TYPE_CHECKING:
    from defectlens.samples import Batch, FitData

logger = logging.getLogger(__name__)
DefectsOption = str | Sequence[Sequence[str]] | None


def defect_pairs(defects: DefectsOption) -> list[tuple[Path, Path]]:
    """(image, mask) paths of the labelled defective images named by ``defects``.

    Raises:
        ConfigError: no defects given, or a folder without defective images / masks.
    """
    if defects is None or (not isinstance(defects, str) and len(defects) == 0):
        raise ConfigError("supervised_fpn needs labelled defective images: defects=<MVTec-layout folder> "
                          "or a list of (image, mask) pairs (CLI: --defects DIR)")
    if isinstance(defects, (str, Path)):
        try:
            samples = [sample for sample in MVTecAD(defects).test_samples() if sample.label == 1]
        except DatasetError as error:
            raise ConfigError(f"defects: {error}") from None
        unmasked = [str(sample.path) for sample in samples if sample.mask_path is None]
        if unmasked:
            raise ConfigError(f"defects: no ground_truth mask for {unmasked[:3]}{' ...' if len(unmasked) > 3 else ''}")
        if not samples:
            raise ConfigError(f"defects: no defective images under {Path(defects) / 'test'} (test/<defect>/*.png)")
        return [(sample.path, sample.mask_path) for sample in samples if sample.mask_path is not None]
    pairs = []
    for item in defects:
        if isinstance(item, (str, bytes)) or len(item) != 2:
            raise ConfigError(f"defects: each item must be an (image, mask) pair of paths, got {item!r}")
        pairs.append((Path(item[0]), Path(item[1])))
    return pairs


class SupervisedFpn(TrainedMethod):
    """FPN segmentation network trained with BCE on normal and labelled defective images.

    Args:
        defects: labelled defective images - a folder in MVTec layout (test/<defect>/*.png and
            ground_truth/<defect>/<stem>_mask.png) or a list of (image, mask) path pairs. Do not
            evaluate on them.
        defect_fraction: share of the labelled defective images trained on (a fold drawn with
            the seed); the others are left for evaluation.
        defects_per_step: defective images added to each training batch of normal images.
        skip_strides: strides of the encoder levels added in the decoder (None: every level).
        train_encoder: train the pretrained encoder with the decoder (default: frozen).
    """

    name = "supervised_fpn"

    def __init__(
        self, defects: DefectsOption = None, defect_fraction: float = 1.0, defects_per_step: int = 4, skip_strides: Sequence[int] | None = None,
        train_encoder: bool = False, max_steps: int = 300, optimizer: str = "adam", learning_rate: float = 1e-3,
        weight_decay: float = 1e-6, train_batch_size: int = 4, **training: Any,
    ) -> None:
        super().__init__(
            max_steps=max_steps, optimizer=optimizer, learning_rate=learning_rate, weight_decay=weight_decay,
            train_batch_size=train_batch_size, **training,
        )
        if not 0.0 < defect_fraction <= 1.0:
            raise ConfigError(f"defect_fraction must be in (0, 1], got {defect_fraction}")
        if defects_per_step < 1:
            raise ConfigError(f"defects_per_step must be >= 1, got {defects_per_step}")
        self.defects = defects if defects is None or isinstance(defects, str) else [[str(a), str(b)] for a, b in defects]
        self.defect_fraction = float(defect_fraction)
        self.defects_per_step = int(defects_per_step)
        self.skip_strides = None if skip_strides is None else [int(stride) for stride in skip_strides]
        self.train_encoder = bool(train_encoder)
        self.pretrained_networks = () if self.train_encoder else ("encoder",)
        self._cache: FeatureCache | None = None
        self._defect_images = torch.empty(0)
        self._defect_masks = torch.empty(0)
        self._defect_features: list[torch.Tensor] | None = None

    def build_networks(self) -> dict[str, nn.Module]:
        context = self.context
        encoder, decoder = build_encoder_fpn(
            context.backbone, 1, weights=context.weights, train_encoder=self.train_encoder,
            skip_strides=self.skip_strides, circular_padding=context.circular_padding, device=context.device,
        )
        return {"encoder": encoder, "decoder": decoder}


    # ------------------------------------------------------------------ the labelled defects
    def training_defects(self) -> list[tuple[Path, Path]]:
        """The (image, mask) pairs trained on: all of ``defects``, or a seeded fold of
        ``defect_fraction`` of them (at least one), in sorted order."""
        pairs = sorted(defect_pairs(self.defects))
        if self.defect_fraction >= 1.0:
            return pairs
        count = max(1, round(self.defect_fraction * len(pairs)))
        chosen = np.random.default_rng([self.seed, 11]).choice(len(pairs), size=count, replace=False)
        return [pairs[k] for k in sorted(chosen.tolist())]

    def labelled_training_images(self) -> list[Path]:
        """Paths of the defective images whose labels were trained on: never evaluate on them
        (`evaluation.evaluate_run` leaves them out). Empty when ``defects`` cannot be read now."""
        try:
            return [image for image, _ in self.training_defects()]
        except ConfigError:
            return []

    def load_defects(self, data: "FitData") -> tuple[torch.Tensor, torch.Tensor]:
        """Defective model inputs (n, 3, H, W) and their soft masks (n, H, W) in [0, 1], decoded,
        (tiled) and resized exactly like the normal images (the mask as a 4th channel)."""
        if len(data.preparation.roi):
            logger.warning("supervised_fpn: ROI steps are not applied to the defect images; they are used as given")
        pairs = self.training_defects()
        logger.info("supervised_fpn: training on %d labelled defective images (defect_fraction %g); do not evaluate "
                    "on them", len(pairs), self.defect_fraction)
        inputs = []
        for index, (image_path, mask_path) in enumerate(pairs):
            pixels, _ = load_input(image_path, index)
            mask = read_mask(mask_path)
            if mask.shape != pixels.shape[:2]:
                raise ConfigError(f"defects: mask {mask_path} is {mask.shape}, its image {image_path} {pixels.shape[:2]}")
            stacked = np.concatenate([pixels, mask[:, :, None].astype(np.float32)], axis=2)
            inputs += [item.pixels for item in data.preparation.split(stacked, index)]
        tensor = torch.cat([data.preparation.to_tensor(inputs[k : k + 16]) for k in range(0, len(inputs), 16)])
        return tensor[:, :3].contiguous(), tensor[:, 3].clamp(0.0, 1.0)

    def before_training(self, data: "FitData") -> None:
        self._defect_images, self._defect_masks = self.load_defects(data)
        encoder = self.networks["encoder"]
        self._cache = FeatureCache(encoder, FeatureCache.usable(data, self.train_encoder))
        self._defect_features = None
        if self._cache.enabled:  # the frozen encoder's view of the defects, once
            with torch.no_grad():
                parts = [encoder(self._defect_images[k : k + 8]) for k in range(0, len(self._defect_images), 8)]
            self._defect_features = [torch.cat(levels) for levels in zip(*parts)]

    def after_training(self, data: "FitData") -> None:
        if self._cache is not None:
            self._cache.clear()
        self._cache, self._defect_features = None, None
        self._defect_images, self._defect_masks = torch.empty(0), torch.empty(0)

    # ------------------------------------------------------------------ training and scoring
    def training_step(self, batch: "Batch") -> torch.Tensor:
        encoder = self.networks["encoder"]
        normal = self._cache(batch) if self._cache is not None else encoder(batch.x)
        rows = torch.randint(0, len(self._defect_images), (self.defects_per_step,)).to(self.device)
        defective = ([level[rows] for level in self._defect_features] if self._defect_features is not None
                     else encoder(self._defect_images[rows]))
        features = [torch.cat([a, b]) for a, b in zip(normal, defective)]
        size = tuple(batch.x.shape[-2:])
        targets = torch.cat([torch.zeros((batch.x.shape[0], *size), device=self.device), self._defect_masks[rows]])
        logits = self.networks["decoder"](features, size)[:, 0]
        return F.binary_cross_entropy_with_logits(logits, targets)

    @torch.no_grad()
    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Defect probability per pixel (N, H, W)."""
        logits = self.networks["decoder"](self.networks["encoder"](x), tuple(x.shape[-2:]))
        return torch.sigmoid(logits[:, 0])

    def image_scores(self, x: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor | None:
        """The mean of the map (the study's choice for this baseline)."""
        return patch_scores.flatten(1).mean(dim=1)
