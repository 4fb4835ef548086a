"""EfficientAD (Batzner, Heckler, Koenig: "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024), small and medium.

Networks (`networks.pdn`, `networks.efficientad_autoencoder`): a frozen teacher PDN T (384
channels, distilled from a pretrained backbone), a student PDN S with 768 channels and an
autoencoder A. Training, per step on a normal image I (the paper's Algorithm 1):

    Y  = (T(I) - mu) / sigma                   teacher output, normalized per channel with the
                                               mean / std over the training images
    D  = (Y - S(I)[:384])^2                    (C, h, w) squared differences
    L_hard = mean of D over the elements >= the q_hard = 0.999 quantile of D
    I' = one of brightness / contrast / saturation jitter (factor U(0.8, 1.2)) of I
    Y' = (T(I') - mu) / sigma
    L_AE   = mean (Y' - A(I'))^2               the autoencoder predicts the teacher
    L_STAE = mean (A(I') - S(I')[384:])^2      the student's second half predicts the autoencoder
    L = L_hard + L_AE + L_STAE                 Adam, lr 1e-4, weight decay 1e-5, lr x 0.1 at 95 %

Inference: local map M_ST = mean_c (Y - S(I)[:384])^2, global map M_AE = mean_c (A(I) - S(I)[384:])^2,
each normalized linearly so that its q_a = 0.9 quantile maps to 0 and its q_b = 0.995 quantile
to 0.1 (quantiles of the maps of held-out normal training images, never fitted on; the AutoVI
study's variant, ``map_normalization="training"``, takes them over every training image), and
M = 0.5 M_ST + 0.5 M_AE on the PDN grid (64 x 64 at 256 px); the image score is the max of the
(upsampled, blurred) map.

Deviations, all forced by running offline on a CPU (see also the docs):
- the teacher is distilled from EfficientNet-Lite0 on a generic offline image set
  (``tools/distill_efficientad_teacher.py``), not from WideResNet-101 on ImageNet;
  ``teacher_weights`` takes a better teacher file (e.g. distilled from WideResNet-101 elsewhere;
  the public reference code's ``teacher_small.pth`` loads as it is);
- no ImageNet penalty (L_ST = L_hard): there is no ImageNet offline;
- the default budget is a CPU budget (`DEFAULT_STEPS`), not the paper's 70 000 steps;
- the autoencoder always works at 256 px (the paper's size): other model-input sizes are resized
  for it and its output is resized to the PDN grid.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from defectlens.errors import ConfigError, ModelFileError
from defectlens.methods.trained import TrainedMethod
from defectlens.networks.efficientad_autoencoder import AUTOENCODER_INPUT_SIZE, EfficientADAutoencoder
from defectlens.networks.pdn import PDN, PDN_SIZES, TEACHER_CHANNELS, load_teacher

if TYPE_CHECKING:
    from defectlens.samples import Batch, FitData

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 1000
"""CPU default budget (the paper: 70 000 steps on a GPU); see docs / benchmarks/efficientad_budget.py.
Measured about 1.5 s a step at 256 px on 2 shared cores (teacher + student PDNs on the image and its
jittered copy, plus the autoencoder), i.e. about 25 minutes; 141 steps (3.5 minutes) gave only 0.77
image AUROC on transistor."""
MAP_NORMALIZATIONS = ("held_out", "training")
GRAY = (0.299, 0.587, 0.114)


def hard_feature_loss(distances: Tensor, quantile: float) -> Tensor:
    """Mean of the elements of ``distances`` (any shape) at or above their ``quantile``.

    The quantile is torch.quantile's (linear interpolation), computed with `topk` so that any
    size works (torch.quantile refuses more than 2^24 elements).
    """
    flat = distances.flatten()
    position = quantile * (flat.numel() - 1)
    below = int(np.floor(position))
    top = flat.topk(flat.numel() - below).values  # descending; top[-1] is the element of rank `below`
    threshold = top[-1] if top.numel() == 1 else top[-1] + (position - below) * (top[-2] - top[-1])
    return top[top >= threshold].mean()


def autoencoder_augmentation(images: Tensor, strength: float = 0.2) -> Tensor:
    """The paper's autoencoder-input augmentation: per image one of brightness, contrast or
    saturation jitter with a factor drawn from U(1 - strength, 1 + strength) (torchvision's
    ColorJitter conventions). (N, 3, H, W) in [0, 1] -> same; draws from torch's CPU generator."""
    count = images.shape[0]
    choice = torch.randint(0, 3, (count,)).to(images.device).view(-1, 1, 1, 1)
    factor = (1.0 + strength * (2.0 * torch.rand(count) - 1.0)).to(images.device, images.dtype).view(-1, 1, 1, 1)
    weights = torch.tensor(GRAY, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    gray = (images * weights).sum(dim=1, keepdim=True)
    brightness = images * factor
    contrast = factor * images + (1.0 - factor) * gray.mean(dim=(2, 3), keepdim=True)
    saturation = factor * images + (1.0 - factor) * gray
    jittered = torch.where(choice == 0, brightness, torch.where(choice == 1, contrast, saturation))
    return jittered.clamp(0.0, 1.0)


def _sha_tensor(digest: str) -> Tensor:
    return torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)


