"""The pruned exact nearest-neighbour index (ops.exact_search) against brute force.

Every query row must get the same bank row as brute force - or, where the two rows' distances
agree to 1e-5 relative, a tie - and a distance equal to float32 round-off: on real transistor
patch features (EfficientNet-Lite0, greedy coreset bank), with k = 3, with excluded rows
(leave-one-image-out), and on random data with duplicates and exact ties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from defectlens.ops import exact_search
from defectlens.ops.coreset import greedy_coreset
from defectlens.ops.knn import NearestNeighbours

pytestmark = pytest.mark.skipif(not exact_search.available(), reason="numba is not installed")

IMAGE_SIZE = 160  # 20 x 20 patches per image


def _truth(bank: torch.Tensor, queries: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """float64 distances (Q, M), +inf at excluded rows."""
    distances = torch.cdist(queries.double(), bank.double())
    if excluded is not None:
        distances[:, excluded] = float("inf")
    return distances


def assert_same_answer(
    got: tuple[torch.Tensor, torch.Tensor],
    expected: tuple[torch.Tensor, torch.Tensor],
    truth: torch.Tensor,
    queries: torch.Tensor,
    bank: torch.Tensor,
    tie_rtol: float = 1e-5,
) -> None:
    """``got`` (pruned) against ``expected`` (brute force) and the float64 ``truth`` (Q, M).

    * rows: the same as brute force, except ties: true squared distances within ``tie_rtol``
      relative, plus brute force's own round-off (its expanded formula |q|^2 - 2 q.b + |b|^2
      is exact to ~1e-7 x (|q|^2 + |b|^2), so it may swap rows closer than that);
    * nothing nearer was missed: the k-th returned row is no farther than the true k-th;
    * distances: the float32 round-off of the true distance of the returned row (and within
      brute force's round-off of brute force's distance); ascending.
    """
    got_d, got_i = got
    exp_d, exp_i = expected
    assert got_i.shape == exp_i.shape and got_d.shape == exp_d.shape
    assert got_d.dtype == torch.float32 and got_i.dtype == torch.int64
    rows = torch.arange(truth.shape[0])[:, None]
    true_got = truth[rows, got_i]
    true_exp = truth[rows, exp_i]
    scale = (queries.double() ** 2).sum(1, keepdim=True) + (bank.double() ** 2).sum(1)[got_i]
    round_off = 2e-6 * scale
    differ = got_i != exp_i
    tie = (true_got**2 - true_exp**2).abs() <= tie_rtol * true_exp**2 + round_off
    assert bool((~differ | tie).all()), f"{int((differ & ~tie).sum())} answers differ beyond ties"
    kth_true = truth.topk(got_i.shape[1], dim=1, largest=False).values[:, -1]
    assert bool((true_got[:, -1] <= kth_true * (1 + tie_rtol)).all()), "a nearer row was missed"
    np.testing.assert_allclose(got_d.double().numpy(), true_got.numpy(), rtol=1e-5, atol=1e-6)
    assert bool(((got_d.double() ** 2 - exp_d.double() ** 2).abs() <= 1e-5 * true_got**2 + round_off).all())
    assert bool((got_d[:, 1:] >= got_d[:, :-1]).all()), "distances must be ascending"


@pytest.fixture(scope="module")
def transistor_features(transistor_root):
    """Patch features (N, 400, 152) of 12 train/good images and 4 test images (2 defective)."""
    from defectlens.backbones import FeatureExtractor

    train = sorted((transistor_root / "train" / "good").glob("*.png"))[:12]
    test = sorted((transistor_root / "test" / "good").glob("*.png"))[:2]
    test += sorted((transistor_root / "test" / "damaged_case").glob("*.png"))[:2]

    def load(paths):
        arrays = [
            np.asarray(Image.open(p).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), np.float32) / 255
            for p in paths
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    extractor = FeatureExtractor("efficientnet_lite0")
    with torch.inference_mode():
        feats = [extractor(load(paths)) for paths in (train, test)]
    return [f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1]).contiguous() for f in feats]


@pytest.fixture(scope="module")
def real_bank(transistor_features):
    """A greedy-coreset bank (25 % of the train patches, ~1200 x 152) and each row's image."""
    train, _ = transistor_features
    patches = train.reshape(-1, train.shape[2])
    selected = np.sort(greedy_coreset(patches, patches.shape[0] // 4, 128, seed=0))
    return patches[selected].contiguous(), torch.from_numpy(selected // train.shape[1])


def test_real_features_k1_and_k3_match_brute_force(transistor_features, real_bank):
    bank, _ = real_bank
    queries = transistor_features[1].reshape(-1, bank.shape[1])  # 1600 test patches
    pruned = NearestNeighbours(bank, algorithm="pruned")
    brute = NearestNeighbours(bank, algorithm="brute_force")
    truth = _truth(bank, queries)
    for k in (1, 3):
        assert_same_answer(pruned.query(queries, k), brute.query(queries, k), truth, queries, bank)
    # it does prune: far fewer exact distances than rows
    assert pruned.index.last_counts[2] < 0.2 * bank.shape[0]


def test_real_features_leave_one_image_out(transistor_features, real_bank):
    bank, bank_image = real_bank
    train = transistor_features[0]
    pruned = NearestNeighbours(bank, algorithm="pruned")
    brute = NearestNeighbours(bank, algorithm="brute_force")
    for image in (0, 5, 11):
        excluded = bank_image == image
        assert bool(excluded.any())
        queries = train[image]  # its own patches: without the exclusion most would be at 0
        truth = _truth(bank, queries, excluded)
        for k in (1, 3):
            got = pruned.query(queries, k, excluded)
            assert not bool(excluded[got[1]].any())
            assert_same_answer(got, brute.query(queries, k, excluded), truth, queries, bank)


def test_real_features_do_not_depend_on_batching_or_threads(transistor_features, real_bank):
    bank, _ = real_bank
    queries = transistor_features[1].reshape(-1, bank.shape[1])
    index = exact_search.PrunedIndex(bank)
    whole = index.query(queries, 2)
    pieces = [index.query(queries[i : i + 37], 2, query_chunk=16) for i in range(0, queries.shape[0], 37)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = index.query(queries.flip(0), 2)
    finally:
        torch.set_num_threads(threads)
    for other in (tuple(torch.cat(parts) for parts in zip(*pieces)), tuple(t.flip(0) for t in single)):
        assert torch.equal(whole[0], other[0]) and torch.equal(whole[1], other[1])


def _clustered(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Anisotropic clustered data (a PCA has something to find), float32."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=g) * 3
    scales = torch.linspace(2.0, 0.05, dim)
    labels = torch.randint(12, (rows,), generator=g)
    return (centres[labels] + torch.randn(rows, dim, generator=g) * scales).float()


def test_random_data_with_duplicates_and_ties():
    bank = _clustered(3000, 80, seed=1)
    bank[100:150] = bank[0]  # 51 copies of one row: ties at any distance
    bank[2000:2100] = bank[1000:1100]  # duplicated block
    bank = (bank * 8).round() / 8  # a coarse grid: many exactly equal distances
    queries = torch.cat([_clustered(700, 80, seed=2), bank[:40], bank[0:1].repeat(5, 1), (bank[3:4] + bank[7:8]) / 2])
    queries = (queries * 8).round() / 8
    pruned = NearestNeighbours(bank, algorithm="pruned")
    brute = NearestNeighbours(bank, algorithm="brute_force")
    truth = _truth(bank, queries)
    for k in (1, 3, 10):
        got = pruned.query(queries, k)
        assert_same_answer(got, brute.query(queries, k), truth, queries, bank)
        # exact ties are broken by the lower bank index, deterministically
        d64 = truth[torch.arange(queries.shape[0])[:, None], got[1]]
        same = (d64[:, 1:] == d64[:, :-1])
        assert bool((got[1][:, 1:][same] > got[1][:, :-1][same]).all())
    # a query equal to a duplicated row: distance 0, the first copy
    d, i = pruned.query(bank[0:1].clone(), 3)
    assert d.tolist() == [[0.0, 0.0, 0.0]] and i.tolist() == [[0, 100, 101]]
    excluded = torch.zeros(bank.shape[0], dtype=torch.bool)
    excluded[:120] = True
    truth[:, excluded] = float("inf")
    assert_same_answer(pruned.query(queries, 3, excluded), brute.query(queries, 3, excluded), truth, queries, bank)


def test_degenerate_banks_and_queries():
    dim = 70
    one = torch.randn(1, dim)
    queries = torch.randn(5, dim)
    for algorithm in ("auto", "brute_force"):
        d, i = NearestNeighbours(one, algorithm=algorithm).query(queries, 3)  # k is capped at M
        assert i.tolist() == [[0]] * 5
        np.testing.assert_allclose(d[:, 0].numpy(), (queries - one).norm(dim=1).numpy(), rtol=1e-5)
    bank = _clustered(200, dim, seed=3)
    search = NearestNeighbours(bank, algorithm="pruned")
    d, i = search.query(torch.empty(0, dim), 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)
    # two rows, all but one excluded, k larger than what is allowed (brute-force semantics)
    two = NearestNeighbours(bank[:2], algorithm="pruned")
    excluded = torch.tensor([True, False])
    d, i = two.query(queries, 1, excluded)
    assert i.tolist() == [[1]] * 5
    expected = NearestNeighbours(bank[:2], algorithm="brute_force").query(queries, 2, excluded)
    got = two.query(queries, 2, excluded)
    assert torch.equal(got[1][:, 0], expected[1][:, 0]) and bool(torch.isinf(got[0][:, 1]).all())
    # identical rows only: every distance ties; the lowest index wins
    same = NearestNeighbours(bank[:1].repeat(300, 1), algorithm="pruned")
    d, i = same.query(queries, 2)
    assert i.tolist() == [[0, 1]] * 5
    # queries of the bank itself: distance 0 to their own row
    d, i = search.query(bank, 1)
    assert bool((d == 0).all()) and torch.equal(i[:, 0], torch.arange(200))


def test_auto_choice_and_explicit_algorithms():
    assert NearestNeighbours(torch.randn(100, 152)).algorithm == "brute_force"  # small bank
    assert NearestNeighbours(torch.randn(5000, 152)).algorithm == "pruned"
    assert NearestNeighbours(torch.randn(5000, 32)).algorithm == "brute_force"  # too few dims
    with pytest.raises(ValueError):
        NearestNeighbours(torch.randn(10, 32), algorithm="pruned")
    with pytest.raises(ValueError):
        NearestNeighbours(torch.randn(10, 32), algorithm="faiss")


def test_copies_and_pickles_keep_the_answers():
    """copy.deepcopy / pickle of a search with a built index (meld and tests deep-copy fitted
    detectors; worker processes pickle them): no lock travels, the copy answers the same."""
    import copy
    import pickle

    bank = _clustered(5000, 80, seed=4)
    queries = _clustered(300, 80, seed=5)
    search = NearestNeighbours(bank, algorithm="pruned")
    expected = search.query(queries, 2)  # builds the index
    for other in (copy.deepcopy(search), pickle.loads(pickle.dumps(search))):
        assert other.algorithm == "pruned" and other._index is not None
        got = other.query(queries, 2)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_deepcopy_of_a_fitted_patchcore_detector():
    import copy

    from defectlens.detector import Detector
    from tests.conftest import textured_images

    images = textured_images(4, seed=0)
    detector = Detector(method="patchcore", image_size=64, batch_size=4).fit(images)
    before = [p.score for p in detector.predict_batch(images[:2])]
    twin = copy.deepcopy(detector)
    assert [p.score for p in twin.predict_batch(images[:2])] == before
    assert twin.method.bank.search is not detector.method.bank.search
