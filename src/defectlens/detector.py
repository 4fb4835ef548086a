"""Detector: the one object a user holds - fit on normal images, predict, save, load.

>>> det = Detector(method="patchcore", backbone="efficientnet_lite0", image_size=256)
>>> det.fit("data/transistor/train/good")
>>> pred = det.predict("part_0042.png")      # Prediction(score, anomaly_map, mask, is_anomalous)
>>> det.save("transistor.dlens"); det = Detector.load("transistor.dlens")
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from defectlens import __version__, postprocess
from defectlens.artifact import load_model, save_model
from defectlens.backbones import FeatureExtractor, get_backbone_spec
from defectlens.data.datasets import training_images
from defectlens.data.images import as_float_rgb, read_image
from defectlens.data.roi import Preprocess
from defectlens.data.transforms import AugmentationPipeline
from defectlens.errors import ConfigError, ImageReadError, ModelFileError, NotFittedError
from defectlens.methods import AnomalyMethod, build_method
from defectlens.thresholds import threshold_from_normal_scores
from defectlens.tiling import MapStitcher, TileBox, iter_tiles

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, np.ndarray]
ProgressCallback = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances (the CLI shows a progress bar)."""


@dataclass
class Prediction:
    """The verdict for one image.

    Attributes:
        score: image anomaly score (higher = more anomalous).
        anomaly_map: float32 (H, W) at the resolution of the image given (after ROI steps).
        mask: bool (H, W), anomaly_map > threshold.
        is_anomalous: score > threshold.
        threshold: the decision threshold used.
        source: the file path, or None for an array input.
    """

    score: float
    anomaly_map: np.ndarray
    mask: np.ndarray
    is_anomalous: bool
    threshold: float
    source: str | None = None


@dataclass
class FitInfo:
    """What fitting did: image count, timings (seconds), the calibration scores' summary and
    the method's own summary (streaming methods: epochs run, changes per epoch)."""

    num_images: int = 0
    feature_seconds: float = 0.0
    method_seconds: float = 0.0
    calibration_seconds: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)


class _Samples(NamedTuple):
    """A batch of model inputs' features: whole images, or tiles of images.

    features (n, C, h, w); image_index (n,) int64: the training image each sample came from;
    boxes: per sample its TileBox in the (prepared) image, None for whole images; shapes: per
    sample the (height, width) of its prepared image.
    """

    features: torch.Tensor
    image_index: torch.Tensor
    boxes: list[TileBox | None]
    shapes: list[tuple[int, int]]

    def select(self, rows: torch.Tensor) -> "_Samples":
        chosen = rows.tolist()
        return _Samples(
            self.features[rows], self.image_index[rows], [self.boxes[i] for i in chosen], [self.shapes[i] for i in chosen]
        )

    @staticmethod
    def concat(parts: Sequence["_Samples"]) -> "_Samples":
        return _Samples(
            torch.cat([part.features for part in parts]),
            torch.cat([part.image_index for part in parts]),
            [box for part in parts for box in part.boxes],
            [shape for part in parts for shape in part.shapes],
        )


def _as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) < 16:
        raise ConfigError(f"image_size must be an int or (height, width) of at least 16 px, got {image_size!r}")
    return size  # type: ignore[return-value]


