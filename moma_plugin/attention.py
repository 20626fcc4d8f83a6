"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``, with an optional KV cache.

Megatron's local ``DotProductAttention`` allocates from a CUDA-only buffer, so the local spec uses this
instead: it runs on CPU and picks a fused kernel on GPU. Same constructor and forward as Megatron's
core attention modules, so it drops into ``SelfAttentionSubmodules.core_attention``.

During incremental decoding (``moma_plugin.generation``) the owning layer attaches a ``KVCache``: the new
tokens' keys/values are appended per sample and the queries attend to the whole cache. Each sample has
its own cache length, so a Mixture-of-Depths layer's cache holds only the tokens that went through it.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


class KVCache:
    """Keys and values of one layer for a batch of sequences, packed per sample.

    ``keys``/``values``: [b, kv_heads, capacity, head_dim]; ``lengths``: [b] entries used per sample.
    ``new_counts`` ([b]) is set by the layer before each step: how many of the step's packed tokens of
    each sample are real (the rest is padding and is not stored).
    """

    def __init__(self, batch: int, capacity: int, device=None):
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.keys: Optional[Tensor] = None
        self.values: Optional[Tensor] = None
        self.new_counts: Optional[Tensor] = None

    def append_and_attend(self, query: Tensor, key: Tensor, value: Tensor, scale) -> Tensor:
        """query/key/value [n, b, heads, d] (packed: sample i's real tokens are its first
        ``new_counts[i]``) -> attention output [b, heads, n, d] over cache + new tokens, causal."""
        n, batch = key.shape[:2]
        if self.keys is None:
            shape = (batch, key.shape[2], self.capacity, key.shape[3])
            self.keys = key.new_zeros(shape)
            self.values = value.new_zeros(shape)
        slot_NB = torch.arange(n, device=key.device).unsqueeze(1)
        destination_NB = self.lengths.unsqueeze(0) + slot_NB
        real_NB = slot_NB < self.new_counts.unsqueeze(0)
        if bool(real_NB.any()) and int(destination_NB[real_NB].max()) >= self.capacity:
            raise RuntimeError(f"KV cache of capacity {self.capacity} is full; allocate a larger one.")
        slot, sample = real_NB.nonzero(as_tuple=True)
        self.keys[sample, :, destination_NB[slot, sample]] = key[slot, sample]
        self.values[sample, :, destination_NB[slot, sample]] = value[slot, sample]
        used = int((self.lengths + self.new_counts).max())
        keys, values = self.keys[:, :, :used], self.values[:, :, :used]
        if keys.shape[1] != query.shape[2]:  # grouped-query attention
            keys = keys.repeat_interleave(query.shape[2] // keys.shape[1], dim=1)
            values = values.repeat_interleave(query.shape[2] // values.shape[1], dim=1)
        # Query slot j of sample i sees cache entries 0 .. lengths[i] + j.
        allowed_BNL = (torch.arange(used, device=key.device).view(1, 1, used)
                       <= destination_NB.t().unsqueeze(2))
        out = F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), keys, values,
                                             attn_mask=allowed_BNL.unsqueeze(1), scale=scale)
        self.lengths += self.new_counts
        return out


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v over inputs [s, b, heads, head_dim]; output [s, b, heads*head_dim].

    With a causal mask type the causal mask is built by the kernel and ``attention_mask`` is ignored, as
    in Transformer Engine; otherwise ``attention_mask`` follows Megatron's convention (True = masked out).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError(
                "SDPACoreAttention does not support context parallelism; use the Transformer Engine "
                "spec (get_moma_layer_spec(config, use_te=True)) for context_parallel_size > 1."
            )
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.kv_cache: Optional[KVCache] = None  # attached by MoMaTransformerLayer while decoding

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the Transformer Engine attention spec.")
        mask_type = attn_mask_type or self.attn_mask_type
        seq_len, batch, heads, head_dim = query.shape
        if self.kv_cache is not None:
            out = self.kv_cache.append_and_attend(query, key, value, self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(seq_len, batch, heads * head_dim)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, head_dim]
        if k.shape[1] != heads:  # grouped-query attention: share each key/value head
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        is_causal = mask_type == AttnMaskType.causal
        mask = None
        if not is_causal and attention_mask is not None:
            mask = ~attention_mask.bool()
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            if is_causal:
                causal = torch.ones(seq_len, k.shape[2], dtype=torch.bool, device=q.device).tril()
                mask, is_causal = mask.masked_fill(~causal, float("-inf")), False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
        )
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, heads * head_dim)
