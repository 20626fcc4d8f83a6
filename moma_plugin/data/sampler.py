"""A sampler that keeps every data-parallel rank's text:image ratio within a hard bound, every step.

MoMa's expert groups are sized for a token ratio (4t4i: 1:1, 7t1i: 7:1). A rank whose micro-batch holds
more image tokens than its image experts were sized for becomes the straggler every layer waits on. The
MoMa paper balances only in expectation; this sampler bounds every micro-batch of every rank:

    |share_m(micro-batch) - target_m| <= tolerance   for every modality m

How: samples arrive in a seeded per-epoch permutation into a pool of ``window`` candidates. Each rank's
micro-batch is filled greedily with the candidate that brings the micro-batch's shares closest to the
target (older candidates win ties, so nothing waits forever), then improved by swaps with the pool
until it is within the bound. Samples the bound cannot place now stay in the pool for later steps;
at the end of an epoch they are carried into the next one ahead of its samples. Cost per step:
O(data_parallel_size * micro_batch_size * window * modalities).

When the data cannot meet the bound: if no sample mix could (a modality with a target share has too
few tokens anywhere), the constructor raises. If a micro-batch still misses the bound after repair
(the pool lacks the right samples just then), ``strict=True`` (default) raises with the shares found;
``strict=False`` uses the best micro-batch found and counts it in ``stats()["violations"]``.

Deterministic given the seed; every rank builds the same sampler and so agrees on all batches without
communication. ``state_dict()`` is plain JSON; a resumed sampler yields exactly the batches an
uninterrupted one would have.
"""

from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..config import parse_expert_groups


def target_shares_from_experts(experts: str, modalities: Sequence[str] = ("text", "image")
                               ) -> Optional[List[float]]:
    """Token share per modality implied by an expert layout: 4t4i -> [0.5, 0.5], 7t1i -> [0.875,
    0.125]; None for layouts without per-modality groups (8x, dense)."""
    groups = parse_expert_groups(experts, tuple(modalities))
    if len(groups) != len(modalities) or any(len(g.modalities) != 1 for g in groups):
        return None
    total = sum(g.num_experts for g in groups)
    return [g.num_experts / total for g in groups]


def unmet_bound(counts: np.ndarray, target: Sequence[float], tolerance: float,
                modalities: Sequence[str]) -> Optional[str]:
    """Why the data as a whole cannot keep the bound for long (a modality's share of all tokens lies
    further from its target than the tolerance: the pool then runs out of the samples the bound
    needs, and micro-batches miss it), or None."""
    shares = np.asarray(counts, dtype=np.float64).sum(0)
    shares = shares / max(shares.sum(), 1)
    far = [(name, share, goal) for name, share, goal in zip(modalities, shares, target)
           if abs(share - goal) > tolerance]
    if not far:
        return None
    return ", ".join(f"{name} is {share:.1%} of the data's tokens, the experts' share {goal:.1%}"
                     for name, share, goal in far)


