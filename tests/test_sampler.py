import json

import numpy as np
import pytest

from moma_plugin.data.sampler import BalancedSampler, RankBatchSampler, target_shares_from_experts

SEQ = 128


def mixed_counts(image_share: float, n: int = 1200, seed: int = 0) -> np.ndarray:
    """Samples of very different mixes whose overall image share is ``image_share`` (a data mix
    chosen to match the expert ratio): image-poor extremes (all text for 4t4i), image-rich extremes
    (mostly image for 4t4i) and mixed samples, symmetric around the target."""
    rng = np.random.default_rng(seed)
    spread = 0.95 * min(image_share, 1 - image_share)
    kinds = rng.choice(3, size=n, p=[0.25, 0.25, 0.5])
    offset = np.where(kinds == 0, -spread, np.where(kinds == 1, spread, 0.0))
    offset = offset + np.where(kinds == 2, rng.uniform(-spread, spread, n), 0.0)
    image = ((image_share + offset) * SEQ).round().astype(int)
    return np.stack([SEQ - image, image], axis=1)


def test_target_shares_from_experts():
    assert target_shares_from_experts("4t4i") == [0.5, 0.5]
    assert target_shares_from_experts("7t1i") == [0.875, 0.125]
    assert target_shares_from_experts("8x") is None and target_shares_from_experts("dense") is None


@pytest.mark.parametrize("experts", ["4t4i", "7t1i"])
def test_ratio_bound_holds_for_every_rank_and_step(experts):
    target = np.array(target_shares_from_experts(experts))
    counts = mixed_counts(target[1])
    sampler = BalancedSampler(counts, micro_batch_size=4, data_parallel_size=4, target_shares=target,
                              tolerance=0.05, seed=7)
    for _ in range(60):
        for batch in sampler.next_step():
            assert len(batch) == 4
            shares = counts[batch].sum(0) / counts[batch].sum()
            assert np.abs(shares - target).max() <= 0.05 + 1e-9
    stats = sampler.stats()
    assert stats["violations"] == 0 and stats["worst_deviation"] <= 0.05
    assert len(stats["last_step_shares"]) == 4


def test_deterministic_and_covers_an_epoch_without_repeats():
    counts = mixed_counts(0.5)
    def run(seed, steps):
        sampler = BalancedSampler(counts, 4, 4, [0.5, 0.5], 0.05, seed=seed)
        return [sampler.next_step() for _ in range(steps)]
    assert run(1, 5) == run(1, 5) and run(1, 5) != run(2, 5)
    # 55 steps x 16 = 880 samples: all picked before the pool (256) draws from the next epoch.
    used = [i for step in run(1, 55) for batch in step for i in batch]
    assert len(used) == len(set(used))  # no sample twice within the epoch
    assert len(set(used)) / len(used) == 1.0


def test_leftovers_carry_into_the_next_epoch():
    counts = mixed_counts(0.5, n=300)
    sampler = BalancedSampler(counts, 4, 2, [0.5, 0.5], 0.05, seed=3, window=64)
    used = [i for _ in range(37) for batch in sampler.next_step() for i in batch]  # 296 samples
    assert sampler.epoch >= 1  # the permutation of epoch 0 has been read through
    before_refill = used[: 300 - 64]  # picks made before the pool drew from epoch 1
    assert len(set(before_refill)) == len(before_refill)
    assert len(set(used)) > 0.85 * 300  # most samples used by the end of the epoch


def test_resume_gives_identical_batches():
    counts = mixed_counts(0.125)
    target = [0.875, 0.125]
    uninterrupted = BalancedSampler(counts, 2, 4, target, 0.05, seed=11)
    expected = [uninterrupted.next_step() for _ in range(30)]
    first = BalancedSampler(counts, 2, 4, target, 0.05, seed=11)
    for _ in range(12):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BalancedSampler(counts, 2, 4, target, 0.05, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.next_step() for _ in range(18)] == expected[12:]
    assert resumed.stats()["share_max"] == uninterrupted.stats()["share_max"]
    with pytest.raises(ValueError, match="same --seed"):
        BalancedSampler(counts, 2, 4, target, 0.05, seed=12).load_state_dict(state)


def test_impossible_data_is_a_clear_error():
    text_only = np.stack([np.full(100, SEQ), np.zeros(100, int)], axis=1)
    with pytest.raises(ValueError, match="cannot meet the ratio bound"):
        BalancedSampler(text_only, 2, 2, [0.5, 0.5], 0.05)


def test_strict_and_lenient_when_the_pool_runs_dry():
    counts = mixed_counts(0.3, n=400)  # image-heavier data than a 7:1 target wants
    strict = BalancedSampler(counts, 2, 2, [0.875, 0.125], 0.05, seed=0)
    with pytest.raises(RuntimeError, match="ratio bound"):
        for _ in range(100):
            strict.next_step()
    lenient = BalancedSampler(counts, 2, 2, [0.875, 0.125], 0.05, seed=0, strict=False)
    for _ in range(100):
        lenient.next_step()
    assert lenient.stats()["violations"] > 0


def test_rank_batch_sampler_gives_each_rank_its_part():
    counts = mixed_counts(0.5)
    reference = BalancedSampler(counts, 2, 3, [0.5, 0.5], 0.05, seed=5)
    steps = [reference.next_step() for _ in range(4)]
    for rank in range(3):
        ranked = RankBatchSampler(BalancedSampler(counts, 2, 3, [0.5, 0.5], 0.05, seed=5), rank, 4)
        assert len(ranked) == 4
        assert list(ranked) == [step[rank] for step in steps]
