"""Causal routing end to end: no logit depends on a later token (or on another sample), the refusal of
untrained aux routers, KV-cache decoding against the full forward, what a MoD layer's cache holds, image
spans, and training the aux routers on a frozen model."""

import pytest
import torch

import moma_plugin as mp
from moma_plugin.attention import KVCache
from moma_plugin.aux_router import (
    aux_routers,
    collect_aux_metrics,
    mark_aux_routers_trained,
    pop_aux_loss,
    set_aux_router_training,
    set_routing_mode,
)
from moma_plugin.generation import TokenRules, decode_logits, full_sequence_logits, generate

from .helpers import random_batch, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")
VOCAB, IMAGE = 64, (40, 64)  # ids 40..63 are image codes; 31 begin-of-image, 32 end-of-image, 30 eod
BOI, EOI, EOD = 31, 32, 30
CONFIGS = {"moe": dict(moma_experts="2t2i"), "mod": dict(moma_experts="2t2i", mod_interval=2),
           "dense-mod": dict(moma_experts="dense", mod_interval=2, mod_start_layer=1)}


def _causal_model(kind, sharpen=20.0, threshold=0.5):
    """A 4-layer model with random weights whose aux routers are marked trained. Their fc2 is scaled
    up so that the aux probabilities spread to both sides of the threshold."""
    config = tiny_config(num_layers=4, mod_capacity=0.5, moma_vocab_ranges={"image": IMAGE},
                         **CONFIGS[kind])
    model = tiny_model(config, vocab_size=VOCAB, seq_length=48)
    with torch.no_grad():
        for _, router in aux_routers(model):
            router.fc2.mul_(sharpen)
    mark_aux_routers_trained(model)
    set_routing_mode(model, "causal", threshold)
    model.eval()
    return model


def _processed_shares(model):
    """Per aux-routed unit (each expert, each MoD layer): share of the tokens it took in the forwards
    since the last reset, from the routing metrics buffers."""
    shares = []
    for layer in model.decoder.layers:
        if layer.is_mod:
            processed, seen = layer.mod_tokens_M2.sum(0).tolist()
            shares.append(processed / seen)
        if layer.has_moma_mlp:
            seen = int(layer.mlp.selection_histogram_M3.sum())
            shares.extend((layer.mlp.tokens_per_expert_ME.sum(0) / seen).tolist())
    mp.collect_routing_metrics(model)  # resets the buffers
    return shares


# -- 1. causality --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["moe", "mod"])
def test_causal_logits_ignore_later_tokens_and_other_samples(kind):
    seq, batch = 16, 3
    model = _causal_model(kind)
    tokens, positions, _ = random_batch(batch, seq, vocab_size=VOCAB, seed=11)

    def logits(mode, tok):
        set_routing_mode(model, mode)
        with torch.no_grad():
            return model(tok, positions, None)  # modality ids from the vocab ranges

    base = logits("causal", tokens)
    # Routing is neither all nor nothing: every expert and MoD layer took some tokens, not all.
    shares = _processed_shares(model)
    assert all(0.05 < s < 0.95 for s in shares), shares
    g = torch.Generator().manual_seed(12)
    for t in (0, 5, 11):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, VOCAB, (batch, seq - t - 1), generator=g)
        out = logits("causal", changed)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)
    # Other samples: rewriting samples 1 and 2 entirely leaves sample 0's logits unchanged.
    other = tokens.clone()
    other[1:] = torch.randint(0, VOCAB, (batch - 1, seq), generator=g)
    torch.testing.assert_close(logits("causal", other)[0], base[0], rtol=0, atol=1e-6)

    # The same probe detects expert choice's look-ahead: in train mode an early logit moves.
    t = 5
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(0, VOCAB, (batch, seq - t - 1), generator=g)
    train_base, train_changed = logits("train", tokens), logits("train", changed)
    assert not torch.allclose(train_changed[:, :t + 1], train_base[:, :t + 1], atol=1e-4)


def test_the_threshold_decides_the_routes():
    """Causal routing takes a token iff its aux probability exceeds the threshold: a MoD layer's
    processed share falls as the threshold rises, and matches the aux router's own decisions."""
    model = _causal_model("mod")
    tokens, positions, _ = random_batch(2, 16, vocab_size=VOCAB, seed=13)
    layer = model.decoder.layers[0]
    seen = {}
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x", kw["hidden_states"].detach()), with_kwargs=True)
    shares = []
    try:
        for threshold in (0.1, 0.5, 0.9):
            set_routing_mode(model, "causal", threshold)
            layer.reset_metrics()
            with torch.no_grad():
                model(tokens, positions, None)
                probs = torch.sigmoid(layer.mod_aux_router(seen["x"].reshape(-1, 32)))
            processed = int(layer.mod_tokens_M2[:, 0].sum())
            assert processed == int((probs > threshold).sum())
            shares.append(processed)
    finally:
        hook.remove()
    assert shares[0] > shares[1] > shares[2]


