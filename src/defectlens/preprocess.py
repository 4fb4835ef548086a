"""From a decoded image to model inputs and back: ROI steps, resizing, and the tiling wrap.

prepare   decoded image -> ROI steps (`data.roi.Preprocess`) -> the prepared image (H, W, 3);
          this is the image every map and mask refers to.
split     prepared image -> its model inputs: the image itself, or its overlapping tiles at
          full resolution (reflect-padded to tile size); each with its box and image shape.
to_tensor model inputs -> (N, 3, *image_size) float32, resized with antialiasing.
untile    per model input, a map at model-input size (and the method's image score) ->
          per image: the map at the prepared image's size and the image score. Whole images:
          the map is resized (wrapping in x for roll-out bands) and the score is the
          method's or the max of the model-size map; tiles: the maps are resized to tile
          size and stitched (blended overlaps), and the score is the max of the stitched map.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from defectlens.data.roi import Preprocess
from defectlens.inputs import ImageInput, load_input
from defectlens.postprocess import to_image_size, upsample
from defectlens.samples import Batch, ModelInput
from defectlens.tiling import MapStitcher, iter_tiles


class ScoredImage(NamedTuple):
    """One image's result: its index in the call's inputs, its score and (optionally) its map
    (H, W) float32 at the prepared image's size."""

    image_index: int
    score: float
    anomaly_map: np.ndarray | None


class InputPreparation:
    """ROI + resize + tiling, as one object shared by fit, predict and calibration.

    Args:
        roi: ROI steps applied to every decoded image.
        image_size: (height, width) of the model input.
        tile_size: side of the tiles cut at full resolution, or None (whole images).
        tile_overlap: pixels shared by neighbouring tiles.
        circular_padding: images are periodic in x (roll-out bands): map resizing wraps.
        device: where model-input tensors are put.
    """

    def __init__(
        self, roi: Preprocess, image_size: tuple[int, int], tile_size: int | None, tile_overlap: int,
        circular_padding: bool, device: str,
    ) -> None:
        self.roi = roi
        self.image_size = image_size
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.circular_padding = circular_padding
        self.device = device

    @property
    def tiled(self) -> bool:
        return self.tile_size is not None

    def prepare(self, image: ImageInput, index: int = 0) -> tuple[np.ndarray, str | None]:
        """Decoded and ROI-processed image (H, W, 3) and its path (None for arrays)."""
        pixels, source = load_input(image, index)
        return (self.roi.apply(pixels) if len(self.roi) else pixels), source

    def split(self, pixels: np.ndarray, index: int) -> Iterator[ModelInput]:
        """One prepared image -> its model inputs (itself, or its tiles)."""
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        if self.tile_size is None:
            yield ModelInput(pixels, index, None, shape)
            return
        pad = "reflect" if min(shape) > 1 else "edge"
        for tile, box in iter_tiles(pixels, self.tile_size, self.tile_overlap, pad_mode=pad):
            yield ModelInput(tile, index, box, shape)

    def to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Float32 RGB arrays (H, W, 3) -> (N, 3, *image_size), resized with antialiasing."""
        batch = []
        for image in images:
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
            if tuple(tensor.shape[-2:]) != self.image_size:
                tensor = F.interpolate(tensor, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
            batch.append(tensor)
        return torch.cat(batch).to(self.device)

    def untile(
        self, scored: Iterable[tuple[Batch, torch.Tensor, torch.Tensor | None]], with_maps: bool = True
    ) -> Iterator[ScoredImage]:
        """(batch, maps (n, *image_size), method image scores (n,) or None) -> per image its
        score and map; an image's tiles come consecutively (they may span batches)."""
        if self.tile_size is None:
            for batch, maps, scores in scored:
                best = scores if scores is not None else maps.flatten(1).amax(dim=1)
                for k, image in enumerate(batch.image_index.tolist()):
                    full = to_image_size(maps[k], batch.shapes[k], self.circular_padding) if with_maps else None
                    yield ScoredImage(image, float(best[k]), full)
            return
        yield from self._stitch(scored, with_maps)

    def _stitch(
        self, scored: Iterable[tuple[Batch, torch.Tensor, torch.Tensor | None]], with_maps: bool
    ) -> Iterator[ScoredImage]:
        assert self.tile_size is not None
        current, stitcher = None, None
        for batch, maps, _ in scored:
            tile_maps = upsample(maps, (self.tile_size, self.tile_size)).cpu().numpy()
            for k, image in enumerate(batch.image_index.tolist()):
                if image != current:
                    if stitcher is not None:
                        yield _stitched(current, stitcher, with_maps)
                    height, width = batch.shapes[k]
                    current, stitcher = image, MapStitcher(height, width, self.tile_size, self.tile_overlap)
                stitcher.add(tile_maps[k], batch.boxes[k])  # type: ignore[arg-type]
        if stitcher is not None:
            yield _stitched(current, stitcher, with_maps)


def _stitched(image: int | None, stitcher: MapStitcher, with_maps: bool) -> ScoredImage:
    anomaly_map = stitcher.result()
    return ScoredImage(int(image or 0), float(anomaly_map.max()), anomaly_map if with_maps else None)
