"""Soft MoE inside modality groups: the normalisation of the dispatch and combine weights, permutation
equivariance, the vectorised path against the per-sample reference, the dense-MLP oracle, empty
groups and bf16, and the config's refusal for causal stacks."""

import copy

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

import moma_plugin as mp
from moma_plugin.experts import StackedExperts
from moma_plugin.soft_moe import SoftMoEMLP, soft_moe_reference

from .helpers import run_mlp, tiny_config

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def soft_config(**overrides):
    values = dict(moma_experts="2t2i", moma_soft_moe_slots=2, moma_bidirectional=True)
    values.update(overrides)
    return tiny_config(**values)


def soft_mlp(config, seed=0) -> SoftMoEMLP:
    torch.manual_seed(seed)
    spec = ModuleSpec(module=SoftMoEMLP, submodules=mp.MoMaMLPSubmodules(experts=StackedExperts))
    return build_module(spec, config=config)


def _inputs(s=12, b=3, hidden=32, num_modalities=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, hidden, generator=g)
    ids = torch.randint(0, num_modalities, (s, b), generator=g)
    target = torch.randn(s, b, hidden, generator=g)
    return x, ids, target


def _forward_backward(mlp, x, ids, target, reference=False):
    mlp.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if reference:
        layout = mp.build_modality_layout(ids, mlp.config.num_modalities)
        out = soft_moe_reference(mlp, x, layout)
    else:
        out, _ = run_mlp(mlp, x, ids)
    (out.float() * target).sum().backward()  # a real loss: _grouped_mm's backward rejects stride-0 grads
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
             for n, p in mlp.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def test_dispatch_and_combine_are_normalised():
    mlp = soft_mlp(soft_config(moma_soft_moe_slots=3))
    x, ids, _ = _inputs(s=10, b=4)
    ids[:, 0] = 0  # sample 0 has no image token
    ids[:, 3] = 1  # sample 3 has no text token
    layout = mp.build_modality_layout(ids, mlp.config.num_modalities)
    with mlp.routing_layout(layout):
        for group in mlp.groups:
            dispatch_BSP, combine_BSP = mlp.dispatch_and_combine(x, group)
            assert dispatch_BSP.shape == combine_BSP.shape == (4, 10, group.num_experts * 3)
            in_group_BS = torch.isin(ids, torch.tensor(group.modalities)).t()
            assert torch.isfinite(dispatch_BSP).all() and torch.isfinite(combine_BSP).all()
            # Nothing at the tokens of other groups.
            assert (dispatch_BSP[~in_group_BS] == 0).all() and (combine_BSP[~in_group_BS] == 0).all()
            has_tokens_B1 = in_group_BS.any(1, keepdim=True).float()
            torch.testing.assert_close(dispatch_BSP.sum(1), has_tokens_B1.expand(4, group.num_experts * 3))
            torch.testing.assert_close(combine_BSP.sum(2), in_group_BS.float())
            assert has_tokens_B1.min() == 0  # the case of a sample without the group was exercised


@pytest.mark.parametrize("experts", ["2t2i", "4i"])
def test_permuting_positions_permutes_the_output(experts):
    modalities = ("image",) if experts == "4i" else ("text", "image")
    mlp = soft_mlp(soft_config(moma_experts=experts, moma_modalities=modalities))
    x, ids, _ = _inputs(s=16, b=3, num_modalities=len(modalities), seed=3)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(7))
    out, _ = run_mlp(mlp, x, ids)
    out_perm, _ = run_mlp(mlp, x[perm], ids[perm])
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-5, atol=1e-5)
    # And it really mixes the sequence: changing one token changes the others' outputs.
    x_changed = x.clone()
    x_changed[0] += 1.0
    out_changed, _ = run_mlp(mlp, x_changed, ids)
    assert not torch.allclose(out_changed[1:], out[1:])


