"""Mixture-of-Transformers: untied projections, norms and FFNs per modality (moma_plugin.mot, config.mot).

The oracle: with one modality, MoT is the dense layer. Isolation: a token's output depends only on its own
modality's weights. Fast paths against their references; KV-cache decoding against recompute; full-layer
activation recompute; three modalities; the config's refusals. TP=2 against TP=1 is in
test_tensor_parallel.py (variants 'mot' and 'sp-mot-mod')."""

import re

import pytest
import torch

import moma_plugin as mp
from moma_plugin.config import parse_mot_parts
from moma_plugin.generation import TokenRules, generate
from moma_plugin.aux_router import aux_routers, mark_aux_routers_trained
from moma_plugin.layout import build_modality_layout
from moma_plugin.experts import per_expert_state
from moma_plugin.mot import ModalityNorm, modality_matmul, modality_matmul_reference, per_modality_state

from .helpers import random_batch, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")
THREE = ("text", "image", "speech")


def _loss_and_grads(model, tokens, positions, ids):
    model.zero_grad()
    losses = model(tokens, positions, None, labels=tokens, modality_ids=ids)
    losses.float().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses.detach(), grads


def _dense_to_mot_name(name: str) -> str:
    """A dense model's parameter name in a one-modality ('text') MoT model."""
    name = re.sub(r"(input_layernorm|pre_mlp_layernorm|post_self_attn_layernorm|post_mlp_layernorm|"
                  r"linear_qkv|linear_proj)\.(weight|bias)$", r"\1.text.\2", name)
    return re.sub(r"mlp\.(linear_fc[12]\.(weight|bias))$", r"mlp.experts.text.0.\1", name)


@pytest.mark.parametrize("post_norm, bias", [(False, False), (True, True)])
def test_mot_with_one_modality_equals_the_dense_model(post_norm, bias):
    """Oracle: MoT of one modality (every part untied) is the dense model, in losses and gradients."""
    common = dict(moma_modalities=("text",), moma_post_norm=post_norm, add_bias_linear=bias,
                  mod_interval=2, mod_capacity=0.5)
    dense = tiny_model(tiny_config(moma_experts="dense", **common))
    mot = tiny_model(tiny_config(moma_experts="1t", mot="all", **common), seed=1)
    state = {_dense_to_mot_name(k): v for k, v in dense.state_dict().items() if not k.endswith("_extra_state")}
    # The layers really are MoT layers: per-modality names, stacked projection weights.
    assert "decoder.layers.0.self_attention.linear_qkv.text.weight" in state
    missing, unexpected = mot.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    assert mot.decoder.layers[0].self_attention.linear_qkv.weight.dim() == 3

    tokens, positions, ids = random_batch(2, 16, num_modalities=1)
    want_loss, _ = _loss_and_grads(dense, tokens, positions, ids)
    got_loss, _ = _loss_and_grads(mot, tokens, positions, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    want_state, got_state = _grads_by_checkpoint_name(dense), _grads_by_checkpoint_name(mot)
    assert len(want_state) == len(got_state)
    for name, grad in want_state.items():
        torch.testing.assert_close(got_state[_dense_to_mot_name(name)], grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _grads_by_checkpoint_name(model):
    """The gradients under the model's checkpoint names (per modality, per expert)."""
    params = list(model.parameters())
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()
                and not k.endswith("_extra_state")}
    finally:
        for p, data in zip(params, saved):
            p.data = data


@pytest.mark.parametrize("modalities, experts", [(("text", "image"), "1t1i"), (THREE, "2t1i1s")])
def test_a_token_depends_only_on_its_own_modality_weights(modalities, experts):
    """Perturbing every untied parameter of the other modalities leaves single-modality sequences
    unchanged; perturbing their own modality's changes them (so the check can fail)."""
    config = tiny_config(moma_experts=experts, mot="all", moma_modalities=modalities, add_bias_linear=True)
    model = tiny_model(config)
    model.eval()
    tokens, positions, _ = random_batch(2, 12)
    text_only = torch.zeros_like(tokens)

    def logits():
        with torch.no_grad():
            return model(tokens, positions, None, modality_ids=text_only)

    def perturb(modality: int):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_proj.weight",
                                  "linear_proj.bias")) or ".layers." in name and "layernorm" in name:
                    param[modality].add_(torch.randn_like(param[modality]))
            for layer in model.decoder.layers:
                experts = layer.mlp.experts
                for index, expert in enumerate(experts.expert_names):
                    if expert.startswith(modalities[modality]):
                        experts.fc1_weight[index].add_(torch.randn_like(experts.fc1_weight[index]))

    before = logits()
    for other in range(1, len(modalities)):
        perturb(other)
    torch.testing.assert_close(logits(), before, rtol=0, atol=0)
    perturb(0)
    assert (logits() - before).abs().max() > 1e-2


