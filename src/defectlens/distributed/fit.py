"""Sharded fit on Ray: shard the training images, fit each shard in a task, meld into one model.

The training images are cut into ``shards`` contiguous blocks of the input list; every task
reads its own images (paths travel, not pixels) and keeps the global image index, so seeds,
augmentation and leave-one-image-out bookkeeping are those of the single-process fit.

    Sequential PatchCore   each task streams its shard through a fixed-size coreset of M
                           (memory O(M^2) per worker, as on one machine); tasks meld the shard
                           coresets to M (a tree of `meld` tasks of ``meld_fan_in`` each); an
                           approximation of the single-process stream, measured in the README
    PaDiM (exact)          a task per shard encodes its images once (features stay in Ray's
                           object store); tasks return additive moments (`ops.moments`) per
                           calibration fold; the driver merges them into the final model and
                           the k-fold models, and tasks score the held-out folds: the same
                           model and thresholds as the single-process fit to float64 round-off
    PatchCore (greedy)     a task per shard encodes its images and takes a greedy coreset of
                           ``coreset_ratio * oversample`` of its patches; a meld task takes the
                           greedy k-center coreset of the union to the single-process size
                           (a composable two-round coreset): an approximation, measured
    other methods          (trained methods, SPADE...) fit on one worker (data-parallel
                           training is out of scope); the fitted model comes back as its file

Paths travel made absolute on the driver (a Ray worker's working directory is the one its node
was started in, not the driver's). Calibration scores (leave-one-image-out, k-fold) are computed by tasks too; the thresholds are
set on the driver from them, by the detector's own rule. Worker deaths are retried by Ray
(``max_retries``); a library error in a task (an unreadable image...) is raised as itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import ray
import torch

from defectlens.calibration import calibration_indices, image_scores
from defectlens.data.transforms import AugmentationPipeline
from defectlens.distributed.cluster import connect
from defectlens.distributed.remote import (
    DEFAULT_RETRIES, DetectorSpec, load_model, model_bytes, portable_errors, wait_all,
)
from defectlens.errors import ConfigError
from defectlens.inputs import ImageInput, expand_inputs
from defectlens.methods.padim import Padim
from defectlens.methods.patchcore import PatchCore
from defectlens.methods.sequential_patchcore import SequentialPatchCore
from defectlens.ops.coreset import coreset_size, greedy_coreset
from defectlens.ops.moments import GaussianMoments
from defectlens.ops.streaming_coreset import meld
from defectlens.results import FitInfo
from defectlens.samples import Batch, FitData, rows_where

ProgressCallback = Callable[[str, int, int], None]
State = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------- what tasks return
@dataclass
class ShardFeatures:
    """A shard's encoded training images, epoch 0 in input order (the object store keeps it).

    Attributes:
        x: (n, C, h, w) float32 patch features of its model inputs.
        image_index: (n,) int64 global training-image index of each model input.
        boxes, shapes: tile boxes (None: whole images) and prepared-image shapes.
    """

    x: np.ndarray
    image_index: np.ndarray
    boxes: list[Any]
    shapes: list[tuple[int, int]]

    def batch(self, rows: torch.Tensor | None = None) -> Batch:
        whole = Batch(torch.from_numpy(np.array(self.x)), torch.from_numpy(np.array(self.image_index)), self.boxes, self.shapes)
        return whole if rows is None else whole.select(rows)


@dataclass
class ShardInfo:
    """What a shard task did: images, model inputs, patches, channels and seconds spent."""

    images: int
    model_inputs: int = 0
    patches: int = 0
    channels: int = 0
    encode_seconds: float = 0.0
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bank:
    """Memory-bank vectors (M, D) float32 and the global training image of each (M,) int64."""

    vectors: np.ndarray
    origin: np.ndarray


# ---------------------------------------------------------------------------------- worker side
def _shard_data(detector: Any, inputs: Sequence[ImageInput], indices: Sequence[int]) -> FitData:
    augmentation = AugmentationPipeline.from_config(detector.augmentation) if detector.augmentation else None
    return FitData(inputs, detector.preparation, detector.encode, detector.batch_size, detector.seed, augmentation, list(indices))


def _fitted(spec: DetectorSpec, state: State) -> Any:
    detector = spec.build()
    detector.method.load_state({name: torch.from_numpy(np.array(value)) for name, value in state.items()})
    return detector


def _state(method: Any) -> State:
    return {name: tensor.detach().cpu().numpy() for name, tensor in method.state().items()}


@ray.remote(max_retries=DEFAULT_RETRIES, num_returns=2)
@portable_errors
def _encode_shard(spec: DetectorSpec, inputs: Sequence[ImageInput], indices: Sequence[int]) -> tuple[ShardFeatures, ShardInfo]:
    started = time.perf_counter()
    detector = spec.build()
    data = _shard_data(detector, inputs, indices)
    joined = data.joined()
    features = ShardFeatures(joined.x.cpu().numpy(), joined.image_index.numpy(), joined.boxes, joined.shapes)
    x = features.x
    info = ShardInfo(len(indices), x.shape[0], x.shape[0] * x.shape[2] * x.shape[3], x.shape[1], data.encode_seconds,
                     time.perf_counter() - started)
    return features, info


@ray.remote(max_retries=DEFAULT_RETRIES, num_returns=2)
@portable_errors
def _stream_shard(spec: DetectorSpec, inputs: Sequence[ImageInput], indices: Sequence[int]) -> tuple[Bank, ShardInfo]:
    started = time.perf_counter()
    detector = spec.build()
    data = _shard_data(detector, inputs, indices)
    detector.method.fit_batches(data)
    bank = Bank(detector.method.memory_bank.cpu().numpy(), detector.method.bank_image_index.numpy())
    info = ShardInfo(len(indices), encode_seconds=data.encode_seconds, seconds=time.perf_counter() - started,
                     summary=detector.method.fit_summary())
    return bank, info


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _meld(size: int, seed: int, max_epochs: int, *banks: Bank) -> Bank:
    merged = meld(
        [torch.from_numpy(np.array(bank.vectors)) for bank in banks], size, seed=seed, max_epochs=max_epochs,
        origins=[torch.from_numpy(np.array(bank.origin)) for bank in banks],
    )
    return Bank(merged.coreset().cpu().numpy().copy(), merged.coreset_origin().cpu().numpy().copy())


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _greedy_shard(spec: DetectorSpec, ratio: float, features: ShardFeatures) -> Bank:
    method = spec.build().method
    shard_method = PatchCore(**{**method.config(), "coreset_ratio": ratio})
    batch = features.batch()
    shard_method.fit(batch.x, batch.image_index)
    return Bank(shard_method.memory_bank.numpy(), shard_method.bank_image_index.numpy())


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _greedy_meld(spec: DetectorSpec, size: int, *banks: Bank) -> Bank:
    method = spec.build().method
    union = np.concatenate([bank.vectors for bank in banks])
    origin = np.concatenate([bank.origin for bank in banks])
    chosen = np.sort(greedy_coreset(union, min(size, union.shape[0]), method.projection_dim, method.seed))
    return Bank(union[chosen].copy(), origin[chosen].copy())


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _held_out_scores(spec: DetectorSpec, state: State, inputs: Sequence[ImageInput], indices: Sequence[int]) -> np.ndarray:
    """Leave-one-image-out scores of training images (streamed from their files)."""
    detector = _fitted(spec, state)
    data = FitData(inputs, detector.preparation, detector.encode, detector.batch_size, detector.seed)
    method = detector.method
    batches = data.images(torch.tensor(list(indices), dtype=torch.int64), None)
    return image_scores(method, detector.chain, detector.preparation,
                        ((batch, method.held_out_patch_scores(batch.x, batch.image_index)) for batch in batches))


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _held_out_scores_of_features(spec: DetectorSpec, state: State, chosen: np.ndarray, features: ShardFeatures) -> np.ndarray:
    """Leave-one-image-out scores of a shard's chosen images, from its encoded features."""
    detector = _fitted(spec, state)
    rows = rows_where(torch.isin(torch.from_numpy(np.array(features.image_index)), torch.from_numpy(np.array(chosen))))
    if rows.numel() == 0:
        return np.zeros(0)
    held = features.batch(rows)
    method = detector.method
    return image_scores(method, detector.chain, detector.preparation, [(held, method.held_out_patch_scores(held.x, held.image_index))])


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _plain_scores(spec: DetectorSpec, state: State, inputs: Sequence[ImageInput]) -> np.ndarray:
    """Scores of validation images (never fitted on), as `Detector.fit` scores them."""
    detector = _fitted(spec, state)
    data = FitData(inputs, detector.preparation, detector.encode, detector.batch_size, detector.seed)
    batches = data.images(torch.arange(len(inputs)), None)
    method = detector.method
    return image_scores(method, detector.chain, detector.preparation, ((b, method.patch_scores(b.x)) for b in batches))


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _padim_reduction_moments(spec: DetectorSpec, folds: int, features: ShardFeatures) -> list[GaussianMoments | None]:
    """Per calibration fold (training image index % folds): moments of the C-channel patches."""
    method = spec.build().method
    x = torch.from_numpy(np.array(features.x))
    fold = torch.from_numpy(np.array(features.image_index)) % folds
    return [method.reduction_moments(x[fold == part]) for part in range(folds)]


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _padim_moments(
    spec: DetectorSpec, projections: list[np.ndarray], requests: list[tuple[int, list[int]]], folds: int,
    features: ShardFeatures,
) -> list[GaussianMoments]:
    """For each request (projection q, folds F): moments of the reduced patches of this shard's
    images in folds F, merged in fold order (per-fold moments computed once per projection)."""
    method = spec.build().method
    x = torch.from_numpy(np.array(features.x))
    fold = torch.from_numpy(np.array(features.image_index)) % folds
    cache: dict[tuple[int, int], GaussianMoments] = {}

    def moments(projection: int, part: int) -> GaussianMoments:
        if (projection, part) not in cache:
            method.projection = torch.from_numpy(np.array(projections[projection]))
            cache[projection, part] = method.gaussian_moments(x[fold == part])
        return cache[projection, part]

    return [GaussianMoments.merge_all(moments(projection, part) for part in parts) for projection, parts in requests]


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _padim_fold_scores(
    spec: DetectorSpec, states: dict[int, State], folds: int, chosen: np.ndarray, features: ShardFeatures
) -> np.ndarray:
    """Scores of this shard's chosen images of each fold f by the model fitted without fold f."""
    detector = spec.build()
    image_index = torch.from_numpy(np.array(features.image_index))
    is_chosen = torch.isin(image_index, torch.from_numpy(np.array(chosen)))
    scores = []
    for fold, state in sorted(states.items()):
        rows = rows_where((image_index % folds == fold) & is_chosen)
        if rows.numel() == 0:
            continue
        method = detector.method.unfitted_copy()
        method.load_state({name: torch.from_numpy(np.array(value)) for name, value in state.items()})
        held = features.batch(rows)
        scores.append(image_scores(method, detector.chain, detector.preparation, [(held, method.patch_scores(held.x))]))
    return np.concatenate(scores) if scores else np.zeros(0)