@pytest.mark.parametrize("execution", ["loop", "chunked", "grouped", "padded"])
@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("overrides", [dict(moma_experts="2t2i"),
                                       dict(moma_experts="4i", moma_modalities=("image",)),
                                       dict(moma_experts="2x", add_bias_linear=True)],
                         ids=lambda o: o["moma_experts"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_matches_reference(execution, slots, overrides, seed):
    config = soft_config(moma_soft_moe_slots=slots, moma_expert_execution=execution, **overrides)
    mlp = soft_mlp(config, seed=seed)
    if config.add_bias_linear:  # nonzero biases, so they matter
        with torch.no_grad():
            mlp.experts.fc1_bias.normal_()
            mlp.experts.fc2_bias.normal_()
    x, ids, target = _inputs(s=12, b=3, num_modalities=config.num_modalities, seed=seed)
    ids[:, 1] = 0  # one sample without image tokens
    out, dx, grads = _forward_backward(mlp, x, ids, target)
    ref_out, ref_dx, ref_grads = _forward_backward(mlp, x, ids, target, reference=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for g in grads.values())  # every parameter takes part


@pytest.mark.parametrize("execution", ["loop", "chunked", "grouped", "padded"])
@pytest.mark.parametrize("bias", [False, True])
def test_oracle_identity_slots_equal_dense_mlp(execution, bias):
    """One expert, one slot per position, dispatch and combine forced to the identity == dense MLP."""
    s = 8
    config = soft_config(moma_experts="1t", moma_modalities=("text",), moma_soft_moe_slots=s,
                         moma_expert_execution=execution, add_bias_linear=bias)
    mlp = soft_mlp(config, seed=1)
    mlp.slot_logits = lambda x_SBH, group: 1e4 * torch.eye(s).unsqueeze(1)  # [s, 1, s]
    dense = MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                ffn_hidden_size=config.ffn_hidden_size)
    with torch.no_grad():
        dense.linear_fc1.weight.copy_(mlp.experts.fc1_weight[0])
        dense.linear_fc2.weight.copy_(mlp.experts.fc2_weight[0])
        if bias:
            mlp.experts.fc1_bias.normal_()
            mlp.experts.fc2_bias.normal_()
            dense.linear_fc1.bias.copy_(mlp.experts.fc1_bias[0])
            dense.linear_fc2.bias.copy_(mlp.experts.fc2_bias[0])
    x, ids, target = _inputs(s=s, b=1, num_modalities=1, seed=2)
    x_dense = x.clone().requires_grad_(True)
    y, y_bias = dense(x_dense)
    y = y + y_bias if y_bias is not None else y
    (y * target).sum().backward()
    out, dx, grads = _forward_backward(mlp, x, ids, target)
    torch.testing.assert_close(out, y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, x_dense.grad, rtol=1e-5, atol=1e-5)
    for name, p in dense.named_parameters():
        stacked = "experts." + name.replace("linear_", "").replace(".", "_")
        torch.testing.assert_close(grads[stacked][0], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_missing_group_is_finite_and_bf16_is_close():
    mlp = soft_mlp(soft_config(moma_experts="2t2i", moma_expert_execution="loop"))
    x, ids, target = _inputs(s=12, b=3, seed=4)
    ids[:, 0] = 0  # sample 0: text only
    ids[:, 2] = 1  # sample 2: image only
    for case in (ids, torch.zeros_like(ids)):  # and a micro-batch without any image token
        out, dx, grads = _forward_backward(mlp, x, ids if case is ids else case, target)
        assert torch.isfinite(out).all() and torch.isfinite(dx).all()
        assert all(torch.isfinite(g).all() for g in grads.values())
    assert (grads["slots.image.weight"] == 0).all()  # the image group saw no token in the last case
    out, _, _ = _forward_backward(mlp, x, ids, target)
    bf16 = copy.deepcopy(mlp).to(torch.bfloat16)
    out_bf16, dx_bf16, _ = _forward_backward(bf16, x.bfloat16(), ids, target)
    assert out_bf16.dtype == torch.bfloat16 and torch.isfinite(dx_bf16.float()).all()
    scale = out.abs().max()
    torch.testing.assert_close(out_bf16.float(), out, rtol=0, atol=0.03 * float(scale))


def test_config_refuses_soft_moe_in_a_causal_stack():
    with pytest.raises(ValueError, match="causal") as error:
        tiny_config(moma_soft_moe_slots=2)
    assert "moma_bidirectional" in str(error.value)


def test_an_image_only_encoder_stack_from_the_same_specs():
    """An image-only bidirectional encoder (Soft MoE in every layer, attention without a causal mask)
    built from get_moma_decoder_block_spec: every position sees every other, the grads reach every
    layer's slots, and get_soft_moe_mlp_spec needs slots."""
    from megatron.core.transformer.enums import AttnMaskType

    config = tiny_config(moma_modalities=("image",), moma_experts="4i", moma_soft_moe_slots=2,
                         moma_bidirectional=True, num_layers=2)
    torch.manual_seed(0)
    block = mp.MoMaTransformerBlock(config=config, spec=mp.get_moma_decoder_block_spec(config, use_te=False))
    assert all(isinstance(layer.mlp, SoftMoEMLP) for layer in block.layers)
    assert all(layer.self_attention.core_attention.attn_mask_type == AttnMaskType.no_mask for layer in block.layers)
    x = torch.randn(10, 2, 32, requires_grad=True)
    layout = mp.build_modality_layout(torch.zeros(10, 2, dtype=torch.long), 1)
    out = block(x, attention_mask=None, modality_layout=layout)
    # The first position's output depends on the last position's input (in a causal stack: exactly 0).
    (first_on_last,) = torch.autograd.grad(out[0].sum(), x, retain_graph=True)
    assert first_on_last[-1].abs().max() > 0
    out.square().sum().backward()
    assert all(layer.mlp.slots["image"].weight.grad.abs().max() > 0 for layer in block.layers)
    with pytest.raises(ValueError, match="moma_soft_moe_slots > 0"):
        mp.get_soft_moe_mlp_spec(tiny_config())