def expand_inputs(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A folder (or MVTec category root: its train/good) -> its images; a path or array -> [it]."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        return list(training_images(path)) if path.is_dir() else [path]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    return list(images)


def load_input(image: ImageInput, index: int = 0) -> tuple[np.ndarray, str | None]:
    """Decode one input to float32 RGB (H, W, 3); returns it with its path (None for arrays)."""
    if isinstance(image, (str, Path)):
        return read_image(image), str(image)
    return as_float_rgb(np.asarray(image), f"<array {index}>"), None


class Detector:
    """Anomaly detector: a backbone, a method, post-processing and a threshold.

    Args:
        method: "patchcore", "sequential_patchcore" or "padim" (`defectlens.methods.METHODS`).
        backbone: feature backbone name (see `defectlens.backbones.available_backbones()`).
        image_size: side (or (height, width)) images are resized to before the backbone.
        layers: backbone layer names (default: the stride-8 and stride-16 stage ends).
        weights: local state-dict file for backbones without bundled weights (resnet18, ...).
        device: "cpu" (default) or "cuda".
        batch_size: images per backbone pass.
        blur_sigma: Gaussian blur of anomaly maps in model-input pixels (0 = none).
        target_fpr: fraction of normal images allowed above the threshold (default 0.01).
        calibration_images: at most this many training images are scored held-out to set the
            threshold (PatchCore: leave-one-image-out; other methods: k-fold).
        calibration_folds: folds of the k-fold calibration.
        preprocess: ROI steps (`defectlens.data.roi.Preprocess` or its dict) applied first.
        circular_padding: treat images as periodic in x (polar roll-out bands): backbone
            convolutions, map upsampling and blur wrap around the x border.
        seed: seeds every random step.
        pool_size: average pooling of patch scores (kernel, in feature cells) before upsampling;
            1 = none (the Sequential PatchCore study uses 2 with blur_sigma 2 on bright metal).
        tile_size: cut each (prepared) image into overlapping tile_size x tile_size tiles at its
            own resolution; each tile is one model input (resized to image_size - normally
            tile_size == image_size, so pixels are not rescaled), per-tile maps are stitched
            back at full resolution (blended overlaps) and the image score is the max of the
            stitched map. Works for fit and predict with every method. None: no tiling.
        tile_overlap: pixels shared by neighbouring tiles.
        augmentation: fit-time augmentation of streaming methods (sequential_patchcore):
            epoch 0 sees the images as given, each later epoch a fresh augmentation seeded by
            (seed, epoch, image). A preset name ("light", "autovi", "sequential") or a list of
            step dicts (`defectlens.data.transforms`); stored in the model file.
        **method_options: the method's hyper-parameters (e.g. coreset_ratio, covariance).
    """

    def __init__(
        self,
        method: str = "patchcore",
        backbone: str = "efficientnet_lite0",
        image_size: int | Sequence[int] = 256,
        layers: Sequence[str] | None = None,
        weights: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 16,
        blur_sigma: float = 4.0,
        target_fpr: float = 0.01,
        calibration_images: int = 40,
        calibration_folds: int = 5,
        preprocess: Preprocess | dict[str, Any] | None = None,
        circular_padding: bool = False,
        seed: int = 0,
        pool_size: int = 1,
        tile_size: int | None = None,
        tile_overlap: int = 32,
        augmentation: str | Sequence[dict[str, Any]] | None = None,
        **method_options: Any,
    ) -> None:
        get_backbone_spec(backbone)  # fails early with the list of names
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but no CUDA device is available")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if int(pool_size) < 1:
            raise ConfigError(f"pool_size must be >= 1, got {pool_size}")
        if tile_size is not None:
            if int(tile_size) < 16:
                raise ConfigError(f"tile_size must be at least 16 px, got {tile_size}")
            if not 0 <= int(tile_overlap) < int(tile_size):
                raise ConfigError(f"tile_overlap must be in [0, tile_size {tile_size}), got {tile_overlap}")
            if circular_padding:
                raise ConfigError("tiling and circular_padding cannot be combined (tiles break the x period)")
        self.method_name = method
        self.backbone = backbone
        self.image_size = _as_size(image_size)
        self.layers = list(layers) if layers else None
        self.weights = str(weights) if weights else None
        self.device = device
        self.batch_size = batch_size
        self.blur_sigma = float(blur_sigma)
        self.target_fpr = float(target_fpr)
        self.calibration_images = int(calibration_images)
        self.calibration_folds = int(calibration_folds)
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
        self.circular_padding = bool(circular_padding)
        self.seed = seed
        self.pool_size = int(pool_size)
        self.tile_size = int(tile_size) if tile_size is not None else None
        self.tile_overlap = int(tile_overlap)
        self._augment = AugmentationPipeline.from_config(augmentation) if augmentation else None
        self.augmentation = self._augment.to_config() if self._augment else None
        method_options.setdefault("seed", seed)
        self.method: AnomalyMethod = build_method(method, **method_options)
        if self._augment and not self.streaming:
            logger.warning("augmentation is used by streaming methods only; %s fits one pass over the images", method)
        if self.tile_size and getattr(self.method, "reweight", False):
            logger.warning("with tiling the image score is the max of the stitched map: reweighting is not applied")
        self.threshold: float | None = None
        self.fit_info = FitInfo()
        self._extractor: FeatureExtractor | None = None

    @property
    def streaming(self) -> bool:
        """True when the method fits from a stream of batches (bounded memory, epochs)."""
        return hasattr(self.method, "fit_stream")

    # ------------------------------------------------------------------ features
    @property
    def extractor(self) -> FeatureExtractor:
        """The feature extractor, built on first use (weights load once)."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(
                self.backbone, self.layers, self.weights, self.device, circular_padding=self.circular_padding
            )
        return self._extractor

    def _to_model_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Float32 RGB arrays (H, W, 3) -> (N, 3, *image_size) tensor, resized with antialiasing."""
        batch = []
        for image in images:
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
            if tuple(tensor.shape[-2:]) != self.image_size:
                tensor = F.interpolate(tensor, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
            batch.append(tensor)
        return torch.cat(batch).to(self.device)

    def _prepare(self, image: ImageInput, index: int = 0) -> tuple[np.ndarray, str | None]:
        pixels, source = load_input(image, index)
        if len(self.preprocess):
            pixels = self.preprocess.apply(pixels)
        return pixels, source

    def features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Patch features (N, C, h, w) of prepared images."""
        return self.extractor(self._to_model_input(images))

    def _split(self, pixels: np.ndarray, index: int) -> Iterator[tuple[np.ndarray, int, TileBox | None, tuple[int, int]]]:
        """One prepared image -> its model inputs: itself, or its tiles (reflect-padded to full size)."""
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        if self.tile_size is None:
            yield pixels, index, None, shape
            return
        pad = "reflect" if min(shape) > 1 else "edge"
        for tile, box in iter_tiles(pixels, self.tile_size, self.tile_overlap, pad_mode=pad):
            yield tile, index, box, shape

    def _iter_samples(
        self, inputs: Sequence[ImageInput], order: Iterable[int], epoch: int = 0
    ) -> Iterator[tuple[np.ndarray, int, TileBox | None, tuple[int, int]]]:
        """Model inputs of the training images in `order`; epoch > 0 applies the augmentation,
        seeded by (seed, epoch, image index)."""
        for index in order:
            pixels = self._prepare(inputs[index], index)[0]
            if epoch > 0 and self._augment is not None:
                pixels = self._augment(pixels, np.random.default_rng([self.seed, epoch, index]))
            yield from self._split(pixels, index)

    def _batches(
        self,
        samples: Iterable[tuple[np.ndarray, int, TileBox | None, tuple[int, int]]],
        progress: ProgressCallback | None = None,
        stage: str = "features",
        total: int = 0,
    ) -> Iterator[_Samples]:
        """Features of `batch_size` model inputs at a time (only one batch is held)."""
        batch: list[tuple[np.ndarray, int, TileBox | None, tuple[int, int]]] = []
        images_done = 0
        last_image = None
        for sample in samples:
            if sample[1] != last_image:
                images_done, last_image = images_done + 1, sample[1]
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._featurize(batch)
                batch = []
                if progress:
                    progress(stage, max(images_done - 1, 0), total)
        if batch:
            yield self._featurize(batch)
        if progress:
            progress(stage, total, total)

    def _featurize(self, batch: Sequence[tuple[np.ndarray, int, TileBox | None, tuple[int, int]]]) -> _Samples:
        pixels, index, boxes, shapes = zip(*batch)
        return _Samples(self.features(list(pixels)), torch.tensor(index, dtype=torch.int64), list(boxes), list(shapes))

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        images: ImageInput | Iterable[ImageInput],
        progress: ProgressCallback | None = None,
        init: "Detector | str | Path | None" = None,
    ) -> "Detector":
        """Learn normality from defect-free images and set the threshold; returns self.

        Args:
            images: a folder (an MVTec category root means its train/good), paths or arrays.
            progress: optional callback progress(stage, done, total).
            init: a fitted detector or model file whose memory bank this fit starts from
                (fine-tuning, e.g. synthetic -> real); streaming methods only, same backbone,
                layers and image size.
        """
        inputs = expand_inputs(images)
        if not inputs:
            raise ConfigError("fit needs at least one training image")
        if init is not None:
            self._warm_start(init)
        if self.streaming:
            return self._fit_streaming(inputs, progress)
        started = time.perf_counter()
        samples = _Samples.concat(list(self._batches(self._iter_samples(inputs, range(len(inputs))), progress, "features", len(inputs))))
        self.fit_info = FitInfo(num_images=len(inputs), feature_seconds=time.perf_counter() - started)
        started = time.perf_counter()
        if progress:
            progress(f"fitting {self.method_name}", 0, 1)
        self._fit_method(self.method, samples)
        if progress:
            progress(f"fitting {self.method_name}", 1, 1)
        self.fit_info.method_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if len(inputs) < 2:
            logger.warning("one training image: the threshold is its own score (no held-out images)")
            normal_scores = self._scores_of([(samples, self.method.patch_scores(samples.features))])
        else:
            normal_scores = self._held_out(samples, len(inputs), progress)
        self._set_threshold(normal_scores)
        self.fit_info.calibration_seconds = time.perf_counter() - started
        return self

    def _fit_method(self, method: AnomalyMethod, samples: _Samples) -> None:
        """method.fit on in-memory samples; tiles tell PatchCore which image they came from."""
        if self.tile_size is not None and "image_index" in inspect.signature(method.fit).parameters:
            method.fit(samples.features, image_index=samples.image_index)  # type: ignore[call-arg]
        else:
            method.fit(samples.features)

    def _fit_streaming(self, inputs: Sequence[ImageInput], progress: ProgressCallback | None) -> "Detector":
        """Streaming methods: one batch of features at a time, epochs in a seeded shuffled order
        (augmented after the first); calibration recomputes the features of the
        `calibration_images` chosen images only, and scores them leave-one-image-out."""
        started = time.perf_counter()
        feature_seconds = 0.0
        count = len(inputs)

        def batches_for_epoch(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            nonlocal feature_seconds
            order = np.random.default_rng([self.seed, epoch]).permutation(count).tolist()
            batches = self._batches(self._iter_samples(inputs, order, epoch), progress, f"epoch {epoch + 1}", count)
            while True:
                tick = time.perf_counter()
                samples = next(batches, None)
                feature_seconds += time.perf_counter() - tick
                if samples is None:
                    return
                yield samples.features, samples.image_index

        self.method.fit_stream(batches_for_epoch, progress)  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - started
        self.fit_info = FitInfo(
            num_images=count,
            feature_seconds=feature_seconds,
            method_seconds=elapsed - feature_seconds,
            method=self._method_summary(),
        )
        started = time.perf_counter()
        chosen = self._calibration_indices(count).tolist()
        batches = self._batches(self._iter_samples(inputs, chosen), progress, "calibrating threshold", len(chosen))
        if count < 2:
            logger.warning("one training image: the threshold is its own score (no held-out images)")
            scored = ((samples, self.method.patch_scores(samples.features)) for samples in batches)
        else:
            scored = ((samples, self._leave_one_out(samples)) for samples in batches)
        self._set_threshold(self._scores_of(scored))
        self.fit_info.calibration_seconds = time.perf_counter() - started
        return self

    def _leave_one_out(self, samples: _Samples) -> torch.Tensor:
        """Patch scores of training samples without their own image's bank patches."""
        leave_one_out = getattr(self.method, "leave_one_out_patch_scores", None)
        if leave_one_out is None:
            logger.warning("%s cannot leave an image out: calibration scores are biased low", self.method_name)
            return self.method.patch_scores(samples.features)
        return leave_one_out(samples.features, samples.image_index)

    def _method_summary(self) -> dict[str, Any]:
        summary = getattr(self.method, "fit_summary", None)
        return summary() if summary else {}

    def _warm_start(self, init: "Detector | str | Path") -> None:
        if not hasattr(self.method, "warm_start"):
            raise ConfigError(
                f"starting from a model (init) needs a streaming method such as sequential_patchcore, not {self.method_name!r}"
            )
        source = init if isinstance(init, Detector) else Detector.load(init)
        bank = getattr(source.method, "memory_bank", None)
        if bank is None or bank.numel() == 0:
            raise ConfigError(f"the initial model ({source.method_name}) has no memory bank to start from")
        _check_same_features(self, source, "the initial model")
        self.method.warm_start(bank)  # type: ignore[attr-defined]

    def calibrate(self, images: ImageInput | Iterable[ImageInput], progress: ProgressCallback | None = None) -> "Detector":
        """Set the threshold from normal images that were NOT used for fitting (e.g. after
        `meld_detectors`, which sees no image): their plain scores are held-out scores."""
        inputs = expand_inputs(images)
        if not inputs:
            raise ConfigError("calibrate needs at least one normal image")
        started = time.perf_counter()
        batches = self._batches(self._iter_samples(inputs, range(len(inputs))), progress, "calibrating threshold", len(inputs))
        self._set_threshold(self._scores_of((samples, self.method.patch_scores(samples.features)) for samples in batches))
        self.fit_info.calibration["source"] = f"{len(inputs)} held-out normal images (calibrate)"
        self.fit_info.calibration_seconds = time.perf_counter() - started
        return self

    def _calibration_indices(self, num_images: int) -> torch.Tensor:
        count = min(num_images, self.calibration_images)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(num_images, generator=generator)[:count].sort().values

    def held_out_scores(self, features: torch.Tensor, progress: ProgressCallback | None = None) -> np.ndarray:
        """Image scores of training images as if unseen (leave-one-out or k-fold).

        ``features`` (N, C, h, w) of N whole training images (not tiles).
        """
        if self.tile_size is not None:
            raise ConfigError("held_out_scores takes whole-image features; a tiled detector calibrates in fit()")
        count = features.shape[0]
        samples = _Samples(features, torch.arange(count), [None] * count, [self.image_size] * count)
        return self._held_out(samples, count, progress)

    def _held_out(self, samples: _Samples, num_images: int, progress: ProgressCallback | None) -> np.ndarray:
        chosen = self._calibration_indices(num_images)
        if self.tile_size is None:  # sample i is image i
            patch_scores = self.method.held_out_patch_scores(samples.features, chosen)
            if patch_scores is not None:
                return self._scores_of([(samples.select(chosen), patch_scores)])
        elif hasattr(self.method, "leave_one_out_patch_scores"):
            held = samples.select(torch.nonzero(torch.isin(samples.image_index, chosen)).squeeze(1))
            return self._scores_of([(held, self._leave_one_out(held))])
        folds = min(self.calibration_folds, num_images)
        fold_of_sample = samples.image_index % folds
        is_chosen = torch.isin(samples.image_index, chosen)
        scores = []
        for fold in range(folds):
            held_rows = torch.nonzero((fold_of_sample == fold) & is_chosen).squeeze(1)
            if held_rows.numel() == 0:
                continue
            fold_method = self.method.unfitted_copy()
            self._fit_method(fold_method, samples.select(torch.nonzero(fold_of_sample != fold).squeeze(1)))
            held = samples.select(held_rows)
            scores.append(self._scores_of([(held, fold_method.patch_scores(held.features))], fold_method))
            if progress:
                progress("calibrating threshold", fold + 1, folds)
        return np.concatenate(scores)

    def _set_threshold(self, normal_scores: np.ndarray) -> None:
        self.threshold = threshold_from_normal_scores(normal_scores, self.target_fpr)
        self.fit_info.calibration = {
            "num_scores": int(normal_scores.size),
            "mean": float(normal_scores.mean()),
            "std": float(normal_scores.std()),
            "min": float(normal_scores.min()),
            "max": float(normal_scores.max()),
        }

    # ------------------------------------------------------------------ scoring
    def _image_scores(
        self, features: torch.Tensor, patch_scores: torch.Tensor, method: AnomalyMethod | None = None
    ) -> torch.Tensor:
        pooled = postprocess.pool_patch_scores(patch_scores, self.pool_size)
        maps = postprocess.anomaly_maps(pooled, self.image_size, self.blur_sigma, self.circular_padding)
        return (method or self.method).image_scores(features, pooled, maps)

    def _scores_of(
        self, scored: Iterable[tuple[_Samples, torch.Tensor]], method: AnomalyMethod | None = None
    ) -> np.ndarray:
        """Image scores from (samples, patch scores) batches: per image, or the max of each
        image's stitched map with tiling."""
        if self.tile_size is None:
            parts = [self._image_scores(samples.features, patch_scores, method).numpy() for samples, patch_scores in scored]
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return np.asarray([float(anomaly_map.max()) for _, anomaly_map in self._stitched_maps(scored)], dtype=np.float32)

    def _tile_maps(self, patch_scores: torch.Tensor) -> np.ndarray:
        """Blurred maps (n, T, T) of tiles from their patch scores (n, h, w)."""
        pooled = postprocess.pool_patch_scores(patch_scores, self.pool_size)
        maps = postprocess.anomaly_maps(pooled, self.image_size, self.blur_sigma)
        tile = (self.tile_size, self.tile_size)
        return postprocess.upsample(maps, tile).cpu().numpy()  # type: ignore[arg-type]

    def _stitched_maps(self, scored: Iterable[tuple[_Samples, torch.Tensor]]) -> Iterator[tuple[int, np.ndarray]]:
        """(image index, full-resolution map) per image from batches of tiles and their patch
        scores; an image's tiles come consecutively (they may span batches). Holds one map."""
        current, stitcher = None, None
        for samples, patch_scores in scored:
            tile_maps = self._tile_maps(patch_scores)
            for k, image in enumerate(samples.image_index.tolist()):
                if image != current:
                    if stitcher is not None:
                        yield current, stitcher.result()
                    height, width = samples.shapes[k]
                    current, stitcher = image, MapStitcher(height, width, self.tile_size, self.tile_overlap)
                stitcher.add(tile_maps[k], samples.boxes[k])
        if stitcher is not None:
            yield current, stitcher.result()

    def score_arrays(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (N,) and anomaly maps (each (H, W) at its image's size) of prepared images."""
        if self.tile_size is not None:
            samples = (sample for index, pixels in enumerate(images) for sample in self._split(pixels, index))
            scored = ((batch, self.method.patch_scores(batch.features)) for batch in self._batches(samples))
            maps = [anomaly_map for _, anomaly_map in self._stitched_maps(scored)]
            return np.asarray([anomaly_map.max() for anomaly_map in maps], dtype=np.float64), maps
        features = self.features(images)
        patch_scores = postprocess.pool_patch_scores(self.method.patch_scores(features), self.pool_size)
        maps = postprocess.anomaly_maps(patch_scores, self.image_size, self.blur_sigma, self.circular_padding)
        scores = self.method.image_scores(features, patch_scores, maps)
        full_size = [
            postprocess.to_image_size(anomaly_map, image.shape[:2], self.circular_padding)
            for anomaly_map, image in zip(maps, images)
        ]
        return scores.numpy().astype(np.float64), full_size

    def _require_fitted(self) -> float:
        if self.threshold is None:
            raise NotFittedError("this detector is not fitted: call fit() or Detector.load() first")
        return self.threshold

    def _prediction(self, score: float, anomaly_map: np.ndarray, threshold: float, source: str | None) -> Prediction:
        return Prediction(
            score=float(score),
            anomaly_map=anomaly_map,
            mask=anomaly_map > threshold,
            is_anomalous=bool(score > threshold),
            threshold=threshold,
            source=source,
        )

    def predict(self, image: ImageInput, threshold: float | None = None) -> Prediction:
        """Verdict, score, map and mask for one image (path or array)."""
        return self.predict_batch([image], threshold)[0]

    def predict_batch(self, images: Sequence[ImageInput], threshold: float | None = None) -> list[Prediction]:
        """Predictions for several images at once (one backbone pass per `batch_size`).

        Raises ImageReadError on the first unreadable input; use `iter_predictions` to go on.
        """
        decision = self._require_fitted() if threshold is None else float(threshold)
        predictions: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            prepared = [self._prepare(image, start + i) for i, image in enumerate(images[start : start + self.batch_size])]
            scores, maps = self.score_arrays([pixels for pixels, _ in prepared])
            predictions.extend(
                self._prediction(score, anomaly_map, decision, source)
                for score, anomaly_map, (_, source) in zip(scores, maps, prepared)
            )
        return predictions

    def iter_predictions(
        self, images: Sequence[ImageInput], threshold: float | None = None
    ) -> Iterator[tuple[ImageInput, np.ndarray | None, Prediction | ImageReadError]]:
        """Predict many inputs, going on past bad ones.

        Yields (input, prepared image or None, Prediction or the ImageReadError) in input
        order; readable images are scored `batch_size` at a time.
        """
        decision = self._require_fitted() if threshold is None else float(threshold)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            prepared: list[tuple[np.ndarray, str | None] | ImageReadError] = []
            for offset, image in enumerate(chunk):
                try:
                    prepared.append(self._prepare(image, start + offset))
                except ImageReadError as error:
                    prepared.append(error)
            readable = [item for item in prepared if not isinstance(item, ImageReadError)]
            scores, maps = self.score_arrays([pixels for pixels, _ in readable]) if readable else ([], [])
            results = iter(zip(scores, maps))
            for image, item in zip(chunk, prepared):
                if isinstance(item, ImageReadError):
                    yield image, None, item
                    continue
                score, anomaly_map = next(results)
                yield image, item[0], self._prediction(score, anomaly_map, decision, item[1])

    # ------------------------------------------------------------------ files
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this detector, JSON-safe."""
        spec = get_backbone_spec(self.backbone)
        return {
            "method": self.method_name,
            "method_options": self.method.config(),
            "backbone": self.backbone,
            "layers": [layer.name for layer in self.extractor.layers] if self._extractor else self.layers,
            "weights": self.weights,
            "weights_sha256": _file_sha256(self.weights) if self.weights else None,
            "preprocessing": {
                "image_size": list(self.image_size),
                "resize": "bilinear-antialias",
                "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
                "roi": self.preprocess.to_dict(),
                "circular_padding": self.circular_padding,
                "tile_size": self.tile_size,
                "tile_overlap": self.tile_overlap,
            },
            "postprocessing": {"blur_sigma": self.blur_sigma, "pool_size": self.pool_size},
            "augmentation": self.augmentation,
            "batch_size": self.batch_size,
            "target_fpr": self.target_fpr,
            "calibration_images": self.calibration_images,
            "calibration_folds": self.calibration_folds,
            "seed": self.seed,
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file (safetensors tensors + JSON metadata)."""
        threshold = self._require_fitted()
        metadata = {
            **self.config(),
            "threshold": threshold,
            "fit": {
                "num_images": self.fit_info.num_images,
                "feature_seconds": self.fit_info.feature_seconds,
                "method_seconds": self.fit_info.method_seconds,
                "calibration_seconds": self.fit_info.calibration_seconds,
                "calibration_scores": self.fit_info.calibration,
                "method": self.fit_info.method,
            },
        }
        tensors = {f"method.{name}": tensor for name, tensor in self.method.state().items()}
        return save_model(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Detector":
        """Read a model file written by `save`; ModelFileError if it is damaged or foreign."""
        tensors, metadata = load_model(path)
        try:
            weights = metadata.get("weights")
            if weights and metadata.get("weights_sha256") and Path(weights).is_file():
                if _file_sha256(weights) != metadata["weights_sha256"]:
                    raise ModelFileError(f"{path}: backbone weights {weights} changed since the model was fitted")
            detector = cls(
                method=metadata["method"],
                backbone=metadata["backbone"],
                image_size=metadata["preprocessing"]["image_size"],
                layers=metadata.get("layers"),
                weights=weights,
                device=device,
                batch_size=metadata.get("batch_size", 16),
                blur_sigma=metadata["postprocessing"]["blur_sigma"],
                target_fpr=metadata.get("target_fpr", 0.01),
                calibration_images=metadata.get("calibration_images", 40),
                calibration_folds=metadata.get("calibration_folds", 5),
                preprocess=metadata["preprocessing"].get("roi"),
                circular_padding=metadata["preprocessing"].get("circular_padding", False),
                pool_size=metadata["postprocessing"].get("pool_size", 1),
                tile_size=metadata["preprocessing"].get("tile_size"),
                tile_overlap=metadata["preprocessing"].get("tile_overlap", 32),
                augmentation=metadata.get("augmentation"),
                **metadata["method_options"],
            )
            detector.method.load_state(
                {name.removeprefix("method."): tensor for name, tensor in tensors.items() if name.startswith("method.")}
            )
            detector.threshold = float(metadata["threshold"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{path}: model metadata is incomplete or invalid ({error!r})") from None
        fit = metadata.get("fit", {})
        detector.fit_info = FitInfo(
            num_images=fit.get("num_images", 0),
            feature_seconds=fit.get("feature_seconds", 0.0),
            method_seconds=fit.get("method_seconds", 0.0),
            calibration_seconds=fit.get("calibration_seconds", 0.0),
            calibration=fit.get("calibration_scores", {}),
            method=fit.get("method", {}),
        )
        detector.metadata = metadata
        return detector


def _feature_signature(detector: Detector) -> dict[str, Any]:
    """What makes two detectors' patch features comparable."""
    if detector._extractor is not None:
        layers = [layer.name for layer in detector.extractor.layers]
    else:
        layers = list(detector.layers or [layer.name for layer in get_backbone_spec(detector.backbone).default_layers])
    weights = detector.weights
    if weights and Path(weights).is_file():
        weights = _file_sha256(weights)
    return {"backbone": detector.backbone, "layers": layers, "image_size": list(detector.image_size), "weights": weights}


def _check_same_features(detector: Detector, other: Detector, what: str) -> None:
    mine, theirs = _feature_signature(detector), _feature_signature(other)
    different = [f"{key} {theirs[key]!r} (not {mine[key]!r})" for key in mine if mine[key] != theirs[key]]
    if different:
        raise ConfigError(f"{what} has other features: {', '.join(different)}")


def meld_detectors(
    models: Sequence[Detector | str | Path], size: int, seed: int = 0, max_epochs: int = 10
) -> Detector:
    """Merge fitted PatchCore-family detectors into one Sequential PatchCore of `size` vectors.

    Their memory banks are streamed through a fresh coreset by the streaming rule; no image is
    needed. All models must share backbone, layers, weights, image size and preprocessing
    (ROI, tiling); post-processing and scoring options are the first model's.

    Threshold: melding sees no image, so it cannot calibrate; the melded detector takes the
    largest of the models' thresholds (each was set on its own held-out normal images; the
    largest is the conservative choice, fewer false alarms). Call `calibrate(normal_images)`
    with held-out normal images to set it from data instead. `fit_info.calibration` says which.
    """
    from defectlens.methods.sequential_patchcore import meld_banks

    detectors = [model if isinstance(model, Detector) else Detector.load(model) for model in models]
    if not detectors:
        raise ConfigError("meld needs at least one model")
    first = detectors[0]
    names = [str(model) if not isinstance(model, Detector) else f"model {k}" for k, model in enumerate(models)]
    for detector, name in zip(detectors, names):
        detector._require_fitted()
        _check_same_features(first, detector, name)
        if detector.config()["preprocessing"] != first.config()["preprocessing"]:
            raise ConfigError(f"{name} has other preprocessing (ROI, tiling or normalization) than {names[0]}")
    started = time.perf_counter()
    method = meld_banks([detector.method for detector in detectors], size, seed, max_epochs)  # type: ignore[misc]
    melded = Detector(
        method=method.name,
        backbone=first.backbone,
        image_size=first.image_size,
        layers=_feature_signature(first)["layers"],
        weights=first.weights,
        device=first.device,
        batch_size=first.batch_size,
        blur_sigma=first.blur_sigma,
        target_fpr=first.target_fpr,
        calibration_images=first.calibration_images,
        calibration_folds=first.calibration_folds,
        preprocess=first.preprocess,
        circular_padding=first.circular_padding,
        seed=seed,
        pool_size=first.pool_size,
        tile_size=first.tile_size,
        tile_overlap=first.tile_overlap,
        augmentation=first.augmentation,
        **{name: value for name, value in method.config().items() if name != "seed"},
    )
    melded.method = method
    melded._extractor = first._extractor  # same backbone, layers, weights and padding: share it
    thresholds = [float(detector._require_fitted()) for detector in detectors]
    melded.threshold = max(thresholds)
    melded.fit_info = FitInfo(
        num_images=sum(detector.fit_info.num_images for detector in detectors),
        method_seconds=time.perf_counter() - started,
        calibration={"source": "meld: the largest of the melded models' thresholds (no images)", "thresholds": thresholds},
        method={**method.fit_summary(), "melded_from": names},
    )
    return melded


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
