"""Backbones: bundled weights classify right, strict loading, feature shapes, circular padding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data as skimage_data

from defectlens.backbones import (
    FeatureExtractor,
    available_backbones,
    build_backbone,
    get_backbone_spec,
)
from defectlens.backbones import resnet
from defectlens.backbones.features import resize_bilinear_circular_x
from defectlens.errors import ConfigError

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup
BUNDLED = ("efficientnet_lite0", "efficientnet_lite2", "mobilenet_v2")


def _center_crop_resized(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size) float32 in [0, 1], square center crop."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    height, width = tensor.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = tensor[..., top : top + side, left : left + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine OpenMP threads otherwise fight."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return FeatureExtractor("efficientnet_lite0")


# ------------------------------------------------------------------------- registry
def test_registry_names_and_default_layers() -> None:
    assert set(available_backbones()) == {
        "efficientnet_lite0", "efficientnet_lite2", "mobilenet_v2", "resnet18", "wide_resnet50_2"
    }
    expected = {
        "efficientnet_lite0": (("_blocks.4", 8, 40), ("_blocks.10", 16, 112)),
        "efficientnet_lite2": (("_blocks.6", 8, 48), ("_blocks.14", 16, 120)),
        "mobilenet_v2": (("features.6", 8, 32), ("features.13", 16, 96)),
        "resnet18": (("layer2", 8, 128), ("layer3", 16, 256)),
        "wide_resnet50_2": (("layer2", 8, 512), ("layer3", 16, 1024)),
    }
    for name, layers in expected.items():
        spec = get_backbone_spec(name)
        assert tuple((l.name, l.stride, l.channels) for l in spec.default_layers) == layers


def test_unknown_backbone_and_layer_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        FeatureExtractor("vgg16")
    with pytest.raises(ConfigError, match="_blocks.4"):
        FeatureExtractor("efficientnet_lite0", layers=["layer2"])
    with pytest.raises(ConfigError):
        FeatureExtractor("efficientnet_lite0", layers=[])


@pytest.mark.parametrize("name", [*BUNDLED, "resnet18"])
def test_layer_table_matches_real_shapes(name: str) -> None:
    """Every registered layer's stride and channels agree with a forward pass."""
    spec = get_backbone_spec(name)
    model = spec.builder().eval()
    images = torch.rand(1, 3, 70, 100)
    with torch.inference_mode():
        maps = model.forward_features(images, spec.layer_names)
    for layer in spec.layers:
        assert maps[layer.name].shape == (
            1, layer.channels, -(-70 // layer.stride), -(-100 // layer.stride)
        ), layer


# ------------------------------------------------------------------ bundled weights
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_weights_classify_imagenet_images(name: str) -> None:
    extractor = FeatureExtractor(name)
    size = 260 if name == "efficientnet_lite2" else 224  # native resolutions
    images = torch.cat([
        _center_crop_resized(skimage_data.chelsea(), size),
        _center_crop_resized(skimage_data.coffee(), size),
    ])
    predicted = extractor.classify(images).argmax(dim=1).tolist()
    assert predicted[0] in CAT_CLASSES, predicted
    assert predicted[1] in COFFEE_CLASSES, predicted


def test_input_normalization() -> None:
    assert FeatureExtractor("mobilenet_v2").input_normalization == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    assert get_backbone_spec("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert get_backbone_spec("efficientnet_lite0").std == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------- feature shapes
def test_feature_shapes_non_square(lite0: FeatureExtractor) -> None:
    features = lite0(torch.rand(1, 3, 100, 140))
    assert features.shape == (1, 152, 13, 18)
    assert features.dtype == torch.float32
    assert lite0.feature_dim == 40 + 112
    assert lite0.stride == 8
    assert not features.requires_grad


def _reference_features(
    name: str, images: torch.Tensor, weights: Path | None = None, aggregation: int = 3
) -> torch.Tensor:
    """The feature pipeline written out plainly on the unmodified backbone."""
    spec = get_backbone_spec(name)
    model = build_backbone(name, weights)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    names = [layer.name for layer in spec.default_layers]
    with torch.inference_mode():
        maps = model.forward_features((images - mean) / std, names)
    grid = (-(-images.shape[-2] // 8), -(-images.shape[-1] // 8))
    return torch.cat([
        F.interpolate(F.avg_pool2d(maps[layer], aggregation, 1, aggregation // 2), size=grid, mode="bilinear",
                      align_corners=False)
        for layer in names
    ], dim=1)


@pytest.mark.parametrize("name", BUNDLED)
def test_features_match_the_plain_pipeline(name: str) -> None:
    """BatchNorm folding, channels-last and chunking change nothing but float rounding."""
    images = torch.rand(5, 3, 72, 88)
    extractor = FeatureExtractor(name, images_per_pass=2)
    features = extractor(images)
    assert features.is_contiguous()
    torch.testing.assert_close(features, _reference_features(name, images), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("aggregation", [1, 5])
def test_other_aggregation_neighbourhoods_match_the_plain_pipeline(aggregation: int) -> None:
    images = torch.rand(2, 3, 64, 80)
    features = FeatureExtractor("efficientnet_lite0", aggregation=aggregation)(images)
    expected = _reference_features("efficientnet_lite0", images, aggregation=aggregation)
    torch.testing.assert_close(features, expected, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(features, FeatureExtractor("efficientnet_lite0")(images), atol=1e-3)


@pytest.mark.parametrize("aggregation", [0, 2, -1])
def test_even_or_empty_aggregation_is_refused(aggregation: int) -> None:
    with pytest.raises(ConfigError, match="odd"):
        FeatureExtractor("efficientnet_lite0", aggregation=aggregation)


def test_feature_shapes_chosen_layers() -> None:
    extractor = FeatureExtractor("mobilenet_v2", layers=["features.3", "features.6"])
    assert extractor.feature_dim == 24 + 32
    assert extractor.stride == 4
    assert extractor(torch.rand(2, 3, 33, 47)).shape == (2, 56, 9, 12)


def test_deterministic_and_batch_independent(lite0: FeatureExtractor) -> None:
    images = torch.rand(3, 3, 64, 96)
    batched = lite0(images)
    single = lite0(images[1:2])
    torch.testing.assert_close(batched[1:2], single, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------- user weights, strict loading
def _randomized_resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = resnet.resnet18()
    state = model.state_dict()
    for key, value in state.items():  # make BatchNorm statistics non-trivial too
        if key.endswith("running_mean"):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet18_user_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    state = _randomized_resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    extractor = FeatureExtractor("resnet18", weights=path)
    loaded = extractor.backbone.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    images = torch.rand(2, 3, 64, 80)
    features = extractor(images)
    assert features.shape == (2, 128 + 256, 8, 10)
    torch.testing.assert_close(features, _reference_features("resnet18", images, path),
                               rtol=1e-3, atol=1e-4)


def test_resnet_without_weights_raises() -> None:
    for name in ("resnet18", "wide_resnet50_2"):
        with pytest.raises(ConfigError, match="weights"):
            FeatureExtractor(name)


def test_wrong_weight_files_raise_config_error_naming_the_file(tmp_path: Path) -> None:
    state = _randomized_resnet18_state()
    missing_key = dict(state)
    del missing_key["layer1.0.conv1.weight"]
    extra_key = dict(state, **{"head.weight": torch.zeros(3)})
    wrong_shape = dict(state, **{"fc.bias": torch.zeros(10)})
    for label, bad_state in (("missing", missing_key), ("extra", extra_key),
                             ("shape", wrong_shape)):
        path = tmp_path / f"{label}.pth"
        torch.save(bad_state, path)
        with pytest.raises(ConfigError, match=f"{label}.pth"):
            FeatureExtractor("resnet18", weights=path)
    lite0_file = get_backbone_spec("efficientnet_lite0").default_weights()  # type: ignore[misc]
    with pytest.raises(ConfigError, match="efficientnet-lite0"):
        FeatureExtractor("resnet18", weights=lite0_file)
    with pytest.raises(ConfigError, match="nowhere.pth"):
        FeatureExtractor("resnet18", weights=tmp_path / "nowhere.pth")
    not_weights = tmp_path / "garbage.pth"
    not_weights.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="garbage.pth"):
        FeatureExtractor("resnet18", weights=not_weights)


@pytest.mark.slow
def test_wide_resnet50_2_builds_from_user_weights(tmp_path: Path) -> None:
    """~69 M parameters: random tensors of the right shapes, written as safetensors."""
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in resnet.wide_resnet50_2().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.ones(shape)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.01
    path = tmp_path / "wide_resnet50_2.safetensors"
    save_file(state, str(path))
    extractor = FeatureExtractor("wide_resnet50_2", weights=path)
    assert torch.equal(extractor.backbone.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
    assert extractor.feature_dim == 512 + 1024
    assert extractor(torch.rand(1, 3, 48, 64)).shape == (1, 1536, 6, 8)


# ---------------------------------------------------------------- circular padding
def test_resize_bilinear_circular_x_matches_tiled_interpolation() -> None:
    features = torch.rand(1, 2, 5, 7)
    for size in ((9, 14), (10, 13)):
        wrapped = resize_bilinear_circular_x(features, size)
        tiled = F.interpolate(features.repeat(1, 1, 1, 3), size=(size[0], 3 * size[1]),
                              mode="bilinear", align_corners=False)
        torch.testing.assert_close(wrapped, tiled[..., size[1] : 2 * size[1]])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_circular_padding_is_roll_equivariant_in_x(name: str) -> None:
    extractor = FeatureExtractor(name, circular_padding=True)
    stride8_channels = extractor.layers[0].channels
    images = torch.rand(1, 3, 64, 128)
    features = extractor(images)
    for columns in (1, 2, 5):
        rolled = extractor(torch.roll(images, shifts=8 * columns, dims=-1))
        expected = torch.roll(features, shifts=columns, dims=-1)
        # the stride-8 layer follows any roll by a multiple of 8 px, the stride-16 layer
        # only rolls by multiples of 16 px
        channels = slice(None) if columns % 2 == 0 else slice(0, stride8_channels)
        torch.testing.assert_close(rolled[:, channels], expected[:, channels],
                                   rtol=1e-4, atol=1e-4)
    # zero padding is not equivariant: the test above would catch a missing wrap-around
    plain = FeatureExtractor(name)
    rolled_plain = plain(torch.roll(images, shifts=16, dims=-1))
    assert not torch.allclose(rolled_plain, torch.roll(plain(images), 2, dims=-1), atol=1e-3)


def test_circular_padding_resnet_with_max_pool(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(_randomized_resnet18_state(), path)
    extractor = FeatureExtractor("resnet18", weights=path, circular_padding=True)
    images = torch.rand(1, 3, 32, 64)
    rolled = extractor(torch.roll(images, shifts=32, dims=-1))
    torch.testing.assert_close(rolled, torch.roll(extractor(images), 4, dims=-1),
                               rtol=1e-4, atol=1e-4)


def test_circular_padding_equals_zero_padding_on_a_tiled_image(lite0: FeatureExtractor) -> None:
    """Wrapping in x = processing the periodic image; y stays zero padded.

    The plain extractor sees the band tiled 9 times along x; far from the left/right borders
    its features are those of the infinite periodic band, so the middle tile must match
    (the receptive field of the stride-16 layer spans ~350 px: 4 tiles of margin suffice).
    """
    circular = FeatureExtractor("efficientnet_lite0", circular_padding=True)
    assert circular.backbone.state_dict().keys() == lite0.backbone.state_dict().keys()
    band = torch.rand(1, 3, 48, 64)
    features = circular(band)
    tiled_features = lite0(band.repeat(1, 1, 1, 9))
    middle = features.shape[-1] * 4
    torch.testing.assert_close(
        features, tiled_features[..., middle : middle + features.shape[-1]], rtol=1e-4, atol=1e-4
    )


def test_build_backbone_is_frozen() -> None:
    model = build_backbone("mobilenet_v2")
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
