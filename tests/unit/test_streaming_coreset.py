"""StreamingCoreset (Sequential PatchCore): exact vs. a one-patch-at-a-time reference, convergence,
coverage, meld, state round trip."""

from __future__ import annotations

import math

import pytest
import torch

from defectlens.errors import ConfigError
from defectlens.ops.streaming_coreset import StreamingCoreset, meld, squared_distances


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ReferenceCoreset:
    """The rule written out literally: one patch at a time, every distance recomputed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: list[torch.Tensor] = []

    def add(self, p: torch.Tensor) -> int:
        if not self.rows:
            self.rows.append(p.clone())
            return 1
        bank = torch.stack(self.rows)
        d_p = ((bank - p) ** 2).sum(1).min()
        if len(self.rows) < self.size:
            if d_p == 0:  # a copy of a kept vector is not appended
                return 0
            self.rows.append(p.clone())
            return 1
        dist = ((bank[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
        dist.fill_diagonal_(math.inf)
        nearest = dist.min(1).values
        a = int(nearest.argmin())  # first row reaching the smallest pairwise distance
        b = int(dist[a].argmin())  # its first nearest neighbour
        d_m = dist[a, b]
        if not d_p > d_m:
            return 0
        others_a = dist[a].clone()
        others_a[b] = math.inf
        others_b = dist[b].clone()
        others_b[a] = math.inf
        victim = b if others_b.min() < others_a.min() else a
        self.rows[victim] = p.clone()
        return 1

    def features(self) -> torch.Tensor:
        return torch.stack(self.rows)


def structured(n: int, dim: int, seed: int, clusters: int = 6, dtype=torch.float64) -> torch.Tensor:
    """Clustered points in a low-dimensional subspace plus a little noise (like patch features)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, 3, generator=g, dtype=dtype) * 3
    basis = torch.randn(3, dim, generator=g, dtype=dtype)
    labels = torch.randint(clusters, (n,), generator=g)
    latent = centres[labels] + torch.randn(n, 3, generator=g, dtype=dtype)
    return latent @ basis + 0.05 * torch.randn(n, dim, generator=g, dtype=dtype)


def max_nearest(coreset: StreamingCoreset, data: torch.Tensor) -> float:
    return float(coreset.distances_to(data).max())


@pytest.mark.parametrize("batch", [1, 7, 64, 500])
def test_matches_one_patch_at_a_time_reference(batch):
    data = structured(500, 8, seed=1)
    ref = ReferenceCoreset(24)
    ref_changes = [sum(ref.add(p) for p in data) for _ in range(2)]
    fast = StreamingCoreset(24, 8, dtype=torch.float64, chunk_size=13)
    fast_changes = []
    for _ in range(2):
        fast_changes.append(sum(fast.update(data[s : s + batch]) for s in range(0, len(data), batch)))
    assert fast_changes == ref_changes
    assert ref_changes[0] > 24  # replacements did happen
    assert torch.equal(fast.coreset(), ref.features())


def test_matches_reference_with_duplicates_and_float32():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 5, generator=g, dtype=torch.float64)
    data = base[torch.randint(40, (300,), generator=g)]  # many exact duplicates
    ref = ReferenceCoreset(12)
    fast = StreamingCoreset(12, 5, dtype=torch.float64, chunk_size=32)
    for _ in range(3):
        assert fast.update(data) == sum(ref.add(p) for p in data)
    assert torch.equal(fast.coreset(), ref.features())
    # float32 picks the same vectors on well-separated data
    fast32 = StreamingCoreset(12, 5, chunk_size=50)
    for _ in range(3):
        fast32.update(data.float())
    assert torch.equal(fast32.coreset(), ref.features().float())


def test_internal_state_is_consistent_after_replacements():
    data = structured(800, 10, seed=2)
    core = StreamingCoreset(40, 10, dtype=torch.float64, chunk_size=100)
    core.update(data)
    bank = core.coreset()
    full = squared_distances(bank, bank)
    full.fill_diagonal_(math.inf)
    torch.testing.assert_close(core._dist, full, rtol=1e-9, atol=1e-9)
    assert torch.equal(core._dist, core._dist.T)
    nn_val, nn_idx = core.nearest_neighbours
    torch.testing.assert_close(nn_val, full.min(1).values.sqrt())
    assert torch.equal(nn_idx, full.argmin(1))
    assert core.min_pairwise_distance == pytest.approx(float(full.min().sqrt()))


def test_fills_up_to_size_then_stays():
    data = structured(300, 6, seed=4, dtype=torch.float32)
    core = StreamingCoreset(50, 6)
    assert core.update(data[:20]) == 20 and core.count == 20 and not core.is_full
    assert core.update(data[20:45]) == 25 and core.count == 45
    changes = core.update(data[45:])
    assert core.count == 50 and core.is_full
    assert changes >= 5  # 5 insertions, then replacements
    assert core.num_inserted == 50 and core.num_replaced == changes - 5
    assert core.num_seen == 300
    core.update(data)
    assert core.count == 50 and core.coreset().shape == (50, 6)


