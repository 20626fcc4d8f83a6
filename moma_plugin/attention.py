"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` allocates from a CUDA-only buffer, so the local spec uses this
instead: it runs on CPU and picks a fused kernel on GPU. Same constructor and forward as Megatron's
core attention modules, so it drops into ``SelfAttentionSubmodules.core_attention``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


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
