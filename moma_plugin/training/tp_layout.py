"""A checkpoint's model state at another tensor-parallel size: ``merge`` joins the TP ranks' shards
into whole tensors, ``split`` cuts whole tensors into the shards of a TP size, the way Megatron's linears
and MoMa's experts hold them (``moma_plugin.experts.tp_shard``):

- column-parallel (split along dim 0): the attention's fused QKV weight and bias (rows grouped by query
  group, so a contiguous split is a split by groups; MoT's per-modality copies alike), the
  vocabulary-parallel embedding and output layer;
- SwiGLU's fc1 (the dense MLP's and every expert's, weight and bias): along dim 0 with stride 2, each
  rank holding its slice of the gate and its slice of the up projection;
- row-parallel (split along dim 1): the attention's output projection and every fc2 weight;
- everything else (norms, routers, aux routers, row-parallel biases, position embeddings) replicated.

The vocabulary rows are padded to a multiple of 128 x TP (``initialize.padded_vocab_size``): ``split``
re-pads them for the new size (the rows past the vocabulary are never used)."""

import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..experts import tp_shard

# ``(\.[a-z]+)?``: a Mixture-of-Transformers projection holds one tensor per modality (``linear_qkv.image.weight``).
_COLUMN = re.compile(r"(.*\.linear_qkv(\.[a-z]+)?\.(weight|bias)|embedding\.word_embeddings\.weight|output_layer\.weight)")
_GLU = re.compile(r".*\.linear_fc1\.(weight|bias)")
_ROW = re.compile(r".*\.(linear_proj(\.[a-z]+)?|linear_fc2)\.weight")
VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def split_rule(key: str) -> Optional[Tuple[int, int]]:
    """(dim, stride) of how TP splits the tensor ``key``; None: replicated."""
    if _GLU.fullmatch(key):
        return 0, 2
    if _COLUMN.fullmatch(key):
        return 0, 1
    if _ROW.fullmatch(key):
        return 1, 1
    return None


def merge(shards: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The whole model state of the TP ranks' states ``shards`` (in rank order)."""
    whole = {}
    for key, value in shards[0].items():
        rule = split_rule(key)
        if rule is None or not torch.is_tensor(value) or len(shards) == 1:
            whole[key] = value
            continue
        dim, stride = rule
        pieces = [torch.chunk(shard[key], stride, dim=dim) for shard in shards]
        whole[key] = torch.cat([rank_pieces[s] for s in range(stride) for rank_pieces in pieces], dim=dim)
    return whole


def split(whole: Dict[str, Any], tp: int, vocab_rows: int) -> List[Dict[str, Any]]:
    """The states of ``tp`` ranks holding ``whole``; the vocabulary tensors re-padded to ``vocab_rows``
    rows (the padded vocabulary of that TP size)."""
    shards: List[Dict[str, Any]] = [{} for _ in range(tp)]
    for key, value in whole.items():
        if key in VOCAB and torch.is_tensor(value):
            value = _pad_rows(value, vocab_rows)
        rule = split_rule(key)
        for rank, shard in enumerate(shards):
            if rule is None or not torch.is_tensor(value):
                shard[key] = value.clone() if torch.is_tensor(value) else value
            else:
                shard[key] = tp_shard(value, rule[0], rule[1], rank, tp).clone()
    return shards


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
