"""Student-teacher anomaly detection with a hard cosine loss and corruption models (the
reusable-food-packaging study: a frozen pretrained teacher, a student of the same architecture
trained on defect-free images to reproduce the teacher's feature maps).

    teacher  T_l(x): frozen pretrained backbone, feature maps of the chosen layers l = 1..L
    student  S_l(x'): the same architecture, trained (random initialization, or the teacher's)
    views    x  = augment(image)        rotation, brightness / contrast: teacher AND student
             x' = corrupt(x)            what only the student sees: stained shapes, a generated
                                        defect (the teacher then sees its clean original), and in
                                        feature space latent noise or transfer noise added to the
                                        student's stem output
    loss     d_l(i, j) = 1 - cos(S_l(x')(i, j), T_l(x)(i, j))         per location
             L = 1/L sum_l mean{ d_l >= quantile_p(d_l) }              the hard-case loss;
             p = 0 (the plain mean) for the first ``hard_start`` of the steps, then ``hard_quantile``
    map      D(i, j) = -0.5 / L sum_l ||S_l(x)(i, j) - T_l(x)(i, j)||^2           (Eq. 1)
             H = -exp(D)                                                        (Eq. 2)
             H_q = (H - q_a) / (q_b - q_a), q_a, q_b quantiles of H over the   (Eq. 3)
             held-out normal images (the detector's "split" calibration images)
    mask     the detector's threshold on the (blurred, upsampled) normalized map

Transfer noise: M = T_stem(defective image of another product) - T_stem(normal image of that
product), restricted to the defect's ground-truth region when the folder has masks and scaled
from the teacher's stem units to the student's (the ratio of their stem outputs' standard
deviations: 1 when the student starts from the teacher), added to the student's stem output.
Latent noise: Gaussian, its standard deviation ``latent_noise_std`` times that of the student's
stem output in the batch. Each corruption hits a sample with its own probability.

Deviations from the study: its teacher is DeiT-B/384 (ImageNet), for which no weights exist
offline; the teacher here is a registered backbone (EfficientNet-Lite0 by default; any
registered backbone, and a local state-dict file through the detector's ``weights``). Its
generated defects come from a diffusion model that cannot run offline: any folder of defect
images with their clean originals plugs in (``generated_defects``; ``defectlens synth`` output
included). With ``normalize_features`` (default) Eq. 1 compares unit-length feature vectors,
the quantity the cosine loss trains (||a/|a| - b/|b|||^2 = 2 (1 - cos)); without it, the raw
features. Defaults follow the study's full model (its Table 2's last row): hard-case loss,
rotation, brightness/contrast, latent noise and stained shapes on; transfer noise and
generated defects act when their folders are given. CPU default: 500 steps at batch 8
(measured about 2 s a step at 256 px on 2 shared cores, i.e. about 17 minutes; 104 steps in
3.5 minutes reached only 0.49 image AUROC on transistor - the default budget is not yet validated).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.registry import get_backbone_spec
from defectlens.data.defect_pairs import DefectPair, generated_defect_pairs, transfer_pairs
from defectlens.data.images import read_image, read_mask
from defectlens.data.synthetic import stain_noise
from defectlens.data.transforms import AugmentationPipeline, AugmentationStep, BrightnessContrast, Rotate
from defectlens.errors import ConfigError
from defectlens.methods.trained import TrainedMethod
from defectlens.networks.encoder import PretrainedEncoder
from defectlens.networks.first_stage import FirstStage
from defectlens.postprocess import upsample

if TYPE_CHECKING:
    from defectlens.samples import Batch, FitData

STUDENT_INITS = ("random", "teacher")


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def hard_cosine_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], hard_quantile: float) -> Tensor:
    """Mean over layers of the mean per-location cosine distance at or above the
    ``hard_quantile`` quantile (0: every location). [(N, C_l, h_l, w_l)] x 2 -> scalar."""
    losses = []
    for s, t in zip(student, teacher):
        distance = (1.0 - F.cosine_similarity(s, t, dim=1)).flatten()
        if hard_quantile > 0.0:
            kept = max(1, math.ceil((1.0 - hard_quantile) * distance.numel()))
            distance = distance.topk(kept).values
        losses.append(distance.mean())
    return torch.stack(losses).mean()


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, C) float32 -> (size[0], size[1], C) (area when shrinking, linear otherwise)."""
    if image.shape[:2] == tuple(size):
        return image
    shrink = image.shape[0] > size[0] or image.shape[1] > size[1]
    resized = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return resized.reshape(size[0], size[1], *image.shape[2:])


