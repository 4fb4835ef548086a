"""The seeded stream of training samples that every method consumes (`FitData`).

A *model input* is a prepared image or one of its tiles; a `Batch` is ``batch_size`` of them,
encoded for the method: features (n, C, h, w) of the frozen extractor for methods whose
``input`` is "features", the (n, 3, H, W) model-input tensor for "images" methods.

    data.epoch(e)      batches of the fitting images, in a seeded random order per epoch;
                       epoch 0 sees the images as given, later epochs a fresh augmentation
                       seeded by (seed, epoch, image) when the detector has one
    data.joined()      all of epoch 0 in input order, as one Batch (computed once, cached)
    data.images(ids)   the chosen fitting images, unaugmented (from the joined cache if any)
    data.held_out()    the held-out split, unaugmented ("split" calibration)

Prepared (decoded + ROI) images are cached in memory up to ``cache_megabytes``, so methods
that train for many epochs do not decode their images again each epoch.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from defectlens.data.transforms import AugmentationPipeline
from defectlens.tiling import TileBox

if TYPE_CHECKING:
    from defectlens.inputs import ImageInput
    from defectlens.preprocess import InputPreparation

ProgressCallback = Callable[[str, int, int], None]
Encoder = Callable[[Sequence[np.ndarray]], torch.Tensor]
"""Prepared model-input arrays (H, W, 3) -> the tensor the method consumes."""


class ModelInput(NamedTuple):
    """One model input: pixels (h, w, 3), its image's index, its box in the prepared image
    (None: the whole image) and the prepared image's (height, width)."""

    pixels: np.ndarray
    image_index: int
    box: TileBox | None
    shape: tuple[int, int]


class Batch(NamedTuple):
    """Encoded model inputs: x (n, ...) and per sample its image index (n,) int64, its tile
    box (None for whole images) and its prepared image's (height, width)."""

    x: torch.Tensor
    image_index: torch.Tensor
    boxes: list[TileBox | None]
    shapes: list[tuple[int, int]]

    def select(self, rows: torch.Tensor) -> "Batch":
        chosen = rows.tolist()
        return Batch(self.x[rows], self.image_index[rows], [self.boxes[i] for i in chosen], [self.shapes[i] for i in chosen])

    @staticmethod
    def concat(parts: Sequence["Batch"]) -> "Batch":
        return Batch(
            torch.cat([part.x for part in parts]),
            torch.cat([part.image_index for part in parts]),
            [box for part in parts for box in part.boxes],
            [shape for part in parts for shape in part.shapes],
        )


def rows_where(mask: torch.Tensor) -> torch.Tensor:
    """Indices (k,) of the True entries of a bool (n,) mask."""
    return torch.nonzero(mask).flatten()


def batched(
    inputs: Iterable[ModelInput], batch_size: int, encode: Encoder,
    progress: ProgressCallback | None = None, stage: str = "features", total: int = 0,
) -> Iterator[Batch]:
    """Encode ``batch_size`` model inputs at a time (only one batch is held); progress counts images."""
    pending: list[ModelInput] = []
    images_done, last_image = 0, None
    for item in inputs:
        if item.image_index != last_image:
            images_done, last_image = images_done + 1, item.image_index
        pending.append(item)
        if len(pending) == batch_size:
            yield _encode(pending, encode)
            pending = []
            if progress:
                progress(stage, max(images_done - 1, 0), total)
    if pending:
        yield _encode(pending, encode)
    if progress:
        progress(stage, total, total)


def _encode(items: Sequence[ModelInput], encode: Encoder) -> Batch:
    return Batch(
        encode([item.pixels for item in items]),
        torch.tensor([item.image_index for item in items], dtype=torch.int64),
        [item.box for item in items],
        [item.shape for item in items],
    )


