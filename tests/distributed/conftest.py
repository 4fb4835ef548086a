"""A real Ray cluster for the distributed tests: a head and one more worker node started with
`ray start` on this machine (1 CPU and a small object store each), connected once per session
and stopped afterwards - its own processes only (`LocalCluster.stop`), never `ray stop`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from defectlens.detector import Detector
from defectlens.distributed.cluster import LocalCluster

if importlib.util.find_spec("ray") is None:  # the optional extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]
else:
    import ray

IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> LocalCluster:
    local = LocalCluster(nodes=2, cpus_per_node=1, object_store_megabytes=80, temp_dir=tmp_path_factory.mktemp("ray"))
    local.start()
    ray.init(address=local.address, logging_level="WARNING")
    try:
        yield local
    finally:
        ray.shutdown()
        local.stop()
        assert not local.node_processes()


@pytest.fixture(scope="session")
def address(cluster) -> str:
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2  # the multi-node path
    return cluster.address


@pytest.fixture
def one_thread():
    """Torch on one thread here, as on the 1-CPU workers: float32 convolutions sum in another
    order on another thread count (features then differ by ~1e-5), so single-process references
    are computed like the workers compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def train_images(transistor_root) -> list[Path]:
    return sorted((transistor_root / "train" / "good").glob("*.png"))[:11]


@pytest.fixture(scope="session")
def test_images(transistor_root) -> list[Path]:
    root = transistor_root / "test"
    return [path for kind in ("good", "bent_lead", "misplaced") for path in sorted((root / kind).glob("*.png"))[:3]]


@pytest.fixture(scope="session")
def model_file(train_images, tmp_path_factory) -> Path:
    """A small PatchCore fitted in this process (the batch tests' model); its file (~300 kB) is
    large enough for Ray to pass it through the object store, not inline."""
    detector = Detector(method="patchcore", image_size=IMAGE_SIZE, batch_size=4, coreset_ratio=1.0, seed=1)
    return detector.fit(train_images[:8]).save(tmp_path_factory.mktemp("model") / "patchcore.dlens")