# -- 2. refusal without trained aux routers --------------------------------------------------------
@pytest.mark.parametrize("kind", ["moe", "mod", "dense-mod"])
def test_causal_mode_refuses_untrained_aux_routers(kind):
    config = tiny_config(num_layers=4, **CONFIGS[kind])
    model = tiny_model(config)
    with pytest.raises(RuntimeError, match="moma-train-aux-routers"):
        set_routing_mode(model, "causal")
    # Every router but one trained: still refused, and nothing switched.
    mark_aux_routers_trained(model)
    name, router = next(aux_routers(model))
    router.trained.fill_(False)
    with pytest.raises(RuntimeError, match="moma-train-aux-routers") as error:
        set_routing_mode(model, "causal", 0.3)
    assert name in str(error.value)
    owners = list(mp.aux_router.aux_owners(model))
    assert owners and all(o.routing_mode == "train" and o.aux_threshold == 0.5 for o in owners)
    router.trained.fill_(True)
    set_routing_mode(model, "causal", 0.3)
    assert all(o.routing_mode == "causal" and o.aux_threshold == 0.3 for o in owners)


def test_dense_model_without_mod_may_route_causally():
    model = tiny_model(tiny_config(num_layers=2, moma_experts="dense"))
    assert not list(aux_routers(model))
    tokens, positions, _ = random_batch(2, 16)
    with torch.no_grad():
        before = model(tokens, positions, None)
        set_routing_mode(model, "causal")  # nothing to predict: allowed, and changes nothing
        assert torch.equal(model(tokens, positions, None), before)


# -- 3. KV cache against recomputation -------------------------------------------------------------
RULES = dict(vocab_size=VOCAB, eod_id=EOD, text_ids=torch.arange(0, 32), begin_image_id=BOI,
             end_image_id=EOI, image_range=IMAGE, tokens_per_image=4)