class FitData:
    """The training images of one fit, as batches for the method (see the module docstring).

    Args:
        inputs: every training input (paths or arrays); image indices refer to this list.
        preparation: ROI, resizing and tiling.
        encode: model-input arrays -> the method's input tensor.
        batch_size: model inputs per batch (default of ``epoch``).
        seed: seeds the epoch orders and the augmentation.
        augmentation: applied to epochs after the first, or None.
        fit_indices: the inputs fitted on (default all); held_out_indices: the held-out split.
        progress: progress(stage, done, total) for the passes over the images.
        cache_megabytes: most memory spent caching prepared images.
    """

    def __init__(
        self, inputs: Sequence["ImageInput"], preparation: "InputPreparation", encode: Encoder, batch_size: int,
        seed: int = 0, augmentation: AugmentationPipeline | None = None, fit_indices: Sequence[int] | None = None,
        held_out_indices: Sequence[int] = (), progress: ProgressCallback | None = None, cache_megabytes: float = 1024.0,
    ) -> None:
        self.inputs = inputs
        self.preparation = preparation
        self.encode = encode
        self.batch_size = batch_size
        self.seed = seed
        self.augmentation = augmentation
        self.fit_indices = list(range(len(inputs)) if fit_indices is None else fit_indices)
        self.held_out_indices = list(held_out_indices)
        self.progress = progress
        self.encode_seconds = 0.0
        """Time spent decoding, preparing and encoding (e.g. the backbone), in seconds."""
        self._cache: dict[int, np.ndarray] = {}
        self._cache_bytes_left = cache_megabytes * 2**20
        self._joined: Batch | None = None

    def encoded_by(self, encode: Encoder) -> "FitData":
        """The same images, orders and prepared-image cache, encoded by ``encode`` instead (the
        members of an ensemble, each with its own backbone)."""
        view = copy.copy(self)
        view.encode, view.encode_seconds, view._joined = encode, 0.0, None
        return view

    @property
    def num_images(self) -> int:
        """Images fitted on (the held-out split not counted)."""
        return len(self.fit_indices)

    def prepared(self, index: int) -> np.ndarray:
        """Input ``index`` decoded and ROI-processed (cached while the budget lasts)."""
        pixels = self._cache.get(index)
        if pixels is None:
            pixels = self.preparation.prepare(self.inputs[index], index)[0]
            if pixels.nbytes <= self._cache_bytes_left:
                self._cache[index] = pixels
                self._cache_bytes_left -= pixels.nbytes
        return pixels

    def _model_inputs(self, order: Iterable[int], epoch: int) -> Iterator[ModelInput]:
        for index in order:
            pixels = self.prepared(index)
            if epoch > 0 and self.augmentation is not None and len(self.augmentation):
                pixels = self.augmentation(pixels, np.random.default_rng([self.seed, epoch, index]))
            yield from self.preparation.split(pixels, index)

    def _timed(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        while True:
            tick = time.perf_counter()
            batch = next(batches, None)
            self.encode_seconds += time.perf_counter() - tick
            if batch is None:
                return
            yield batch

    def _stream(self, order: Sequence[int], epoch: int, stage: str | None, batch_size: int | None) -> Iterator[Batch]:
        progress = self.progress if stage else None
        stream = batched(self._model_inputs(order, epoch), batch_size or self.batch_size, self.encode, progress, stage or "", len(order))
        return self._timed(stream)

    def epoch(self, epoch: int, batch_size: int | None = None, stage: str | None = "epoch") -> Iterator[Batch]:
        """Epoch ``epoch``'s batches in a seeded random order (augmented after epoch 0).

        ``stage``: the progress stage name ("epoch" -> "epoch 1", "epoch 2", ...; None: silent).
        """
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.fit_indices))
        order = [self.fit_indices[k] for k in permutation.tolist()]
        label = f"{stage} {epoch + 1}" if stage == "epoch" else stage
        return self._stream(order, epoch, label, batch_size)

    def joined(self) -> Batch:
        """Every model input of the fitting images, epoch 0, in input order (held in memory)."""
        if self._joined is None:
            self._joined = Batch.concat(list(self._stream(self.fit_indices, 0, "features", None)))
        return self._joined

    def images(self, indices: torch.Tensor, stage: str | None = "calibrating threshold") -> Iterator[Batch]:
        """The chosen fitting images (input indices (k,), sorted), unaugmented."""
        if self._joined is not None:
            yield self._joined.select(rows_where(torch.isin(self._joined.image_index, indices)))
            return
        yield from self._stream(indices.tolist(), 0, stage, None)

    def held_out(self, stage: str | None = None) -> Iterator[Batch]:
        """The held-out images, unaugmented, in input order."""
        return self._stream(self.held_out_indices, 0, stage, None)