class BalancedSampler:
    """Global-step batches for every data-parallel rank with bounded modality shares.

    Args:
        counts: [samples, modalities] tokens of each modality in each sample.
        micro_batch_size, data_parallel_size: samples per rank per step, number of ranks.
        target_shares: share per modality (sums to 1), e.g. ``target_shares_from_experts("4t4i")``;
            None samples a plain seeded permutation without balancing.
        tolerance: largest allowed |share - target| per modality in a micro-batch.
        window: candidates in the pool (default: 8 global batches, at least 256).
        modalities: names of the modalities, for messages (default: their indices).
    """

    def __init__(self, counts: np.ndarray, micro_batch_size: int, data_parallel_size: int = 1,
                 target_shares: Optional[Sequence[float]] = None, tolerance: float = 0.05,
                 seed: int = 1234, window: Optional[int] = None, strict: bool = True,
                 modalities: Optional[Sequence[str]] = None):
        self.counts = np.asarray(counts, dtype=np.float64)
        if self.counts.ndim != 2 or len(self.counts) == 0:
            raise ValueError("counts must be a non-empty [samples, modalities] array.")
        self.micro_batch_size, self.data_parallel_size = micro_batch_size, data_parallel_size
        self.tolerance, self.seed, self.strict = tolerance, seed, strict
        self.modalities = list(modalities) if modalities else [str(m) for m in range(self.counts.shape[1])]
        self.window = window or max(8 * micro_batch_size * data_parallel_size, 256)
        self.window = min(self.window, len(self.counts))
        if self.window < micro_batch_size * data_parallel_size:
            raise ValueError(f"{len(self.counts)} samples are fewer than one global batch "
                             f"({micro_batch_size} x {data_parallel_size} ranks).")
        self.target = None if target_shares is None else np.asarray(target_shares, dtype=np.float64)
        if self.target is not None:
            self._check_feasible()
        self.epoch, self.position, self.pool, self.step = 0, 0, [], 0
        self._reset_stats()

    def _check_feasible(self):
        if self.target.shape != (self.counts.shape[1],) or abs(self.target.sum() - 1) > 1e-6:
            raise ValueError(f"target_shares {self.target.tolist()} must give one share per "
                             f"modality ({self.counts.shape[1]}) and sum to 1.")
        shares = self.counts / np.maximum(self.counts.sum(1, keepdims=True), 1)
        for m, target in enumerate(self.target):
            if shares[:, m].max() < target - self.tolerance or shares[:, m].min() > target + self.tolerance:
                raise ValueError(
                    f"the data cannot meet the ratio bound for modality {self.modalities[m]}: its share per sample "
                    f"ranges over [{shares[:, m].min():.3f}, {shares[:, m].max():.3f}], the target is "
                    f"{target:.3f} +- {self.tolerance}. Mix in data with more of that modality, "
                    "widen the tolerance, or choose an expert layout matching the data."
                )

    def _reset_stats(self):
        num_modalities = self.counts.shape[1]
        self._share_min = np.full(num_modalities, np.inf)
        self._share_max = np.full(num_modalities, -np.inf)
        self._share_sum = np.zeros(num_modalities)
        self._micro_batches = 0
        self.violations = 0
        self.last_shares: List[List[float]] = []

    # -- the pool ---------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))

    def _refill(self):
        while len(self.pool) < self.window:
            permutation = self._permutation(self.epoch)
            take = permutation[self.position : self.position + self.window - len(self.pool)]
            self.pool.extend(int(i) for i in take)
            self.position += len(take)
            if self.position >= len(permutation):
                self.epoch, self.position = self.epoch + 1, 0

    # -- choosing a micro-batch -------------------------------------------------------------------
    def _deviation(self, totals: np.ndarray) -> np.ndarray:
        """Max |share - target| over modalities, for rows of summed counts."""
        return np.abs(totals / np.maximum(totals.sum(-1, keepdims=True), 1) - self.target).max(-1)

    def _choose(self) -> List[int]:
        if self.target is None:
            chosen = list(range(self.micro_batch_size))
        else:
            chosen = self._greedy()
        picked = [self.pool[i] for i in chosen]
        for i in sorted(chosen, reverse=True):
            del self.pool[i]
        return picked

    def _greedy(self, starts: int = 16) -> List[int]:
        """Best of a greedy fill + swap repair from each of the ``starts`` oldest first picks."""
        best_chosen, best_deviation = None, np.inf
        for first in range(min(starts, len(self.pool))):
            chosen, deviation = self._fill_and_repair(first)
            if deviation < best_deviation - 1e-12:
                best_chosen, best_deviation = chosen, deviation
            if deviation <= self.tolerance:
                break
        return best_chosen

    def _fill_and_repair(self, first: int):
        candidates = self.counts[self.pool]  # [W, M]
        age_penalty = np.arange(len(self.pool)) * 1e-9  # older candidates win ties
        chosen = [first]
        totals = candidates[first].copy()
        available = np.ones(len(self.pool), dtype=bool)
        available[first] = False
        for _ in range(self.micro_batch_size - 1):
            cost = self._deviation(totals + candidates) + age_penalty
            cost[~available] = np.inf
            best = int(cost.argmin())
            chosen.append(best)
            available[best] = False
            totals = totals + candidates[best]
        deviation = self._deviation(totals)
        while deviation > self.tolerance:  # repair: the best single swap with the pool
            swaps = totals[None, None, :] - candidates[chosen][:, None, :] + candidates[None, :, :]
            cost = self._deviation(swaps)
            cost[:, ~available] = np.inf
            slot, candidate = np.unravel_index(int(cost.argmin()), cost.shape)
            if cost[slot, candidate] >= deviation:
                break
            available[chosen[slot]], available[candidate] = True, False
            totals = swaps[slot, candidate]
            chosen[slot] = int(candidate)
            deviation = cost[slot, candidate]
        return chosen, float(deviation)

    def _record(self, batch: List[int], rank: int):
        totals = self.counts[batch].sum(0)
        shares = totals / max(totals.sum(), 1)
        self._share_min = np.minimum(self._share_min, shares)
        self._share_max = np.maximum(self._share_max, shares)
        self._share_sum += shares
        self._micro_batches += 1
        self.last_shares.append(shares.tolist())
        if self.target is not None and np.abs(shares - self.target).max() > self.tolerance + 1e-12:
            if self.strict:
                raise RuntimeError(
                    f"step {self.step}, rank {rank}: no micro-batch within the ratio bound could be "
                    f"formed from the pool (shares {np.round(shares, 3).tolist()}, target "
                    f"{self.target.tolist()} +- {self.tolerance}); use a larger window, a wider "
                    "tolerance, or strict=False to continue and count such steps."
                )
            self.violations += 1

    def next_step(self) -> List[List[int]]:
        """Sample indices of the next global step: one list of micro_batch_size per rank."""
        self.last_shares = []
        batches = []
        for rank in range(self.data_parallel_size):
            self._refill()
            batch = self._choose()
            self._record(batch, rank)
            batches.append(batch)
        self.step += 1
        return batches

    def __iter__(self) -> Iterator[List[List[int]]]:
        while True:
            yield self.next_step()

    # -- reporting and resuming -------------------------------------------------------------------
    def stats(self) -> Dict[str, object]:
        """Shares per modality since the start: min, max, mean, worst deviation from the target."""
        count = max(self._micro_batches, 1)
        result = {
            "steps": self.step,
            "share_min": self._share_min.tolist(),
            "share_max": self._share_max.tolist(),
            "share_mean": (self._share_sum / count).tolist(),
            "violations": self.violations,
            "last_step_shares": self.last_shares,
        }
        if self.target is not None:
            result["worst_deviation"] = float(max(np.abs(self._share_min - self.target).max(),
                                                  np.abs(self._share_max - self.target).max()))
        return result

    def state_dict(self) -> Dict[str, object]:
        return {
            "epoch": self.epoch, "position": self.position, "pool": list(self.pool),
            "step": self.step, "seed": self.seed, "violations": self.violations,
            "share_min": self._share_min.tolist(), "share_max": self._share_max.tolist(),
            "share_sum": self._share_sum.tolist(), "micro_batches": self._micro_batches,
        }

    def load_state_dict(self, state: Dict[str, object]):
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this one has "
                             f"{self.seed}; resume with the same --seed.")
        self.epoch, self.position, self.step = state["epoch"], state["position"], state["step"]
        self.pool = [int(i) for i in state["pool"]]
        self.violations = state["violations"]
        self._share_min = np.asarray(state["share_min"], dtype=np.float64)
        self._share_max = np.asarray(state["share_max"], dtype=np.float64)
        self._share_sum = np.asarray(state["share_sum"], dtype=np.float64)
        self._micro_batches = state["micro_batches"]


class RankBatchSampler:
    """One rank's micro-batches of a BalancedSampler, for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, sampler: BalancedSampler, rank: int, num_steps: int):
        if not 0 <= rank < sampler.data_parallel_size:
            raise ValueError(f"rank {rank} outside [0, {sampler.data_parallel_size})")
        self.sampler, self.rank, self.num_steps = sampler, rank, num_steps

    def __len__(self) -> int:
        return max(self.num_steps - self.sampler.step, 0)

    def __iter__(self) -> Iterator[List[int]]:
        while self.sampler.step < self.num_steps:
            yield self.sampler.next_step()[self.rank]
