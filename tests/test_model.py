"""MoMaGPTModel end to end on CPU: training, activation recompute, post-norm, specs, bad input."""

import importlib

import pytest
import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

import moma_plugin as mp

from .helpers import random_batch, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def _loss(model, batch):
    tokens, position_ids, modality_ids = batch
    return model(tokens, position_ids, None, labels=tokens, modality_ids=modality_ids).mean()


def _train(model, batch, steps=12, lr=3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "overrides",
    [
        dict(moma_experts="2t2i"),
        dict(moma_experts="2t2i", recompute_granularity="full", recompute_method="uniform",
             recompute_num_layers=1),
        dict(moma_experts="8x", recompute_granularity="full", recompute_method="block",
             recompute_num_layers=1),
        dict(moma_experts="2t2i", moma_post_norm=True),
        dict(moma_experts="dense"),
        dict(moma_experts="2t2i", mod_interval=2, mod_capacity=0.5),
        dict(moma_experts="dense", mod_interval=1, mod_capacity=0.5, moma_post_norm=True),
    ],
    ids=["4t4i", "recompute-uniform", "8x-recompute-block", "post-norm", "dense", "mod", "dense-mod"],
)
def test_model_trains_on_a_fixed_batch(overrides):
    model = tiny_model(tiny_config(**overrides))
    losses = _train(model, random_batch(4, 16), steps=20)
    assert losses[-1] < 0.8 * losses[0], losses


def test_recompute_gives_the_same_loss_gradients_and_metrics():
    batch = random_batch(2, 16)
    results = []
    for recompute in (None, "full"):
        extra = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1) if recompute else {}
        model = tiny_model(tiny_config(**extra))
        loss = _loss(model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((loss.detach(), grads, mp.collect_routing_metrics(model)))
    (loss0, grads0, metrics0), (loss1, grads1, metrics1) = results
    torch.testing.assert_close(loss1, loss0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], msg=name)
    assert metrics1 == metrics0  # the recomputed forward is not counted twice


def test_post_norm_layer_is_x_plus_norm_of_sublayer():
    config = tiny_config(moma_post_norm=True, num_layers=1)
    model = tiny_model(config)
    layer = model.decoder.layers[0]
    assert isinstance(layer.input_layernorm, IdentityOp)
    assert isinstance(layer.pre_mlp_layernorm, IdentityOp)
    x = torch.randn(16, 2, 32)
    ids = torch.randint(0, 2, (16, 2))
    layout = mp.build_modality_layout(ids, 2)
    out, _ = layer(hidden_states=x, attention_mask=None, modality_layout=layout)
    with torch.no_grad():
        attention, bias = layer.self_attention(x, attention_mask=None)
        h = x + layer.post_self_attn_layernorm(attention + (bias if bias is not None else 0))
        with layer.mlp.routing_layout(layout):
            ffn, _ = layer.mlp(h)
        expected = h + layer.post_mlp_layernorm(ffn)
    torch.testing.assert_close(out, expected)


def test_modality_ids_derived_from_vocab_ranges():
    config = tiny_config(moma_vocab_ranges={"image": (32, 64)})
    model = tiny_model(config)
    tokens, position_ids, _ = random_batch(2, 16)
    derived = model(tokens, position_ids, None, labels=tokens)
    explicit = model(tokens, position_ids, None, labels=tokens, modality_ids=(tokens >= 32).long())
    torch.testing.assert_close(derived, explicit)


def test_modality_ids_change_the_output():
    model = tiny_model(tiny_config())
    tokens, position_ids, ids = random_batch(2, 16)
    a = model(tokens, position_ids, None, modality_ids=ids)
    b = model(tokens, position_ids, None, modality_ids=1 - ids)
    assert not torch.allclose(a, b)


def test_dense_builds_megatrons_plain_mlp():
    model = tiny_model(tiny_config(moma_experts="dense"))
    assert all(type(layer.mlp) is MLP for layer in model.decoder.layers)
    tokens, position_ids, _ = random_batch(2, 16)
    assert torch.isfinite(model(tokens, position_ids, None, labels=tokens)).all()


def test_bad_inputs_give_clear_errors():
    model = tiny_model(tiny_config())
    tokens, position_ids, ids = random_batch(2, 16)
    with pytest.raises(ValueError, match="outside"):
        model(tokens, position_ids, None, modality_ids=ids + 2)
    with pytest.raises(ValueError, match="needs modality_ids"):
        model(tokens, position_ids, None)
    with pytest.raises(ValueError, match="same \\[b, s\\] shape"):
        model(tokens, position_ids, None, modality_ids=ids[:, :8])
    with pytest.raises(TypeError, match="MoMaConfig"):
        mp.MoMaGPTModel(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4),
                        mp.moma_layer_spec, vocab_size=64, max_sequence_length=16)


def test_module_level_spec_for_megatron_lm():
    # Megatron-LM's --spec MODULE NAME does vars(import_module(MODULE))[NAME] and never calls it.
    spec = vars(importlib.import_module("moma_plugin"))["moma_layer_spec"]
    assert isinstance(spec, ModuleSpec) and spec.module is mp.MoMaTransformerLayer
    config = tiny_config()
    torch.manual_seed(0)
    from_module_spec = mp.MoMaGPTModel(config, spec, vocab_size=64, max_sequence_length=16)
    from_function = tiny_model(config)
    from_module_spec.load_state_dict(from_function.state_dict())
    batch = random_batch(2, 16)
    torch.testing.assert_close(_loss(from_module_spec, batch), _loss(from_function, batch))


def test_decoder_block_spec_builds_the_same_model():
    config = tiny_config()
    torch.manual_seed(0)
    block_model = mp.MoMaGPTModel(config, mp.get_moma_decoder_block_spec(config, use_te=False),
                                  vocab_size=64, max_sequence_length=16)
    layer_model = tiny_model(config)
    assert block_model.state_dict().keys() == layer_model.state_dict().keys()


@pytest.mark.skipif(mp.transformer_engine_available(), reason="Transformer Engine is installed")
def test_te_spec_without_te_says_how_to_install():
    with pytest.raises(ImportError, match=r"moma_plugin\[te\]"):
        mp.get_moma_layer_spec(tiny_config(), use_te=True)
    assert mp.get_moma_layer_spec(tiny_config()).submodules.self_attention.submodules.core_attention \
        is mp.SDPACoreAttention  # use_te=None falls back to the local spec


@pytest.mark.gpu
def test_te_spec_trains_on_gpu():
    config = tiny_config(moma_experts="2t2i", bf16=True, params_dtype=torch.bfloat16,
                         use_cpu_initialization=False)
    torch.manual_seed(0)
    model = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config, use_te=True),
                            vocab_size=64, max_sequence_length=16).cuda()
    batch = tuple(t.cuda() for t in random_batch(4, 16))
    losses = _train(model, batch)
    assert losses[-1] < losses[0]
