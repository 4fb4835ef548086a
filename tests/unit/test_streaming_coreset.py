"""StreamingCoreset (Sequential PatchCore): exact vs. a one-patch-at-a-time reference, convergence,
coverage, meld, state round trip."""

from __future__ import annotations

import math

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# The compiled replacement loop against a saved copy of the torch implementation it replaced.


class SlowReplacementLoop(StreamingCoreset):
    """The replacement loop as it was before the compiled kernel (a saved copy): one patch at a
    time in torch ops, the (M, M) matrix updated by a row and a strided column write."""

    def _update_chunk(self, chunk, chunk_origin=None):
        chunk_sq = (chunk * chunk).sum(1)
        to_bank = squared_distances(chunk, self.features, chunk_sq, self._sq)
        d_p, d_p_idx = to_bank.min(1)
        within = None
        replaced = 0
        pos = 0
        n = chunk.shape[0]
        while pos < n:
            d_m = self._nn_val[self._closest]
            hits = torch.nonzero(d_p[pos:] > d_m)
            if hits.numel() == 0:
                break
            i = pos + int(hits[0, 0])
            if within is None:
                within = squared_distances(chunk, chunk, chunk_sq, chunk_sq)
            slot = self._slow_victim()
            row = to_bank[i].clone()
            row[slot] = math.inf
            self._slow_replace(slot, chunk[i], chunk_sq[i], row)
            if chunk_origin is not None:
                self.origin[slot] = chunk_origin[i]
            replaced += 1
            pos = i + 1
            if pos < n:
                self._slow_refresh(to_bank, d_p, d_p_idx, within[pos:, i], slot, pos)
        return replaced

    def _slow_victim(self):
        a = self._closest
        b = int(self._nn_idx[a])
        row_a, row_b = self._dist[a], self._dist[b]
        pair = row_a[b].clone()
        row_a[b] = math.inf
        second_a = row_a.min()
        row_a[b] = pair
        row_b[a] = math.inf
        second_b = row_b.min()
        row_b[a] = pair
        return b if bool(second_b < second_a) else a

    def _slow_replace(self, slot, vector, vector_sq, row):
        self.features[slot] = vector
        self._sq[slot] = vector_sq
        self._dist[slot] = row
        self._dist[:, slot] = row
        nn_val, nn_idx = self._nn_val, self._nn_idx
        rows = torch.nonzero((row <= nn_val) | (nn_idx == slot)).squeeze(1)
        if rows.numel():
            nn_val[rows], nn_idx[rows] = self._dist[rows].min(1)
        nn_val[slot], nn_idx[slot] = row.min(0)
        self._closest = int(nn_val.argmin())

    @staticmethod
    def _slow_refresh(to_bank, d_p, d_p_idx, new_column, slot, pos):
        to_bank[pos:, slot] = new_column
        val, idx = d_p[pos:], d_p_idx[pos:]
        lost = idx == slot
        better = new_column < val
        lost &= ~better
        val.copy_(torch.where(better, new_column, val))
        idx.masked_fill_(better, slot)
        rows = torch.nonzero(lost).squeeze(1)
        if rows.numel():
            val[rows], idx[rows] = to_bank[rows + pos].min(1)


def assert_identical_runs(data, origin, size, batches, epochs, dtype=torch.float32, chunk_size=None):
    """Fast and saved-copy coresets streamed the same way end in the same state, epoch by epoch."""
    fast = StreamingCoreset(size, data.shape[1], dtype=dtype, chunk_size=chunk_size, track_origin=True)
    slow = SlowReplacementLoop(size, data.shape[1], dtype=dtype, chunk_size=chunk_size, track_origin=True)
    total = 0
    for _ in range(epochs):
        changes = []
        for core in (fast, slow):
            changes.append(sum(core.update(data[s : s + batches], origin[s : s + batches])
                               for s in range(0, data.shape[0], batches)))
        assert changes[0] == changes[1]
        total += changes[0]
        assert torch.equal(fast.coreset(), slow.coreset())  # same vectors in the same slots
        assert torch.equal(fast.coreset_origin(), slow.coreset_origin())
        assert torch.equal(fast._dist, slow._dist)
        assert torch.equal(fast._nn_val, slow._nn_val) and torch.equal(fast._nn_idx, slow._nn_idx)
        assert fast._closest == slow._closest and fast.num_replaced == slow.num_replaced
    return fast, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_loop_is_identical_to_the_torch_loop_on_random_data(dtype):
    g = torch.Generator().manual_seed(11)
    data = structured(3000, 24, seed=12, dtype=dtype)
    data[1500:1700] = data[torch.randint(1500, (200,), generator=g)]  # exact duplicates
    data[2000:2100] = (data[2000:2100] * 4).round() / 4  # ties
    origin = torch.arange(3000) // 100
    fast, replaced = assert_identical_runs(data, origin, 150, 512, 3, dtype, chunk_size=97)
    assert replaced > 150  # the loop really ran


def test_compiled_loop_is_identical_to_the_torch_loop_on_real_features(transistor_root):
    from PIL import Image

    from defectlens.backbones import FeatureExtractor

    paths = sorted((transistor_root / "train" / "good").glob("*.png"))[:24]
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((128, 128)), np.float32) / 255 for p in paths])
    with torch.inference_mode():
        feats = FeatureExtractor("efficientnet_lite0")(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    patches = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).contiguous()  # 24 x 256 patches
    origin = torch.arange(24).repeat_interleave(256)
    _, replaced = assert_identical_runs(patches, origin, 400, 1024, 2)
    assert replaced > 400


def test_torch_fallback_matches_the_compiled_loop(monkeypatch):
    import defectlens.ops.streaming_coreset as module

    data = structured(1500, 12, seed=13, dtype=torch.float32)
    compiled = StreamingCoreset(60, 12, chunk_size=64)
    compiled.update(data)
    monkeypatch.setattr(module, "_replace_chunk", None)  # no numba: the torch loop
    fallback = StreamingCoreset(60, 12, chunk_size=64)
    fallback.update(data)
    assert torch.equal(compiled.coreset(), fallback.coreset()) and torch.equal(compiled._dist, fallback._dist)
