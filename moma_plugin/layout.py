"""Modality layout: which tokens belong to which modality, computed once per forward.

Every MoMa layer of a forward pass reads the same layout, so per-modality token indices are never
recomputed per layer and the only host synchronisation is the one that reads the per-modality counts
(the paper's section 3 names per-layer index computation as its main overhead).

Tokens are numbered in the order of Megatron's hidden states flattened from [s, b, h] to [T, h]:
token t = position * batch + sample.
"""

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

_forward_counter = itertools.count()


@dataclass
class ModalityLayout:
    """Per-modality token indices of one micro-batch.

    Attributes:
        modality_ids_T: [T] int64 modality id of every token.
        order_T: [T] token indices sorted by modality (stable), i.e. the tokens of modality 0, then 1...
        counts: tokens per modality, as Python ints (read from the device once, at construction).
        forward_id: a number unique to this layout and larger than every earlier layout's, so a layer
            can tell a recomputed forward (activation checkpointing) from a new one when it records
            metrics or aux losses (``is_new_forward``).
    """

    modality_ids_T: Tensor
    order_T: Tensor
    counts: Tuple[int, ...]
    forward_id: int = field(default_factory=lambda: next(_forward_counter))

    @property
    def num_tokens(self) -> int:
        return self.modality_ids_T.numel()

    @property
    def num_modalities(self) -> int:
        return len(self.counts)

    def token_indices(self, modalities: Sequence[int]) -> Tensor:
        """[b^M] indices of the tokens of the given modalities (one modality, or all for a shared group)."""
        if len(modalities) == self.num_modalities:
            return self.order_T
        starts = [0, *itertools.accumulate(self.counts)]
        return torch.cat([self.order_T[starts[m] : starts[m + 1]] for m in modalities])

    def token_count(self, modalities: Sequence[int]) -> int:
        return sum(self.counts[m] for m in modalities)