def test_converges_when_the_same_data_is_streamed_again():
    data = structured(1500, 12, seed=5, dtype=torch.float32)
    core = StreamingCoreset(60, 12)
    history = [core.update(data[s : s + 256]) for s in range(0, 1500, 256)]
    per_epoch = [sum(history)]
    for _ in range(30):
        per_epoch.append(core.update(data))
        if per_epoch[-1] == 0:
            break
    assert per_epoch[-1] == 0, per_epoch
    assert per_epoch[1] < per_epoch[0]
    # once converged: no data patch is farther from the coreset than d_m
    assert max_nearest(core, data) <= core.min_pairwise_distance + 1e-5


def test_coverage_improves_over_epochs():
    data = structured(2000, 16, seed=6, dtype=torch.float32)
    core = StreamingCoreset(80, 16)
    core.update(data)
    after_one = max_nearest(core, data)
    d_m_one = core.min_pairwise_distance
    core.update(data)
    after_two = max_nearest(core, data)
    assert after_two <= after_one
    assert core.min_pairwise_distance >= d_m_one  # d_m never decreases
    # better than keeping the first 80 patches
    first = StreamingCoreset(80, 16)
    first.update(data[:80])
    assert after_two < max_nearest(first, data)


def test_meld_two_halves():
    data = structured(1200, 10, seed=7, dtype=torch.float32)
    left, right = StreamingCoreset(60, 10), StreamingCoreset(60, 10)
    for _ in range(3):
        left.update(data[:600])
        right.update(data[600:])
    merged = meld([left, right], size=50, seed=0)
    assert merged.count == 50
    union = torch.cat([left.coreset(), right.coreset()])
    # every merged vector is one of the union's vectors
    assert bool((squared_distances(merged.coreset(), union).min(1).values == 0).all())
    assert len({tuple(v.tolist()) for v in merged.coreset()}) == 50
    # draws from both halves, same seed -> same result, tensors accepted
    again = meld([left.coreset(), right.coreset()], size=50, seed=0)
    assert torch.equal(again.coreset(), merged.coreset())
    from_left = (squared_distances(merged.coreset(), left.coreset()).min(1).values == 0).sum()
    assert 0 < int(from_left) < 50
    # merged coverage of all data comparable to a coreset trained on all of it
    assert max_nearest(merged, data) < 2.0 * max(max_nearest(left, data[:600]), max_nearest(right, data[600:]))


def test_meld_smaller_union_keeps_everything():
    a = torch.randn(5, 4)
    merged = meld([a, torch.randn(3, 4)], size=20)
    assert merged.count == 8 and not merged.is_full


def test_state_round_trip():
    data = structured(700, 9, seed=8, dtype=torch.float32)
    core = StreamingCoreset(45, 9)
    core.update(data)
    state = core.state_dict()
    assert set(state) == {"features", "count"}
    assert state["features"].shape == (45, 9) and int(state["count"]) == 45
    loaded = StreamingCoreset.from_state(state)
    assert torch.equal(loaded.coreset(), core.coreset())
    assert loaded.min_pairwise_distance == pytest.approx(core.min_pairwise_distance, rel=1e-5)
    torch.testing.assert_close(loaded._dist, core._dist, rtol=1e-4, atol=1e-4)
    more = structured(300, 9, seed=9, dtype=torch.float32)
    assert loaded.update(more) == core.update(more)
    assert torch.equal(loaded.coreset(), core.coreset())
    # partially filled
    part = StreamingCoreset(45, 9)
    part.update(data[:10])
    back = StreamingCoreset.from_state(part.state_dict())
    assert back.count == 10 and torch.equal(back.coreset(), data[:10])


def test_memory_bytes_and_errors():
    core = StreamingCoreset(100, 16)
    assert core.memory_bytes >= 100 * 100 * 4 + 100 * 16 * 4
    with pytest.raises(ConfigError):
        core.update(torch.zeros(3, 5))
    with pytest.raises(ConfigError):
        StreamingCoreset(0, 16)
    single = StreamingCoreset(1, 3)
    assert single.update(torch.randn(10, 3)) == 1 and single.count == 1
    assert single.min_pairwise_distance == math.inf


def test_copies_are_not_appended_while_filling():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    stream = torch.stack([x[0], x[0], x[1], x[0], x[2], x[1], x[3]])
    core = StreamingCoreset(3, 3, chunk_size=2)
    assert core.update(stream[:6]) == 3 and core.num_inserted == 3
    assert torch.equal(core.coreset(), x[:3])
    assert core.update(x[:3]) == 0  # copies of kept vectors never enter
    ref = ReferenceCoreset(3)
    assert core.update(stream[6:]) == sum(ref.add(p) for p in torch.cat([stream, x[:3], stream[6:]])) - 3
    assert torch.equal(core.coreset(), ref.features())
    assert StreamingCoreset(5, 3).update(stream[:6]) == 3