@pytest.mark.parametrize("counts", [(5, 7, 4), (0, 9, 7), (16, 0, 0)])
def test_modality_matmul_matches_the_reference(counts):
    g = torch.Generator().manual_seed(sum(counts))
    ids = torch.cat([torch.full((c,), m) for m, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    layout = build_modality_layout(ids, 3)
    x = torch.randn(ids.numel(), 8, generator=g, requires_grad=True)
    weight = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    upstream = torch.randn(ids.numel(), 6, generator=g)
    results = []
    for function in (modality_matmul, modality_matmul_reference):
        out = function(x, weight, layout)
        x.grad = weight.grad = None
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad.clone(), weight.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the definition itself: row t is x_t @ W[m_t]^T
    torch.testing.assert_close(results[1][0], torch.einsum("ti,toi->to", x, weight[ids]).detach())


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_modality_norm_matches_the_reference(normalization):
    config = tiny_config(moma_modalities=THREE, moma_experts="1t1i1s", normalization=normalization)
    norm = ModalityNorm(config, 32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
        if norm.bias is not None:
            norm.bias.copy_(torch.randn_like(norm.bias))
    x = torch.randn(6, 2, 32, requires_grad=True)
    ids = torch.randint(0, 3, (6, 2), generator=torch.Generator().manual_seed(1))
    with norm.use_layout(build_modality_layout(ids, 3)):
        fast, slow = norm(x), norm.reference(x)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        grads = [torch.autograd.grad(y.sum() * 1.0 + (y ** 2).sum(), [x, norm.weight]) for y in (norm(x), norm.reference(x))]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_kv_cache_generation_equals_recomputation_for_mot():
    """MoT with a 2-expert text MoE, untied image FFN and a MoD layer: cached decoding agrees with
    recomputing the whole sequence."""
    vocab, image = 64, (40, 64)
    config = tiny_config(num_layers=4, moma_experts="2t1i", mot="all", mod_interval=2, mod_capacity=0.5,
                         moma_vocab_ranges={"image": image})
    model = tiny_model(config, vocab_size=vocab, seq_length=48)
    with torch.no_grad():
        for _, router in aux_routers(model):
            router.fc2.mul_(20.0)
    mark_aux_routers_trained(model)
    rules = TokenRules(vocab_size=vocab, eod_id=30, text_ids=torch.arange(0, 32), begin_image_id=31,
                       end_image_id=32, image_range=image, tokens_per_image=5)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 10], [11, 31, 41, 42]]
    cached = generate(model, prompts, rules, 20, use_kv_cache=True)
    recomputed = generate(model, prompts, rules, 20, use_kv_cache=False)
    assert cached.tokens == recomputed.tokens and all(len(t) > 0 for t in cached.tokens)


def test_full_layer_recompute_gives_the_same_gradients():
    overrides = dict(moma_experts="2t1i", mot="all", mod_interval=2, mod_capacity=0.5)
    plain = tiny_model(tiny_config(**overrides))
    recomputed = tiny_model(tiny_config(recompute_granularity="full", recompute_method="uniform",
                                        recompute_num_layers=1, **overrides))
    recomputed.load_state_dict(plain.state_dict())
    batch = random_batch(2, 16)
    want_loss, want = _loss_and_grads(plain, *batch)
    got_loss, got = _loss_and_grads(recomputed, *batch)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_untied_parts_choose_what_the_layer_holds():
    ffn_only = tiny_model(tiny_config(moma_experts="1t1i", mot="ffn")).decoder.layers[0]
    assert type(ffn_only.self_attention.linear_qkv).__name__ == "ColumnParallelLinear"
    assert not ffn_only.mlp.router and [g.routed for g in ffn_only.mlp.groups] == [False, False]
    attention_only = tiny_model(tiny_config(moma_experts="dense", mot="attention")).decoder.layers[0]
    assert type(attention_only.self_attention.linear_qkv).__name__ == "ModalityColumnLinear"
    assert type(attention_only.input_layernorm).__name__ != "ModalityNorm"
    assert type(attention_only.mlp).__name__ == "MLP"
    composed = tiny_model(tiny_config(moma_experts="4t1i", mot="all")).decoder.layers[0]
    assert list(composed.mlp.router) == ["text"]  # the text MoE routes; the image FFN takes every token
    assert [name for name, _ in composed.mlp.aux_routers()] == ["experts"]


def test_mot_parts_parse_and_bad_settings_are_refused():
    assert parse_mot_parts("all") == ("ffn", "attention", "norms")
    assert parse_mot_parts("norms, ffn") == ("ffn", "norms")
    assert parse_mot_parts("") == ()
    with pytest.raises(ValueError, match="'qkv'.*untie any of ffn, attention, norms"):
        tiny_config(mot="ffn,qkv")
    for experts in ("dense", "4x"):
        with pytest.raises(ValueError, match="no group per modality.*1t1i"):
            tiny_config(mot="ffn", moma_experts=experts)
    with pytest.raises(ValueError, match="get_mot_layer_spec needs config.mot"):
        mp.get_mot_layer_spec(tiny_config())
    assert mp.get_mot_layer_spec(tiny_config(mot="all", moma_experts="1t1i"), use_te=False).module \
        is mp.MoMaTransformerLayer


def test_stacked_parameters_of_a_sharded_checkpoint_split_into_checkpoint_names():
    """An FSDP2 checkpoint's DCP directory holds the parameters stacked, as named_parameters() names
    them; per_modality_state and per_expert_state turn them into the checkpoint names every tool reads."""
    model = tiny_model(tiny_config(moma_experts="2t1i", mot="all", add_bias_linear=True, moma_post_norm=True))
    saved = model.state_dict()
    stacked = {**dict(model.named_parameters()), **{k: v for k, v in model.named_buffers() if k in saved}}
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in stacked
    named = per_expert_state(per_modality_state(stacked, ("text", "image")), model.config.moma_expert_groups)
    checkpoint = {k: v for k, v in saved.items() if not k.endswith("_extra_state")}
    assert named.keys() == checkpoint.keys()
    assert all(torch.equal(named[k], checkpoint[k]) for k in checkpoint)
    tied = tiny_model(tiny_config(moma_experts="dense")).state_dict()
    assert per_modality_state(tied, ("text", "image")).keys() == tied.keys()  # nothing stacked: as it is