@ray.remote(max_retries=DEFAULT_RETRIES)
@portable_errors
def _fit_on_worker(spec: DetectorSpec, images: Any, validation: Any) -> bytes:
    detector = spec.build()
    detector.fit(images, validation=validation)
    return model_bytes(detector)


# ---------------------------------------------------------------------------------- driver side
def absolute_inputs(images: Any) -> Any:
    """``images`` with every path made absolute (on the driver's working directory); arrays,
    and None, as they are."""
    if images is None or isinstance(images, np.ndarray):
        return images
    if isinstance(images, str):
        return os.path.abspath(images)
    if isinstance(images, Path):
        return images.absolute()
    return [absolute_inputs(item) for item in images]


def shard_indices(count: int, shards: int) -> list[list[int]]:
    """``shards`` contiguous, nearly equal blocks of range(count) (none empty)."""
    shards = max(1, min(shards, count))
    return [block.tolist() for block in np.array_split(np.arange(count), shards)]


def fit(
    detector: Any, images: ImageInput | Iterable[ImageInput], address: str | None = None, shards: int = 4,
    progress: ProgressCallback | None = None, validation: ImageInput | Iterable[ImageInput] | None = None,
    greedy_oversample: float = 2.0, meld_fan_in: int = 4, meld_epochs: int = 10,
) -> Any:
    """Fit ``detector`` on a Ray cluster; returns it (fitted, as `Detector.fit` leaves it).

    Args:
        detector: an unfitted `Detector`.
        images: the training images (folder, category root, paths or arrays) as `Detector.fit` takes them.
        address: "local", "HOST:PORT" or None (see `cluster.connect`).
        shards: blocks the training images are cut into (one task each).
        progress: progress(stage, done, total) on the driver.
        validation: as in `Detector.fit`.
        greedy_oversample: greedy PatchCore: each shard keeps ``coreset_ratio * greedy_oversample``
            of its patches before the final greedy selection.
        meld_fan_in: Sequential PatchCore: shard coresets melded per meld task.
        meld_epochs: Sequential PatchCore: most passes of each meld.
    """
    from defectlens.detector import _validation_inputs

    if shards < 1:
        raise ConfigError(f"shards must be >= 1, got {shards}")
    images, validation = absolute_inputs(images), absolute_inputs(validation)
    inputs = expand_inputs(images)
    if not inputs:
        raise ConfigError("fit needs at least one training image")
    with connect(address) as ray_module:
        runner = _ShardedFit(ray_module, detector, inputs, _validation_inputs(images, validation), shards, progress)
        method = detector.method
        if method.calibration == "split" or len(inputs) < 2 or not isinstance(method, (Padim, PatchCore, SequentialPatchCore)):
            runner.on_one_worker(images, validation)
        elif isinstance(method, Padim):
            runner.padim()
        elif isinstance(method, SequentialPatchCore):
            runner.sequential_patchcore(meld_fan_in, meld_epochs)
        else:
            runner.patchcore(greedy_oversample)
    return detector


