"""Matmul FLOPs per token of a MoMa (or dense) GPT model, from its config alone.

Counts multiply-adds as 2 FLOPs. Expert choice sets the expert work per token by capacity, not by
top-k: each expert of group M takes k_e = ceil(b^M * capacity_factor / |E^M|) tokens, so a token of M
passes through about ``min(capacity_factor, |E^M|)`` experts on average (exactly, when b^M * factor is a
multiple of |E^M|). Attention's score and value matmuls are counted over the whole s x s square, as the
kernels without causal skipping compute them. Training FLOPs are 3x forward (forward + two backward
matmuls per forward one).

Mixture-of-Depths: a MoD layer runs its projections, router and FFN for a share ``mod_capacity`` of the
tokens, and attention among them over packed sequences about ``mod_capacity * s`` long, so its attention
core costs ``mod_capacity**2`` of a full layer's per token; its own router adds 2h per token to choose
(without gradients) and 2h per chosen token for the gates (``mod_capacity`` of the tokens). Auxiliary
routers are counted only when they are trained alongside (``aux_routers=True``); at inference they
replace nothing that is counted here but add their ``2h * h/2 + 2 * h/2 * experts`` per token.

Mixture-of-Transformers costs what the dense model costs: each token goes through its own modality's
projections, norms and FFN, of the dense sizes (an unrouted group: one pass, no router). A Soft MoE
group (``moma_soft_moe_slots`` = p) runs each of its n experts on p slots per sequence: ``n * p / s``
expert passes per token of the sequence, plus the slot logits (2h * n*p), the dispatch into
slots and the combine out of them (2h * n*p each), which run over every token with the other
modalities' masked out.
"""

from typing import Dict, Optional, Sequence

from .config import MoMaConfig


def forward_flops_per_token(config: MoMaConfig, seq_length: int, vocab_size: int,
                            modality_shares: Optional[Sequence[float]] = None,
                            aux_routers: bool = False) -> Dict[str, float]:
    """Forward matmul FLOPs per token, by part: attention projections, attention core, router,
    FFN (experts or dense), MoD routers, aux routers, output logits, and their ``total``.

    ``modality_shares``: token share of each modality (default equal); only the aux routers of groups
    with different expert counts (7t1i) depend on it. The routers of all groups score every token in
    one matmul (``MoMaMLP.router_logits``), so a layer's router costs 2h per expert of the layer.
    """
    h = config.hidden_size
    head_dim = config.kv_channels or h // config.num_attention_heads
    q_dim = config.num_attention_heads * head_dim
    kv_dim = (config.num_query_groups or config.num_attention_heads) * head_dim
    ffn = config.ffn_hidden_size
    ffn_per_pass = 2 * h * (2 * ffn if config.gated_linear_unit else ffn) + 2 * ffn * h
    shares = list(modality_shares or [1 / config.num_modalities] * config.num_modalities)
    if len(shares) != config.num_modalities or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"modality_shares {shares} needs one share per modality summing to 1.")

    aux_hidden = max(h // 2, 1)
    aux = 0.0
    if config.is_dense:
        router, expert_passes = 0.0, 1.0
    elif config.moma_soft_moe_slots:  # no aux routers: nothing to predict at inference
        router = expert_passes = 0.0
        for group in config.moma_expert_groups:
            slots = group.num_experts * config.moma_soft_moe_slots
            router += 3 * 2 * h * slots  # slot logits, dispatch, combine, over every token (masked)
            expert_passes += slots / seq_length  # slots per sequence over all tokens of the sequence
    else:
        router = expert_passes = 0.0
        for group in config.moma_expert_groups:
            share = sum(shares[m] for m in group.modalities)
            if not group.routed:  # a MoT modality's untied FFN: every token of it, once, no router
                expert_passes += share
                continue
            router += 2 * h * group.num_experts
            expert_passes += share * min(config.moma_capacity_factor, group.num_experts)
            aux += share * (2 * h * aux_hidden + 2 * aux_hidden * group.num_experts)
    per_layer = {
        "attention_projections": 2 * h * (q_dim + 2 * kv_dim) + 2 * q_dim * h,
        "attention_core": 2 * 2 * seq_length * q_dim,
        "router": router,
        "ffn": expert_passes * ffn_per_pass,
    }
    num_mod = config.num_mod_layers
    full_layers = config.num_layers - num_mod
    c = config.mod_capacity
    parts = {name: full_layers * value + num_mod * c * value for name, value in per_layer.items()}
    parts["attention_core"] = (full_layers + num_mod * c * c) * per_layer["attention_core"]
    parts["mod_router"] = num_mod * 2 * h * (1 + c)
    mod_aux = 2 * h * aux_hidden + 2 * aux_hidden
    parts["aux_routers"] = ((full_layers + num_mod * c) * aux + num_mod * mod_aux) if aux_routers else 0.0
    parts["logits"] = 2 * h * vocab_size
    parts["total"] = sum(parts.values())
    return parts


def training_flops_per_token(config: MoMaConfig, seq_length: int, vocab_size: int,
                             modality_shares: Optional[Sequence[float]] = None,
                             aux_routers: bool = False) -> float:
    return 3 * forward_flops_per_token(config, seq_length, vocab_size, modality_shares,
                                       aux_routers)["total"]
