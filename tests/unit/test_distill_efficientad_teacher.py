"""tools/distill_efficientad_teacher.py rebuilds the bundled teacher reproducibly: the same seed
gives the same bytes, another seed other weights, and the file loads as a teacher (tiny budget)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from defectlens.networks.pdn import load_teacher, teacher_file_metadata
from tests.conftest import REPO_ROOT

TINY = ["--steps", "2", "--batch-size", "2", "--crop", "32", "--procedural-images", "2", "--statistics-crops", "4",
        "--validation-crops", "2"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("distill_tool", REPO_ROOT / "tools" / "distill_efficientad_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_seed_same_bytes_other_seed_other_weights(tool, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        paths = [tmp_path / f"{name}.safetensors" for name in ("a", "b", "c")]
        for path, seed in zip(paths, ("0", "0", "1")):
            assert tool.main([*TINY, "--seed", seed, "--out", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the tool sets its own thread count
    printed = capsys.readouterr().out
    assert "2 steps x 2 crops of 32 px" in printed and "validation loss" in printed and "SHA-256" in printed
    assert paths[0].read_bytes() == paths[1].read_bytes()
    teacher, _ = load_teacher("small", paths[0])
    other, _ = load_teacher("small", paths[2])
    assert not torch.equal(teacher.layers[0].weight, other.layers[0].weight)
    info = teacher_file_metadata(paths[0])
    assert (info["pdn"], info["steps"], info["target_layers"], info["dtype"]) == ("small", "2", "_blocks.4,_blocks.5", "float16")


def test_the_generic_images_are_offline_and_in_range(tool):
    photos = tool.photographs()
    assert len(photos) >= 20
    procedural = tool.procedural_images(4, seed=0, side=64)
    for image in [*photos, *procedural]:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "float32"
        assert 0.0 <= image.min() and image.max() <= 1.0
    again = tool.procedural_images(4, seed=0, side=64)
    assert all((a == b).all() for a, b in zip(procedural, again))