class _ShardedFit:
    """One sharded fit: the tasks of each method kind and the driver's share of the work."""

    def __init__(
        self, ray_module: Any, detector: Any, inputs: list[ImageInput], validation: list[ImageInput], shards: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.ray = ray_module
        self.detector = detector
        self.inputs = inputs
        self.validation = validation
        self.shards = shard_indices(len(inputs), shards)
        self.progress = progress
        self.spec = DetectorSpec.of(detector)
        self.spec_ref = ray_module.put(self.spec)
        self.inputs_ref = ray_module.put(inputs)
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ helpers
    def _report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    def _collect(self, refs: Sequence[Any], stage: str) -> list[Any]:
        """Results of refs (in order), reporting each completion."""
        results: list[Any] = [None] * len(refs)
        self._report(stage, 0, len(refs))
        for done, (index, result) in enumerate(wait_all(self.ray, refs), start=1):
            results[index] = result
            self._report(stage, done, len(refs))
        return results

    def _encode(self) -> tuple[list[Any], list[ShardInfo]]:
        pairs = [_encode_shard.remote(self.spec_ref, self.inputs_ref, shard) for shard in self.shards]
        infos = self._collect([info for _, info in pairs], "encoding shards")
        return [features for features, _ in pairs], infos

    def _chosen(self) -> np.ndarray:
        return calibration_indices(len(self.inputs), self.detector.calibration_images, self.detector.seed).numpy()

    def _chunks(self, indices: np.ndarray) -> list[list[int]]:
        """Calibration images in chunks aligned to the batch size (two per shard, roughly)."""
        batch = self.detector.batch_size
        per_chunk = batch * max(1, -(-len(indices) // (2 * len(self.shards) * batch)))
        return [indices[start : start + per_chunk].tolist() for start in range(0, len(indices), per_chunk)]

    def _finish(self, held_out: list[np.ndarray], method_seconds: float, feature_seconds: float, summary: dict[str, Any]) -> None:
        """Validation scores, thresholds and fit_info, as `Detector.fit` sets them."""
        detector = self.detector
        calibration_started = self._calibration_started
        scores = np.concatenate([np.asarray(part, dtype=np.float64) for part in held_out])
        held = len(scores)
        if self.validation:
            state_ref = self.ray.put(_state(detector.method))
            chunks = [self.validation[start : start + detector.batch_size * 4] for start in range(0, len(self.validation), detector.batch_size * 4)]
            extra = self._collect([_plain_scores.remote(self.spec_ref, state_ref, chunk) for chunk in chunks], "scoring validation images")
            scores = np.concatenate([scores, *extra])
        detector.fit_info = FitInfo(len(self.inputs), feature_seconds, method_seconds, method=summary)
        detector._set_thresholds(scores, held_out=held, validation=len(self.validation))
        detector.fit_info.calibration_seconds = time.perf_counter() - calibration_started

    def _summary(self, infos: Sequence[ShardInfo], **extra: Any) -> dict[str, Any]:
        return {
            **extra,
            "distributed": {
                "shards": len(self.shards), "shard_images": [info.images for info in infos],
                "shard_seconds": [round(info.seconds, 3) for info in infos],
                "shard_summaries": [info.summary for info in infos if info.summary],
            },
        }

    # ------------------------------------------------------------------ methods
    def sequential_patchcore(self, fan_in: int, max_epochs: int) -> None:
        method: SequentialPatchCore = self.detector.method
        pairs = [_stream_shard.remote(self.spec_ref, self.inputs_ref, shard) for shard in self.shards]
        infos = self._collect([info for _, info in pairs], "streaming shards")
        banks = [bank for bank, _ in pairs]
        seed = self.detector.seed
        level = 0
        while len(banks) > 1:
            groups = [banks[start : start + max(2, fan_in)] for start in range(0, len(banks), max(2, fan_in))]
            banks = [_meld.remote(method.coreset_size, seed + level, max_epochs, *group) if len(group) > 1 else group[0]
                     for group in groups]
            level += 1
        merged = self._collect(banks, "melding shard coresets")[0]
        method.bank.set_bank(torch.from_numpy(np.array(merged.vectors)), torch.from_numpy(np.array(merged.origin)))
        method_seconds = time.perf_counter() - self.started
        self._calibration_started = time.perf_counter()
        state_ref = self.ray.put(_state(method))
        refs = [_held_out_scores.remote(self.spec_ref, state_ref, self.inputs_ref, chunk) for chunk in self._chunks(self._chosen())]
        held_out = self._collect(refs, "calibrating threshold")
        summary = self._summary(infos, coreset_size=int(merged.vectors.shape[0]), meld_levels=level)
        self._finish(held_out, method_seconds, sum(info.encode_seconds for info in infos), summary)

    def patchcore(self, oversample: float) -> None:
        method: PatchCore = self.detector.method
        features, infos = self._encode()
        size = coreset_size(sum(info.patches for info in infos), method.coreset_ratio)
        shard_ratio = min(1.0, method.coreset_ratio * oversample)
        banks = [_greedy_shard.remote(self.spec_ref, shard_ratio, shard) for shard in features]
        merged = self._collect([_greedy_meld.remote(self.spec_ref, size, *banks)], "melding shard coresets")[0]
        method.bank.set_bank(torch.from_numpy(np.array(merged.vectors)), torch.from_numpy(np.array(merged.origin)))
        method_seconds = time.perf_counter() - self.started
        self._calibration_started = time.perf_counter()
        state_ref = self.ray.put(_state(method))
        chosen = self._chosen()
        refs = [_held_out_scores_of_features.remote(self.spec_ref, state_ref, chosen, shard) for shard in features]
        held_out = self._collect(refs, "calibrating threshold")
        summary = self._summary(infos, coreset_size=int(merged.vectors.shape[0]), shard_coreset_ratio=shard_ratio)
        self._finish(held_out, method_seconds, sum(info.encode_seconds for info in infos), summary)

    def padim(self) -> None:
        method: Padim = self.detector.method
        features, infos = self._encode()
        channels = infos[0].channels
        folds = min(self.detector.calibration_folds, len(self.inputs))
        chosen = self._chosen()
        held_folds = sorted({int(index) % folds for index in chosen})
        # the models: the final one (every fold) and, per held-out fold f, one without fold f
        models: list[tuple[int | None, list[int]]] = [(None, list(range(folds)))]
        models += [(fold, [part for part in range(folds) if part != fold]) for fold in held_folds]
        if method.reduction_needs_data:
            parts = self._collect([_padim_reduction_moments.remote(self.spec_ref, folds, shard) for shard in features],
                                  "channel statistics")
            projections = []
            for _, model_folds in models:
                merged = GaussianMoments.merge_all(shard[part] for shard in parts for part in model_folds)
                method.fit_projection(channels, merged)
                projections.append(method.projection.numpy().copy())
            requests = [(position, model_folds) for position, (_, model_folds) in enumerate(models)]
        else:
            method.fit_projection(channels, None)
            projections = [method.projection.numpy().copy()]
            requests = [(0, model_folds) for _, model_folds in models]
        refs = [_padim_moments.remote(self.spec_ref, projections, requests, folds, shard) for shard in features]
        merged_models: list[GaussianMoments | None] = [None] * len(models)
        self._report("gaussian statistics", 0, len(refs))
        for done, (_, shard_moments) in enumerate(wait_all(self.ray, refs), start=1):  # merged as they arrive
            merged_models = [part if total is None else total.merge(part) for total, part in zip(merged_models, shard_moments)]
            self._report("gaussian statistics", done, len(refs))
        fold_states: dict[int, State] = {}
        for (fold, _), (projection, _), moments in zip(models, requests, merged_models):
            target = method if fold is None else method.unfitted_copy()
            target.projection = torch.from_numpy(projections[projection])
            target.fit_moments(moments)
            if fold is not None:
                fold_states[fold] = _state(target)
        method_seconds = time.perf_counter() - self.started
        self._calibration_started = time.perf_counter()
        refs = [_padim_fold_scores.remote(self.spec_ref, fold_states, folds, chosen, shard) for shard in features]
        held_out = self._collect(refs, "calibrating threshold")
        summary = self._summary(infos, folds=folds, models=len(models))
        self._finish(held_out, method_seconds, sum(info.encode_seconds for info in infos), summary)

    def on_one_worker(self, images: Any, validation: Any) -> None:
        """Methods that cannot be sharded (trained networks...): one task fits the whole model."""
        ref = _fit_on_worker.remote(self.spec_ref, images, validation)
        fitted = load_model(self._collect([ref], f"fitting {self.detector.method_name} on one worker")[0],
                            device=self.detector.device)
        detector = self.detector
        detector.method = fitted.method
        detector.threshold, detector.review_threshold = fitted.threshold, fitted.review_threshold
        detector.normal_scores, detector.fit_info = fitted.normal_scores, fitted.fit_info
        detector.fit_info.method = {**detector.fit_info.method, "distributed": {"shards": 1, "on_one_worker": True}}
