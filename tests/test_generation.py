"""KV-cache generation against recomputing the whole sequence, MoD-aware caches, image spans, and the
refusal of causal routing without trained aux routers."""

import pytest
import torch

import moma_plugin as mp
from moma_plugin.attention import KVCache
from moma_plugin.aux_router import mark_aux_routers_trained, set_routing_mode
from moma_plugin.generation import TokenRules, decode_logits, full_sequence_logits, generate

from .helpers import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")
VOCAB, IMAGE = 64, (40, 64)  # ids 40..63 are image codes
RULES = dict(vocab_size=VOCAB, eod_id=30, text_ids=torch.arange(0, 32), begin_image_id=31,
             end_image_id=32, image_range=IMAGE, tokens_per_image=5)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 10], [11, 31, 41, 42]]  # the last one ends inside an image


def _model(experts="2t2i", mod_interval=0, sharpen=20.0):
    config = tiny_config(num_layers=4, moma_experts=experts, mod_interval=mod_interval,
                         mod_capacity=0.5, moma_vocab_ranges={"image": IMAGE})
    model = tiny_model(config, vocab_size=VOCAB, seq_length=48)
    with torch.no_grad():  # sharper aux scores: both decisions occur
        for _, router in mp.aux_router.aux_routers(model):
            router.fc2.mul_(sharpen)
    mark_aux_routers_trained(model)
    return model


@pytest.mark.parametrize("experts, mod_interval", [("2t2i", 0), ("2t2i", 2), ("dense", 2), ("dense", 0)])
def test_kv_cache_generation_equals_recomputation(experts, mod_interval):
    model = _model(experts, mod_interval)
    rules = TokenRules(**RULES)
    cached = generate(model, PROMPTS, rules, 24, use_kv_cache=True)
    recomputed = generate(model, PROMPTS, rules, 24, use_kv_cache=False)
    assert cached.tokens == recomputed.tokens
    assert all(len(t) > 0 for t in cached.tokens)
    # Sampling with a seed is reproducible and also agrees.
    sampled = [generate(model, PROMPTS, rules, 12, temperature=1.0, top_k=8, use_kv_cache=c, seed=3)
               for c in (True, False)]
    assert sampled[0].tokens == sampled[1].tokens


@pytest.mark.parametrize("mod_interval", [0, 2])
def test_prefill_logits_match_the_full_forward(mod_interval):
    model = _model(mod_interval=mod_interval)
    set_routing_mode(model, "causal")
    model.eval()
    tokens = torch.zeros(len(PROMPTS), 7, dtype=torch.long)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for i, prompt in enumerate(PROMPTS):
        tokens[i, :len(prompt)] = torch.tensor(prompt)
        valid[i, :len(prompt)] = True
    caches = [KVCache(len(PROMPTS), 16) for _ in model.decoder.layers]
    positions = torch.arange(7).expand_as(tokens)
    cached = decode_logits(model, tokens, valid, positions, caches)
    full = full_sequence_logits(model, PROMPTS)
    last = valid.sum(1) - 1
    torch.testing.assert_close(cached[torch.arange(3), last], full, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        whole = model(tokens, positions, None)
    torch.testing.assert_close(cached[valid], whole[valid], rtol=1e-4, atol=1e-4)
    # Every layer cached each sample's real tokens, a MoD layer only those it processed.
    for layer, cache in zip(model.decoder.layers, caches):
        if layer.is_mod:
            assert (cache.lengths <= valid.sum(1)).all() and cache.lengths.sum() < valid.sum()
        else:
            assert torch.equal(cache.lengths, valid.sum(1))


def test_mod_cache_holds_only_processed_tokens_during_generation():
    model = _model(mod_interval=2)
    rules = TokenRules(**RULES)
    captured = {}
    original = KVCache.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured.setdefault("caches", []).append(self)

    KVCache.__init__ = remember
    try:
        result = generate(model, PROMPTS, rules, 10, use_kv_cache=True)
    finally:
        KVCache.__init__ = original
    fed = torch.tensor([len(p) + len(new) - 1 for p, new in zip(PROMPTS, result.tokens)])
    for layer, cache in zip(model.decoder.layers, captured["caches"]):
        if layer.is_mod:
            assert (cache.lengths < fed).any() and (cache.lengths <= fed).all()
        else:
            assert torch.equal(cache.lengths, fed)


def test_image_spans_hold_exactly_one_image_then_end():
    model = _model()
    rules = TokenRules(**RULES)
    result = generate(model, [[31], [1, 2, 31, 45]], rules, 8)
    first, second = result.tokens
    assert all(IMAGE[0] <= t < IMAGE[1] for t in first[:5]) and first[5] == 32
    # One code came with the prompt: four more, then end-of-image.
    assert all(IMAGE[0] <= t < IMAGE[1] for t in second[:4]) and second[4] == 32
    assert all(t < 33 for t in first[6:] + second[5:])  # back to text ids (text, <eod>, <boi>)


def test_causal_mode_needs_trained_aux_routers():
    model = tiny_model(tiny_config(num_layers=2, mod_interval=2))
    with pytest.raises(RuntimeError, match="moma-train-aux-routers"):
        set_routing_mode(model, "causal")
    with pytest.raises(RuntimeError, match="untrained"):
        generate(model, [[1, 2]], TokenRules(**RULES), 2)
    dense = tiny_model(tiny_config(num_layers=2, moma_experts="dense"))
    set_routing_mode(dense, "causal")  # nothing to predict: allowed
    with pytest.raises(ValueError, match="routing mode"):
        set_routing_mode(dense, "sideways")


def test_prompts_too_long_for_the_positions_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="learned"):
        generate(model, [[1] * 40], TokenRules(**RULES), 20)