class LayoutUser:
    """A module that reads the modality layout of the current forward (MoMa and Soft MoE MLPs,
    Mixture-of-Transformers projections and norms). Its layer opens ``use_layout`` around each call.

    ``sequence_chunk`` is (rank, ranks) when the module's input is one TP rank's chunk of the sequence
    (sequence parallelism), else None: the layout then describes the whole (gathered) sequence."""

    layout: Optional["ModalityLayout"] = None
    sequence_chunk: Optional[Tuple[int, int]] = None

    @contextlib.contextmanager
    def use_layout(self, layout: Optional["ModalityLayout"], sequence_chunk: Optional[Tuple[int, int]] = None):
        self.layout, self.sequence_chunk = layout, sequence_chunk
        try:
            yield
        finally:
            self.layout, self.sequence_chunk = None, None

    def routing_layout(self, layout: Optional["ModalityLayout"]):
        """``use_layout`` on the whole sequence: how a test or benchmark hands an MLP its layout."""
        return self.use_layout(layout)

    def require_layout(self, tokens: Optional[int] = None, multiple_of: int = 1) -> "ModalityLayout":
        """The layout of this call; with ``tokens``, checked to describe them (the input's s*b, padded
        by the layer to a multiple of ``multiple_of``)."""
        layout = self.layout
        if layout is None:
            raise RuntimeError(
                f"{type(self).__name__} received no modality layout. Build the model with "
                "moma_plugin.MoMaGPTModel (it passes the layout to every MoMaTransformerLayer), or call "
                "the layer with modality_layout=moma_plugin.build_modality_layout(modality_ids_SB, "
                "num_modalities).")
        if tokens is not None and tokens != -(-layout.num_tokens // multiple_of) * multiple_of:
            raise ValueError(
                f"{type(self).__name__}: the modality layout has {layout.num_tokens} tokens but the layer got "
                f"{tokens} (s*b). Modality ids must have the same [b, s] shape as the input ids.")
        return layout


def local_modality_ids(layout: "ModalityLayout", rows: int, sequence_chunk: Optional[Tuple[int, int]]) -> Tensor:
    """[rows] modality ids of the tokens a module holds: all of the layout's, or under sequence
    parallelism this rank's chunk of them (the layout's [s, b] tokens padded with id 0 to a multiple of
    the ranks, as the layers pad their sequences)."""
    ids_T = layout.modality_ids_T
    if sequence_chunk is None:
        return ids_T
    rank, ranks = sequence_chunk
    pad = rows * ranks - ids_T.numel()
    if pad:
        ids_T = torch.cat([ids_T, ids_T.new_zeros(pad)])
    return ids_T[rank * rows:(rank + 1) * rows]


def is_new_forward(forward_id: Optional[int], newest_recorded: Optional[int]) -> bool:
    """Whether a forward with ``forward_id`` is recorded for the first time, given the newest id a
    layer recorded. Ids grow with every layout built; a recomputed forward reuses its older id, also
    when later micro-batches ran forward in between (pipeline parallelism's 1F1B schedule)."""
    return forward_id is None or newest_recorded is None or forward_id > newest_recorded


def build_modality_layout(modality_ids_SB: Tensor, num_modalities: int) -> ModalityLayout:
    """Builds the layout from modality ids laid out like the hidden states, [s, b] (or already flat [T]).

    Raises ValueError naming the offending values when an id is outside [0, num_modalities).
    """
    ids_T = modality_ids_SB.reshape(-1).long()
    in_range = (ids_T >= 0) & (ids_T < num_modalities)
    # One host read for both the validity check and the counts.
    stats = torch.cat(
        [torch.bincount(ids_T.clamp(0, num_modalities - 1)[in_range], minlength=num_modalities),
         (~in_range).sum().reshape(1)]
    ).tolist()
    if stats[-1]:
        bad = ids_T[~in_range].unique()[:8].tolist()
        raise ValueError(
            f"{stats[-1]} modality ids are outside [0, {num_modalities}) (e.g. {bad}). Modality ids "
            f"index config.moma_modalities; check the data's modality stream or moma_vocab_ranges."
        )
    order_T = torch.sort(ids_T, stable=True).indices
    return ModalityLayout(ids_T, order_T, tuple(stats[:-1]))


def modality_ids_from_tokens(
    input_ids: Tensor, vocab_ranges: Dict[str, Tuple[int, int]], modalities: Sequence[str]
) -> Tensor:
    """Modality id of every token from its id: tokens in ``vocab_ranges[name]`` get ``name``'s id,
    all others the first modality's (0). Same shape as ``input_ids``."""
    ids = torch.zeros_like(input_ids, dtype=torch.long)
    for name, (start, end) in vocab_ranges.items():
        ids[(input_ids >= start) & (input_ids < end)] = modalities.index(name)
    return ids


def count_ids(ids_N: Tensor, num_ids: int) -> Tensor:
    """[num_ids] int64 occurrences of each id in ``ids_N`` (ids in [0, num_ids)): ``torch.bincount``
    without its host synchronisation (on CUDA bincount reads the largest id to size its output)."""
    return torch.zeros(num_ids, dtype=torch.long, device=ids_N.device).index_add_(
        0, ids_N, torch.ones_like(ids_N, dtype=torch.long))


def narrow_layout(layout: ModalityLayout, selected_K: Tensor,
                  counts: Optional[Sequence[int]] = None) -> ModalityLayout:
    """The layout of the tokens ``selected_K`` (indices into ``layout``'s tokens), numbered 0..K-1 in
    that order: what a Mixture-of-Depths layer hands its MoMa MLP.

    ``counts``: the selected tokens per modality, if the caller has already read them from the device
    (a MoD layer reads them together with its packed length); otherwise they are read here, the only
    host synchronisation. Keeps the parent's ``forward_id``, so recomputed forwards are still recognised.
    """
    modality_ids_K = layout.modality_ids_T.index_select(0, selected_K)
    if counts is None:
        counts = count_ids(modality_ids_K, layout.num_modalities).tolist()
    order_K = torch.sort(modality_ids_K, stable=True).indices
    return ModalityLayout(modality_ids_K, order_K, tuple(counts), forward_id=layout.forward_id)