def _as_tensor(images: Sequence[np.ndarray], device: torch.device) -> Tensor:
    """(H, W, 3) float32 arrays -> (N, 3, H, W) on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).contiguous().to(device)


class StudentTeacher(TrainedMethod):
    """Student-teacher: the student learns the frozen teacher's features on normal images;
    anomalies are where it fails. Hard-case cosine loss, augmentation and corruption models.

    Args:
        teacher_layers: teacher (and student) layers whose feature maps are compared; None:
            the backbone's stride-8 and stride-16 stage ends (EfficientNet-Lite0: _blocks.4,
            _blocks.10). The detector's backbone (and its weights file) is the teacher.
        student_init: "random" (the study) or "teacher" (start from the teacher's weights).
        normalize_features: compare unit-length feature vectors in the map (Eq. 1), the
            quantity the cosine loss trains; False: the raw features.
        quantile_a, quantile_b: quantiles of the map over held-out normal images that map to 0
            and 1 (Eq. 3).
        hard_quantile: the hard-case loss keeps the per-location distances at or above this
            quantile after the warm-up (0: the plain mean throughout, the "vanilla" loss).
        hard_start: fraction of max_steps trained with the plain mean before the hard-case loss.
        rotation_degrees: random rotation within +-this many degrees (0: none); teacher and
            student see the same rotated image.
        brightness: random brightness offset within +-this (0: none), with the contrast change.
        contrast: random contrast factor within 1 +- this (0: none).
        augmentation_probability: probability of each augmentation step per sample.
        latent_noise_std: Gaussian noise added to the student's stem output, in units of that
            output's standard deviation (0: no latent noise).
        latent_noise_probability: probability per sample of latent noise.
        stain_probability: probability per sample that the student sees stained-shape noise
            (irregular coloured blobs, `data.synthetic.stain_noise`); 0: none.
        transfer_from: folders of other products in MVTec layout (train/good, test/<defect>,
            optional ground_truth), or folders of such categories; their teacher stem
            differences (defective - normal) are added to the student's stem output. None: no
            transfer noise.
        transfer_probability: probability per sample of transfer noise.
        transfer_pairs: (defective, normal) pairs drawn from the transfer folders.
        generated_defects: folder of generated defects with their clean originals (defect/ +
            clean/ with the same file names, or `defectlens synth` output); the student sees
            the defect, the teacher the clean image. None: none.
        generated_probability: probability per sample of replacing it by a generated pair.
    """

    name = "student_teacher"
    pretrained_networks = ("teacher",)
    option_choices = {**TrainedMethod.option_choices, "student_init": STUDENT_INITS}

    def __init__(
        self, teacher_layers: Sequence[str] | None = None, student_init: str = "random", normalize_features: bool = True,
        quantile_a: float = 0.9, quantile_b: float = 0.995, hard_quantile: float = 0.99, hard_start: float = 0.5,
        rotation_degrees: float = 5.0, brightness: float = 0.1, contrast: float = 0.1,
        augmentation_probability: float = 0.5, latent_noise_std: float = 0.25, latent_noise_probability: float = 0.5,
        stain_probability: float = 0.5, transfer_from: Sequence[str] | None = None, transfer_probability: float = 0.5,
        transfer_pairs: int = 32, generated_defects: str | None = None, generated_probability: float = 0.5,
        max_steps: int = 500, learning_rate: float = 1e-3, train_batch_size: int = 8, **training: Any,
    ) -> None:
        if student_init not in STUDENT_INITS:
            raise ConfigError(f"student_init must be one of {', '.join(STUDENT_INITS)}, got {student_init!r}")
        if not 0.0 <= quantile_a < quantile_b <= 1.0:
            raise ConfigError(f"need 0 <= quantile_a < quantile_b <= 1, got {quantile_a!r}, {quantile_b!r}")
        if not 0.0 <= hard_quantile < 1.0:
            raise ConfigError(f"hard_quantile must be in [0, 1), got {hard_quantile!r}")
        if min(rotation_degrees, brightness, contrast, latent_noise_std) < 0 or contrast >= 1 or transfer_pairs < 1:
            raise ConfigError("rotation_degrees, brightness, latent_noise_std must be >= 0, contrast in [0, 1) and "
                              f"transfer_pairs >= 1, got {rotation_degrees}, {brightness}, {latent_noise_std}, "
                              f"{contrast}, {transfer_pairs}")
        self.teacher_layers = list(teacher_layers) if teacher_layers else None
        self.student_init = student_init
        self.normalize_features = bool(normalize_features)
        self.quantile_a, self.quantile_b = float(quantile_a), float(quantile_b)
        self.hard_quantile = float(hard_quantile)
        self.hard_start = _check_probability("hard_start", hard_start)
        self.rotation_degrees, self.brightness, self.contrast = float(rotation_degrees), float(brightness), float(contrast)
        self.augmentation_probability = _check_probability("augmentation_probability", augmentation_probability)
        self.latent_noise_std = float(latent_noise_std)
        self.latent_noise_probability = _check_probability("latent_noise_probability", latent_noise_probability)
        self.stain_probability = _check_probability("stain_probability", stain_probability)
        self.transfer_from = [str(folder) for folder in transfer_from] if transfer_from else None
        self.transfer_probability = _check_probability("transfer_probability", transfer_probability)
        self.transfer_pairs = int(transfer_pairs)
        self.generated_defects = str(generated_defects) if generated_defects else None
        self.generated_probability = _check_probability("generated_probability", generated_probability)
        super().__init__(max_steps=max_steps, learning_rate=learning_rate, train_batch_size=train_batch_size, **training)
        self.quantiles: Tensor | None = None
        """(q_a, q_b) float64 of Eq. 3, set after training (None: maps are not normalized)."""
        self._steps = 0
        self._generated: list[tuple[np.ndarray, np.ndarray]] = []
        self._transfer: list[DefectPair] = []
        self._transfer_noise: dict[tuple[int, int], tuple[Tensor, float]] = {}
        self._generated_tensors: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ networks
    def build_networks(self) -> dict[str, nn.Module]:
        context = self.context
        layers = self.teacher_layers or [layer.name for layer in get_backbone_spec(context.backbone).default_layers]
        teacher = PretrainedEncoder(context.backbone, layers, context.weights, circular_padding=context.circular_padding,
                                    device=context.device)
        student = PretrainedEncoder(context.backbone, layers, context.weights, pretrained=self.student_init == "teacher",
                                    trainable=True, circular_padding=context.circular_padding, device=context.device)
        self._teacher_stem, self._student_stem = FirstStage(teacher), FirstStage(student)
        return {"teacher": teacher, "student": student}

    def augmentation(self) -> AugmentationPipeline:
        """The augmentation both networks see (`data.transforms` steps)."""
        steps: list[AugmentationStep] = []
        if self.rotation_degrees > 0:
            steps.append(Rotate(max_degrees=self.rotation_degrees, p=self.augmentation_probability))
        if self.brightness > 0 or self.contrast > 0:
            steps.append(BrightnessContrast(brightness=self.brightness, contrast_range=(1 - self.contrast, 1 + self.contrast),
                                            p=self.augmentation_probability))
        return AugmentationPipeline(steps)

    def corruptions(self) -> list[str]:
        """The corruption models this configuration trains with."""
        active = {
            "latent_noise": self.latent_noise_std > 0 and self.latent_noise_probability > 0,
            "stained_shapes": self.stain_probability > 0,
            "transfer_noise": bool(self.transfer_from) and self.transfer_probability > 0,
            "generated_defects": bool(self.generated_defects) and self.generated_probability > 0,
        }
        return [name for name, on in active.items() if on]

    # ------------------------------------------------------------------ training
    def before_training(self, data: "FitData") -> None:
        """Reset the step count (the hard-case loss starts after ``hard_start``); read the
        generated-defect pairs and draw the transfer pairs."""
        self._steps = 0
        corruptions = self.corruptions()
        self._generated = [(read_image(pair.defective), read_image(pair.normal))
                           for pair in generated_defect_pairs(self.generated_defects)] if "generated_defects" in corruptions else []
        self._transfer = (transfer_pairs(self.transfer_from or [], self.transfer_pairs, self.seed)
                          if "transfer_noise" in corruptions else [])
        self._transfer_noise, self._generated_tensors = {}, {}

    def views(self, x: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """(teacher input, student input) for images x (N, 3, H, W): both augmented alike; the
        student's stained or replaced by a generated defect (whose clean original the teacher sees)."""
        augment = self.augmentation()
        stains = self.stain_probability > 0
        if not (len(augment) or stains or self._generated):
            return x, x
        size = (int(x.shape[-2]), int(x.shape[-1]))
        images = x.permute(0, 2, 3, 1).cpu().numpy()
        teacher_views, student_views = [], []
        for image in images:
            sample_rng = np.random.default_rng(int(rng.integers(2**63)))
            clean, defective = image, None
            if self._generated and sample_rng.random() < self.generated_probability:
                pair = self._generated[int(sample_rng.integers(len(self._generated)))]
                defective, clean = _resized(pair[0], size), _resized(pair[1], size)
            augmentation_seed = int(sample_rng.integers(2**63))  # the same draws for both views
            if len(augment):
                clean = augment(clean, augmentation_seed)
                defective = None if defective is None else augment(defective, augmentation_seed)
            defective = clean if defective is None else defective
            if stains and sample_rng.random() < self.stain_probability:
                defective = stain_noise(defective, sample_rng)[0]
            teacher_views.append(clean)
            student_views.append(defective)
        return _as_tensor(teacher_views, self.device), _as_tensor(student_views, self.device)

    def transfer_noise(self, size: tuple[int, int]) -> tuple[Tensor, float]:
        """Transfer maps M (P, C_stem, h, w) for model inputs of ``size`` and the teacher's stem
        standard deviation (on the normal images), computed once per size."""
        if size not in self._transfer_noise:
            teacher = self.networks["teacher"]
            differences, normal_stds = [], []
            for pair in self._transfer:
                images = [_resized(read_image(pair.defective), size), _resized(read_image(pair.normal), size)]
                with torch.no_grad(), self._teacher_stem.captured() as stem:
                    teacher(_as_tensor(images, self.device))
                assert stem.value is not None
                difference = stem.value[0] - stem.value[1]
                if pair.mask is not None:
                    region = _resized(read_mask(pair.mask).astype(np.float32), tuple(difference.shape[-2:]))
                    difference = difference * torch.from_numpy(np.ascontiguousarray(region)).to(self.device)
                differences.append(difference)
                normal_stds.append(float(stem.value[1].std()))
            self._transfer_noise[size] = (torch.stack(differences), float(np.mean(normal_stds)))
        return self._transfer_noise[size]

    def stem_perturbation(self, x: Tensor, rng: np.random.Generator) -> Callable[[Tensor], Tensor] | None:
        """What to add to the student's stem output for this batch (latent and transfer noise), or None."""
        corruptions = self.corruptions()
        count = x.shape[0]
        latent = np.zeros(count, bool)
        if "latent_noise" in corruptions:
            latent = rng.random(count) < self.latent_noise_probability
        transfer = np.full(count, -1)
        if self._transfer:
            chosen = rng.random(count) < self.transfer_probability
            transfer[chosen] = rng.integers(len(self._transfer), size=int(chosen.sum()))
        if not latent.any() and (transfer < 0).all():
            return None
        maps, teacher_std = self.transfer_noise((int(x.shape[-2]), int(x.shape[-1]))) if (transfer >= 0).any() else (None, 1.0)

        def perturbation(stem: Tensor) -> Tensor:
            scale = stem.detach().std()
            added = torch.zeros_like(stem)
            rows = torch.from_numpy(np.flatnonzero(latent)).to(stem.device)
            if rows.numel():
                noise = torch.randn((rows.numel(), *stem.shape[1:]), device=stem.device, dtype=stem.dtype)
                added[rows] += self.latent_noise_std * scale * noise
            picked = np.flatnonzero(transfer >= 0)
            if picked.size and maps is not None:
                chosen_maps = maps[torch.from_numpy(transfer[picked]).to(maps.device)]
                if chosen_maps.shape[-2:] != stem.shape[-2:]:
                    chosen_maps = F.interpolate(chosen_maps, size=stem.shape[-2:], mode="bilinear", align_corners=False)
                added[torch.from_numpy(picked).to(stem.device)] += chosen_maps * (scale / teacher_std)
            return added

        return perturbation

    def training_step(self, batch: "Batch") -> Tensor:
        """The hard-case cosine loss of the student's (corrupted) view against the teacher's clean one.

        A batch smaller than ``train_batch_size`` (few-shot) is repeated to that size; each copy
        is augmented and corrupted on its own. Randomness is drawn from torch's generator,
        which the training loop seeds.
        """
        x = batch.x.to(self.device)
        if x.shape[0] < self.train_batch_size:
            x = x[torch.arange(self.train_batch_size, device=x.device) % x.shape[0]]
        student = self.networks["student"]
        if student.training:
            self._steps += 1
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        teacher_view, student_view = self.views(x, rng)
        with torch.no_grad():
            target = self.networks["teacher"](teacher_view)
        with self._student_stem.perturbed(self.stem_perturbation(x, rng)):
            output = student(student_view)
        hard = self.hard_quantile if self._steps > self.hard_start * self.max_steps else 0.0
        return hard_cosine_loss(output, target, hard)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def raw_map(self, x: Tensor) -> Tensor:
        """H = -exp(D), D = -0.5 / L sum_l ||S_l - T_l||^2 (Eqs. 1-2): x (N, 3, H, W) ->
        (N, h, w) float64 on the finest chosen layer's grid."""
        x = x.to(self.device)
        teacher, student = self.networks["teacher"](x), self.networks["student"](x)
        squared = []
        for t, s in zip(teacher, student):
            if self.normalize_features:
                t, s = F.normalize(t, dim=1), F.normalize(s, dim=1)
            squared.append((s.double() - t.double()).pow(2).sum(dim=1))
        grid = max((tuple(m.shape[-2:]) for m in squared), key=lambda shape: shape[0] * shape[1])
        circular = self.context.circular_padding
        distance = -0.5 * torch.stack([upsample(m, grid, circular) for m in squared]).mean(dim=0)
        return -torch.exp(distance)

    def after_training(self, data: "FitData") -> None:
        """q_a, q_b of Eq. 3: quantiles of H over the held-out normal images (the fitting
        images when none is held out)."""
        batches = data.held_out() if data.held_out_indices else data.images(torch.tensor(data.fit_indices), None)
        values = torch.cat([self.raw_map(batch.x).flatten().cpu() for batch in batches]).numpy()
        low, high = np.quantile(values, [self.quantile_a, self.quantile_b])
        if not high > low:
            high = low + max(1e-12, abs(low) * 1e-9)
        self.quantiles = torch.tensor([low, high], dtype=torch.float64)

    @torch.no_grad()
    def patch_scores(self, x: Tensor) -> Tensor:
        """H_q = (H - q_a) / (q_b - q_a) (Eq. 3): (N, h, w) float32 on the finest layer's grid."""
        raw = self.raw_map(x)
        if self.quantiles is not None:
            low, high = self.quantiles.tolist()
            raw = (raw - low) / (high - low)
        return raw.float()

    def fit_summary(self) -> dict[str, Any]:
        summary = super().fit_summary()
        if summary:
            summary["corruptions"] = self.corruptions()
            summary["augmentation"] = self.augmentation().to_config()
            summary["quantiles"] = self.quantiles.tolist() if self.quantiles is not None else None
        return summary


    def extra_state(self) -> dict[str, Tensor]:
        return {"quantiles": self.quantiles} if self.quantiles is not None else {}

    def load_extra_state(self, tensors: dict[str, Tensor]) -> None:
        if "quantiles" not in tensors:
            raise ConfigError(f"{self.name}: the model file has no map quantiles (extra.quantiles)")
        self.quantiles = tensors["quantiles"].to(torch.float64)