class EfficientAD(TrainedMethod):
    """EfficientAD: student-teacher PDNs with a hard-feature loss plus an autoencoder branch.

    Args:
        pdn_size: "small" (EfficientAD-S) or "medium" (EfficientAD-M).
        teacher_weights: a teacher PDN state-dict file (safetensors or torch, keys of the
            PDN's nn.Sequential: 0.weight, 3.weight, ...), or None for the bundled teacher
            distilled from EfficientNet-Lite0 (SHA-256 checked).
        hard_quantile: q_hard of the hard-feature loss (the paper's 0.999).
        quantile_a: the map quantile mapped to 0 (the paper's q_a = 0.9).
        quantile_b: the map quantile mapped to 0.1 (the paper's q_b = 0.995).
        map_normalization: "held_out" (the paper: quantiles over the held-out normal images) or
            "training" (the AutoVI study: over every training image).
        augmentation_strength: brightness / contrast / saturation jitter of the autoencoder's
            input (the paper's 0.2).
        autoencoder_size: side the autoencoder works at (the paper's 256 px).
    """

    name = "efficientad"
    pretrained_networks = ("teacher",)
    option_choices = {**TrainedMethod.option_choices, "pdn_size": PDN_SIZES, "map_normalization": MAP_NORMALIZATIONS}

    def __init__(
        self, pdn_size: str = "small", teacher_weights: str | None = None, hard_quantile: float = 0.999,
        quantile_a: float = 0.9, quantile_b: float = 0.995, map_normalization: str = "held_out",
        augmentation_strength: float = 0.2, autoencoder_size: int = AUTOENCODER_INPUT_SIZE,
        max_steps: int = DEFAULT_STEPS, learning_rate: float = 1e-4, weight_decay: float = 1e-5,
        lr_schedule: str = "step", train_batch_size: int = 1, **training: Any,
    ) -> None:
        super().__init__(max_steps=max_steps, learning_rate=learning_rate, weight_decay=weight_decay,
                         lr_schedule=lr_schedule, train_batch_size=train_batch_size, **training)
        if pdn_size not in PDN_SIZES:
            raise ConfigError(f"pdn_size must be one of {', '.join(PDN_SIZES)}, got {pdn_size!r}")
        if map_normalization not in MAP_NORMALIZATIONS:
            raise ConfigError(f"map_normalization must be one of {', '.join(MAP_NORMALIZATIONS)}, got {map_normalization!r}")
        if not 0.0 <= hard_quantile < 1.0:
            raise ConfigError(f"hard_quantile must be in [0, 1), got {hard_quantile}")
        if not 0.0 <= quantile_a < quantile_b <= 1.0:
            raise ConfigError(f"need 0 <= quantile_a < quantile_b <= 1, got {quantile_a}, {quantile_b}")
        if not 0.0 <= augmentation_strength < 1.0:
            raise ConfigError(f"augmentation_strength must be in [0, 1), got {augmentation_strength}")
        if autoencoder_size < 64 or autoencoder_size % 32:
            raise ConfigError(f"autoencoder_size must be a multiple of 32 of at least 64, got {autoencoder_size}")
        self.pdn_size = pdn_size
        self.teacher_weights = str(teacher_weights) if teacher_weights else None
        self.hard_quantile = float(hard_quantile)
        self.quantile_a, self.quantile_b = float(quantile_a), float(quantile_b)
        self.map_normalization = map_normalization
        self.augmentation_strength = float(augmentation_strength)
        self.autoencoder_size = int(autoencoder_size)
        self.teacher_sha256: str | None = None
        self.teacher_mean = torch.zeros(TEACHER_CHANNELS)
        self.teacher_std = torch.ones(TEACHER_CHANNELS)
        self.map_quantiles = torch.tensor([0.0, 1.0, 0.0, 1.0])  # q_a, q_b of the local map, then the global one

    # ------------------------------------------------------------------ networks
    def build_networks(self) -> dict[str, nn.Module]:
        circular = self.context.circular_padding
        teacher, self.teacher_sha256 = load_teacher(self.pdn_size, self.teacher_weights, circular, self.device)
        student = PDN(self.pdn_size, 2 * TEACHER_CHANNELS, circular).to(self.device)
        autoencoder = EfficientADAutoencoder(TEACHER_CHANNELS, self.autoencoder_size, circular).to(self.device)
        self.teacher_mean, self.teacher_std = self.teacher_mean.to(self.device), self.teacher_std.to(self.device)
        self.map_quantiles = self.map_quantiles.to(self.device)
        return {"teacher": teacher, "student": student, "autoencoder": autoencoder}

    def _teacher(self, images: Tensor) -> Tensor:
        """Normalized teacher output (N, 384, h, w), without gradients."""
        with torch.no_grad():
            output = self.networks["teacher"](images)
        return (output - self.teacher_mean.view(1, -1, 1, 1)) / self.teacher_std.view(1, -1, 1, 1)

    # ------------------------------------------------------------------ training
    def before_training(self, data: "FitData") -> None:
        """Teacher channel mean / std over the (unaugmented) fitting images."""
        _ = self.networks  # build (loads the teacher) before its statistics
        total, total_sq, count = (torch.zeros(TEACHER_CHANNELS, dtype=torch.float64, device=self.device),
                                  torch.zeros(TEACHER_CHANNELS, dtype=torch.float64, device=self.device), 0)
        with torch.no_grad():
            for batch in data.epoch(0, stage=None):
                output = self.networks["teacher"](batch.x.to(self.device)).double()
                total += output.sum(dim=(0, 2, 3))
                total_sq += output.pow(2).sum(dim=(0, 2, 3))
                count += output.shape[0] * output.shape[2] * output.shape[3]
        mean = total / count
        self.teacher_mean = mean.float()
        self.teacher_std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt().float()

    def training_step(self, batch: "Batch") -> Tensor:
        images = batch.x.to(self.device)
        count = images.shape[0]
        augmented = autoencoder_augmentation(images, self.augmentation_strength)
        both = torch.cat([images, augmented])  # one pass of each PDN for both inputs: the same maths, faster
        teacher = self._teacher(both)
        student = self.networks["student"](both)
        reconstruction = self.networks["autoencoder"](augmented, teacher.shape[-2:])
        loss_hard = hard_feature_loss((teacher[:count] - student[:count, :TEACHER_CHANNELS]).pow(2), self.hard_quantile)
        loss_ae = (teacher[count:] - reconstruction).pow(2).mean()
        loss_stae = (reconstruction - student[count:, TEACHER_CHANNELS:]).pow(2).mean()
        return loss_hard + loss_ae + loss_stae

    def after_training(self, data: "FitData") -> None:
        """q_a / q_b of the local and the global map over the normalization images."""
        if self.map_normalization == "training" or not data.held_out_indices:
            if self.map_normalization == "held_out":
                logger.warning("efficientad: no held-out images (one training image?): the maps are normalized on "
                               "the training images")
            indices = torch.tensor(sorted([*data.fit_indices, *data.held_out_indices]))
            batches: Iterable["Batch"] = data.images(indices, stage=None)
        else:
            batches = data.held_out()
        local, global_ = [], []
        for batch in batches:
            map_st, map_ae = self.maps(batch.x)
            local.append(map_st.flatten().cpu().double())
            global_.append(map_ae.flatten().cpu().double())
        quantiles = [self.quantile_a, self.quantile_b]
        values = [*np.quantile(torch.cat(local).numpy(), quantiles), *np.quantile(torch.cat(global_).numpy(), quantiles)]
        self.map_quantiles = torch.tensor(values, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalized local and global maps (N, h, w) each, on the PDN grid."""
        images = x.to(self.device)
        teacher = self._teacher(images)
        student = self.networks["student"](images)
        reconstruction = self.networks["autoencoder"](images, teacher.shape[-2:])
        map_st = (teacher - student[:, :TEACHER_CHANNELS]).pow(2).mean(dim=1)
        map_ae = (reconstruction - student[:, TEACHER_CHANNELS:]).pow(2).mean(dim=1)
        return map_st, map_ae

    @torch.no_grad()
    def patch_scores(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, ceil(H / 4), ceil(W / 4)): 0.5 normalized local + 0.5 normalized global map."""
        map_st, map_ae = self.maps(x)
        qa_st, qb_st, qa_ae, qb_ae = self.map_quantiles.tolist()
        local = 0.1 * (map_st - qa_st) / max(qb_st - qa_st, 1e-12)
        global_ = 0.1 * (map_ae - qa_ae) / max(qb_ae - qa_ae, 1e-12)
        return (0.5 * local + 0.5 * global_).float()

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Tensor]:
        _ = self.networks  # the teacher's hash is known once it is loaded
        assert self.teacher_sha256 is not None
        return {"teacher_mean": self.teacher_mean.cpu(), "teacher_std": self.teacher_std.cpu(),
                "map_quantiles": self.map_quantiles.cpu(), "teacher_sha256": _sha_tensor(self.teacher_sha256)}

    def load_extra_state(self, tensors: dict[str, Tensor]) -> None:
        missing = {"teacher_mean", "teacher_std", "map_quantiles", "teacher_sha256"} - set(tensors)
        if missing:
            raise ModelFileError(f"efficientad model state lacks {', '.join(sorted(missing))}")
        saved = bytes(tensors["teacher_sha256"].tolist()).hex()
        if saved != self.teacher_sha256:
            where = self.teacher_weights or "the bundled teacher"
            raise ModelFileError(f"this efficientad model was trained with teacher weights of SHA-256 {saved}, but "
                                 f"{where} has SHA-256 {self.teacher_sha256}: load it with the same teacher file")
        self.teacher_mean = tensors["teacher_mean"].float().to(self.device)
        self.teacher_std = tensors["teacher_std"].float().to(self.device)
        self.map_quantiles = tensors["map_quantiles"].float().to(self.device)

    def fit_summary(self) -> dict[str, Any]:
        summary = super().fit_summary()
        if summary:
            summary["teacher_sha256"] = self.teacher_sha256
            summary["map_quantiles"] = [round(v, 8) for v in self.map_quantiles.tolist()]
        return summary