@pytest.mark.parametrize("mod_interval", [0, 2])
def test_rope_kv_cache_generation_equals_recomputation(mod_interval, monkeypatch):
    """Rotary positions: MoD layers index the rotary table by each packed token's position in its
    sequence, and the KV-cache path hands them the table for the new tokens' positions (a bug that used
    packed slots instead would differ between the two paths, whose slots differ). Megatron-Core 0.16's
    RotaryEmbedding moves its frequencies to ``torch.cuda.current_device()``: pointed at the CPU here."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    config = tiny_config(num_layers=4, moma_experts="2t2i", mod_interval=mod_interval, mod_capacity=0.5,
                         moma_vocab_ranges={"image": IMAGE})
    torch.manual_seed(0)
    model = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config, use_te=False), vocab_size=VOCAB,
                            max_sequence_length=48, position_embedding_type="rope")
    with torch.no_grad():
        for _, router in mp.aux_router.aux_routers(model):
            router.fc2.mul_(20.0)
    mark_aux_routers_trained(model)
    rules = TokenRules(**RULES)
    cached = generate(model, PROMPTS, rules, 16, use_kv_cache=True)
    recomputed = generate(model, PROMPTS, rules, 16, use_kv_cache=False)
    assert cached.tokens == recomputed.tokens
    # Logits, token by token: a prefill of 3 tokens, then one token per step, against the full forward.
    sequence = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    caches = [KVCache(1, 16) for _ in model.decoder.layers]
    step = decode_logits(model, torch.tensor([sequence[:3]]), torch.ones(1, 3, dtype=torch.bool),
                         torch.arange(3).view(1, 3), caches)[:, -1]
    for position in range(3, len(sequence)):
        torch.testing.assert_close(step, full_sequence_logits(model, [sequence[:position]]),
                                   rtol=1e-4, atol=1e-4)
        step = decode_logits(model, torch.tensor([[sequence[position]]]), torch.ones(1, 1, dtype=torch.bool),
                             torch.tensor([[position]]), caches)[:, -1]
    # Training-mode forward and backward through the packed rotary path.
    set_routing_mode(model, "train")
    model.train()
    tokens = torch.randint(0, VOCAB, (2, 16))
    model(tokens, torch.arange(16).expand(2, 16), None, labels=tokens).mean().backward()
    if mod_interval:
        assert model.decoder.layers[0].mod_router.weight.grad.abs().sum() > 0