PROMPTS = [[3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [1, 31, 44], [2, 31, 45, 46, 47, 48]]


@pytest.mark.parametrize("kind, threshold", [("moe", 0.5), ("mod", 0.5), ("mod", 0.7),
                                             ("dense-mod", 0.3)])
def test_kv_cache_generation_equals_recomputation(kind, threshold):
    model = _causal_model(kind)
    rules = TokenRules(**RULES)
    cached = generate(model, PROMPTS, rules, 14, use_kv_cache=True, aux_threshold=threshold)
    recomputed = generate(model, PROMPTS, rules, 14, use_kv_cache=False, aux_threshold=threshold)
    assert cached.tokens == recomputed.tokens
    assert cached.stopped == recomputed.stopped
    # The greedy continuations differ between prompts (the test is not comparing constant output).
    assert len({tuple(t) for t in cached.tokens}) > 1


@pytest.mark.parametrize("kind", ["moe", "mod"])
def test_prefill_logits_equal_each_prompt_run_alone(kind):
    """decode_logits on right-padded prompts in one batch, at every real position, against the
    ordinary forward of each prompt on its own (no padding, batch 1), and full_sequence_logits."""
    model = _causal_model(kind)
    length = max(len(p) for p in PROMPTS)
    tokens = torch.zeros(len(PROMPTS), length, dtype=torch.long)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for i, prompt in enumerate(PROMPTS):
        tokens[i, :len(prompt)] = torch.tensor(prompt)
        valid[i, :len(prompt)] = True
    caches = [KVCache(len(PROMPTS), length) for _ in model.decoder.layers]
    cached = decode_logits(model, tokens, valid, torch.arange(length).expand_as(tokens), caches)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            alone = model(torch.tensor([prompt]), torch.arange(len(prompt)).view(1, -1), None)[0]
        torch.testing.assert_close(cached[i, :len(prompt)], alone, rtol=1e-5, atol=1e-5)
    last = valid.sum(1) - 1
    torch.testing.assert_close(cached[torch.arange(len(PROMPTS)), last],
                               full_sequence_logits(model, PROMPTS), rtol=1e-5, atol=1e-5)


# -- 4. a MoD layer caches only what it processed --------------------------------------------------
def test_mod_caches_hold_exactly_the_processed_tokens():
    model = _causal_model("mod")
    batch = len(PROMPTS)
    # Record, per layer, which real tokens each MoD layer's aux router let through at every step.
    expected = {i: torch.zeros(batch, dtype=torch.long) for i, l in enumerate(model.decoder.layers)
                if l.is_mod}
    original = mp.MoMaTransformerLayer._aux_selected

    def counting(self, x_TH, valid_T=None):
        selected = original(self, x_TH, valid_T)
        index = list(model.decoder.layers).index(self)
        expected[index] += torch.bincount(selected % batch, minlength=batch)
        return selected

    caches = [KVCache(batch, 40) for _ in model.decoder.layers]
    mp.MoMaTransformerLayer._aux_selected = counting
    try:
        length = max(len(p) for p in PROMPTS)
        tokens = torch.zeros(batch, length, dtype=torch.long)
        valid = torch.zeros_like(tokens, dtype=torch.bool)
        for i, prompt in enumerate(PROMPTS):
            tokens[i, :len(prompt)] = torch.tensor(prompt)
            valid[i, :len(prompt)] = True
        logits = decode_logits(model, tokens, valid, torch.arange(length).expand_as(tokens), caches)
        fed = valid.sum(1)
        next_token = logits[torch.arange(batch), fed - 1, :32].argmax(-1)
        for _ in range(6):  # greedy steps, one token each; sample 0 stops after two
            alive = torch.ones(batch, dtype=torch.bool)
            alive[0] = bool(fed[0] < len(PROMPTS[0]) + 2)
            step = decode_logits(model, next_token.view(-1, 1), alive.view(-1, 1),
                                 fed.view(-1, 1), caches)[:, 0]
            fed = fed + alive.long()
            next_token = step[:, :32].argmax(-1)
    finally:
        mp.MoMaTransformerLayer._aux_selected = original
    assert fed.tolist() == [3] + [len(p) + 6 for p in PROMPTS[1:]]
    for index, (layer, cache) in enumerate(zip(model.decoder.layers, caches)):
        if layer.is_mod:
            assert torch.equal(cache.lengths, expected[index])
            assert (cache.lengths < fed).any() and (cache.lengths > 0).any()
        else:
            assert torch.equal(cache.lengths, fed)


# -- 5. image spans ---------------------------------------------------------------------------------
@pytest.mark.parametrize("per_image", [1, 3])
def test_every_image_span_is_exactly_tokens_per_image_codes_then_end(per_image):
    """Text may only be begin-of-image, so the stream is images back to back: each begin-of-image is
    followed by exactly ``per_image`` image codes and then end-of-image, also when the prompt stops
    mid-image."""
    model = _causal_model("mod")
    rules = TokenRules(vocab_size=VOCAB, eod_id=EOD, text_ids=torch.tensor([BOI]), begin_image_id=BOI,
                       end_image_id=EOI, image_range=IMAGE, tokens_per_image=per_image)
    prompts = [[1, 2], [1, BOI], [1, BOI, 50]]
    result = generate(model, prompts, rules, 3 * (per_image + 2), temperature=1.0, seed=4)
    for prompt, new in zip(prompts, result.tokens):
        stream = prompt + new
        start = stream.index(BOI)
        spans, i = 0, start
        while i < len(stream):
            assert stream[i] == BOI, stream
            codes = stream[i + 1:i + 1 + per_image]
            assert all(IMAGE[0] <= c < IMAGE[1] for c in codes), stream
            if i + 1 + per_image < len(stream):
                assert stream[i + 1 + per_image] == EOI, stream
                spans += 1
            i += per_image + 2
        assert spans >= 2
    assert result.tokens[0][0] == BOI  # from text, the only text id allowed
    # Sampling happened: the image codes are not all the same.
    codes = [t for new in result.tokens for t in new if IMAGE[0] <= t < IMAGE[1]]
    assert len(set(codes)) > 1


# -- 6. training the aux routers on a frozen model --------------------------------------------------
def test_aux_router_training_beats_all_zeros_and_leaves_the_model_alone():
    config = tiny_config(num_layers=2, mod_interval=2, mod_capacity=0.25, moma_experts="2t2i")
    model = tiny_model(config)
    tokens, positions, ids = random_batch(4, 16, seed=21)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    set_aux_router_training(model, True)
    aux_params = mp.aux_router.aux_router_parameters(model)
    assert aux_params and all(p.requires_grad for p in aux_params)
    assert not frozen.keys() & {n for n, p in model.named_parameters()
                                if any(p is q for q in aux_params)}

    def aux_step():
        model(tokens, positions, None, modality_ids=ids)
        return pop_aux_loss(model)

    # Stop-gradient: the aux loss reaches no main-model parameter (they still require grads).
    loss = aux_step()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux_params)
    before = collect_aux_metrics(model)
    assert {"aux/layer0/text/mod_accuracy", "aux/layer0/image/experts_recall"} <= before.keys()

    optimizer = torch.optim.Adam(aux_params, lr=1e-2)
    first = None
    for _ in range(40):
        optimizer.zero_grad()
        loss = aux_step()
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first
    collect_aux_metrics(model)  # reset: measure the trained routers alone
    with torch.no_grad():
        aux_step()
    after = collect_aux_metrics(model)
    assert after["aux/accuracy"] > after["aux/all_zeros_accuracy"] + 0.05
    assert after["aux/accuracy"] > before["aux/accuracy"]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
