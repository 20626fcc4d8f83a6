"""Mixture-of-Depths layers: exactly k_d tokens processed, skipped tokens untouched and unseen, the packed
fast path against a per-sample reference, layout narrowing against a fresh build, causal routing."""

import math

import pytest
import torch

import moma_plugin as mp
from moma_plugin.aux_router import (
    mark_aux_routers_trained,
    pop_aux_loss,
    set_aux_router_training,
    set_routing_mode,
)
from moma_plugin.layer import pack_by_sample
from moma_plugin.layout import count_ids
from moma_plugin.routing import threshold_choice, threshold_choice_reference

from .helpers import random_batch, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def _mod_layer(model, index=0):
    layer = model.decoder.layers[index]
    assert layer.is_mod
    return layer


def _layer_io(model, layer, batch):
    """Runs the model once; returns (hidden states entering ``layer``, leaving it, its layout)."""
    seen = {}

    def pre(module, args, kwargs):
        seen["in"] = kwargs["hidden_states"].detach().clone()
        seen["layout"] = kwargs["modality_layout"]

    def post(module, args, kwargs, output):
        seen["out"] = output[0].detach().clone()

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True),
               layer.register_forward_hook(post, with_kwargs=True)]
    tokens, positions, modality_ids = batch
    try:
        model(tokens, positions, None, modality_ids=modality_ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen["in"], seen["out"], seen["layout"]


def _selected(layer, hidden_SBH):
    """The tokens the layer's expert choice keeps, recomputed from its router: top k_d by score."""
    x_TH = hidden_SBH.reshape(-1, hidden_SBH.shape[-1])
    scores = torch.sigmoid(x_TH.float() @ layer.mod_router.weight.float().t()).squeeze(1)
    k = math.ceil(x_TH.shape[0] * layer.config.mod_capacity)
    return scores.topk(k).indices.sort().values


@pytest.mark.parametrize("batch, seq, capacity", [(2, 16, 0.25), (3, 10, 0.5), (1, 7, 0.3)])
def test_mod_processes_exactly_kd_tokens_and_leaves_the_rest_bit_identical(batch, seq, capacity):
    model = tiny_model(tiny_config(num_layers=4, mod_interval=2, mod_capacity=capacity), seq_length=seq)
    for index in (0, 2):
        layer = _mod_layer(model, index)
        layer.reset_metrics()
        x, y, _ = _layer_io(model, layer, random_batch(batch, seq, seed=index))
        k_d = math.ceil(batch * seq * capacity)
        assert int(layer.mod_tokens_M2[:, 0].sum()) == k_d
        assert int(layer.mod_tokens_M2[:, 1].sum()) == batch * seq
        x_TH, y_TH = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        changed = (x_TH != y_TH).any(1)
        selected = torch.zeros_like(changed)
        selected[_selected(layer, x)] = True
        assert torch.equal(x_TH[~selected], y_TH[~selected])  # skipped: bit-identical
        assert changed[selected].all()  # processed: changed
        assert int(changed.sum()) == k_d


def test_metrics_report_processed_share_per_modality():
    model = tiny_model(tiny_config(num_layers=2, mod_interval=2, mod_capacity=0.25))
    model(*random_batch(2, 16)[:2], None, modality_ids=random_batch(2, 16)[2])
    metrics = mp.collect_routing_metrics(model)
    layer = model.decoder.layers[0]
    assert set(k for k in metrics if k.startswith("mod/")) == {
        "mod/layer0/text/processed_frac", "mod/layer0/image/processed_frac"}
    assert layer.mod_tokens_M2.sum() == 0  # reset by collecting
    ids = random_batch(2, 16)[2]
    counts = torch.bincount(ids.reshape(-1), minlength=2)
    processed = sum(metrics[f"mod/layer0/{m}/processed_frac"] * counts[i]
                    for i, m in enumerate(("text", "image")))
    assert processed.item() == pytest.approx(8)  # ceil(32 * 0.25)


def test_skipped_tokens_are_not_keys_or_values():
    """Change a skipped token's hidden state entering the MoD layer (keeping the selection): no
    processed token's output moves. Changing a processed token does move later processed tokens."""
    model = tiny_model(tiny_config(num_layers=2, mod_interval=2, mod_capacity=0.25,
                                   moma_experts="dense"), seq_length=16)
    layer = _mod_layer(model)
    batch = random_batch(1, 16, seed=3)
    x, y, layout = _layer_io(model, layer, batch)
    selected = _selected(layer, x)
    positions = torch.arange(16)
    skipped = positions[~torch.isin(positions, selected)]
    # Perturb an early skipped token orthogonally to the router, so the selection cannot change.
    w = layer.mod_router.weight.detach().reshape(-1)
    noise = torch.randn(x.shape[-1])
    noise -= (noise @ w) / (w @ w) * w
    victim = int(skipped[0])
    assert victim < int(selected.max())
    x2 = x.clone()
    x2[victim, 0] += 5 * noise
    with torch.no_grad():
        out = layer(hidden_states=x, attention_mask=None, modality_layout=layout)[0]
        out2 = layer(hidden_states=x2, attention_mask=None, modality_layout=layout)[0]
    assert torch.equal(_selected(layer, x2), selected)
    torch.testing.assert_close(out2[selected, 0], out[selected, 0], rtol=0, atol=1e-6)
    # Contrast: perturbing the first processed token changes the later processed ones.
    x3 = x.clone()
    first = int(selected[0])
    x3[first, 0] += 5 * noise
    with torch.no_grad():
        out3 = layer(hidden_states=x3, attention_mask=None, modality_layout=layout)[0]
    assert not torch.allclose(out3[selected[1:], 0], out[selected[1:], 0], atol=1e-4)


@pytest.mark.parametrize("experts", ["dense", "1t1i"])
def test_packed_mod_layer_matches_a_per_sample_reference(experts):
    """The packed fast path against running the same layer, as a plain layer, on each sample's kept
    tokens alone (one short sequence per sample), then x + r * (out - x). With one expert per group
    and capacity 1 every token goes to its expert, so per-sample runs route the same as the batch."""
    config = tiny_config(num_layers=2, mod_interval=2, mod_capacity=0.4, moma_experts=experts,
                         moma_expert_execution="loop")
    model = tiny_model(config, seq_length=12)
    layer = _mod_layer(model)
    batch = random_batch(3, 12, seed=5)
    x, y, layout = _layer_io(model, layer, batch)
    selected = _selected(layer, x)
    scores = torch.sigmoid(x.reshape(-1, 32) @ layer.mod_router.weight.t()).squeeze(1)
    expected = x.clone()
    layer.is_mod = False  # the plain TransformerLayer path
    try:
        with torch.no_grad():
            for sample in range(3):
                tokens = selected[selected % 3 == sample]  # ascending positions of this sample
                if tokens.numel() == 0:
                    continue
                rows = x.reshape(-1, 32)[tokens].unsqueeze(1)  # [n, 1, H]
                sub_layout = mp.build_modality_layout(layout.modality_ids_T[tokens], 2)
                out = layer(hidden_states=rows, attention_mask=None, modality_layout=sub_layout)[0]
                gate = scores[tokens].unsqueeze(1)
                expected.reshape(-1, 32)[tokens] = rows[:, 0] + gate * (out[:, 0] - rows[:, 0])
    finally:
        layer.is_mod = True
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _pack_by_sample_reference(selected, batch):
    """Obviously correct: walk each sample's selected tokens in order, giving them slots 0, 1, ..."""
    packed_index, counts = {}, [0] * batch
    for sample in range(batch):
        for t in selected:
            if t % batch == sample:
                packed_index[t] = counts[sample] * batch + sample
                counts[sample] += 1
    return [packed_index[t] for t in selected], counts


def test_pack_by_sample_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    cases = [(1, 1, [0]), (3, 2, [5]), (2, 4, [0, 1, 2, 3, 4, 5, 6, 7])]  # one token, all tokens
    for trial in range(40):
        batch, seq = 1 + trial % 5, int(torch.randint(1, 30, (1,), generator=g))
        keep = torch.rand(seq * batch, generator=g) < [0.1, 0.5, 0.9][trial % 3]
        keep[int(torch.randint(0, seq * batch, (1,), generator=g))] = True  # at least one token
        cases.append((batch, seq, keep.nonzero().squeeze(1).tolist()))
    for batch, seq, selected in cases:
        packed_index_K, counts_B = pack_by_sample(torch.tensor(selected), batch)
        expected_index, expected_counts = _pack_by_sample_reference(selected, batch)
        assert packed_index_K.tolist() == expected_index, (batch, seq, selected)
        assert counts_B.tolist() == expected_counts, (batch, seq, selected)


def test_count_ids_matches_bincount():
    g = torch.Generator().manual_seed(1)
    for n, num_ids in [(0, 2), (1, 1), (50, 3), (7, 5)]:
        ids = torch.randint(0, num_ids, (n,), generator=g)
        assert torch.equal(count_ids(ids, num_ids), torch.bincount(ids, minlength=num_ids))


def test_narrowed_layout_equals_a_fresh_build():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        num_modalities = 2 + trial % 3
        ids = torch.randint(0, num_modalities, (int(torch.randint(1, 60, (1,), generator=g)),),
                            generator=g)
        layout = mp.build_modality_layout(ids, num_modalities)
        keep = torch.rand(ids.numel(), generator=g) < 0.4
        selected = keep.nonzero().squeeze(1)
        narrowed = mp.narrow_layout(layout, selected)
        fresh = mp.build_modality_layout(ids[selected], num_modalities)
        assert torch.equal(narrowed.modality_ids_T, fresh.modality_ids_T)
        assert torch.equal(narrowed.order_T, fresh.order_T)
        assert narrowed.counts == fresh.counts
        assert narrowed.forward_id == layout.forward_id


def test_threshold_choice_matches_reference():
    g = torch.Generator().manual_seed(1)
    for tokens, experts in [(1, 1), (7, 3), (40, 8), (0, 2)]:
        chosen = torch.rand(tokens, experts, generator=g) > 0.6
        scores = torch.rand(tokens, experts, generator=g)
        token_A, gate_A, load_E = threshold_choice(chosen, scores)
        ref_tokens, ref_gates, ref_loads = threshold_choice_reference(chosen, scores)
        assert token_A.tolist() == ref_tokens
        assert gate_A.tolist() == pytest.approx(ref_gates)
        assert load_E.tolist() == ref_loads


def test_mod_router_gets_gradients_and_recompute_matches():
    batch = random_batch(2, 16, seed=2)
    results = []
    for recompute in (None, "full"):
        extra = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1) if recompute else {}
        model = tiny_model(tiny_config(num_layers=4, mod_interval=2, moma_post_norm=True,
                                       moma_expert_execution="loop", **extra))
        tokens, positions, ids = batch
        model(tokens, positions, None, labels=tokens, modality_ids=ids).mean().backward()
        grad = model.decoder.layers[2].mod_router.weight.grad
        assert grad is not None and grad.abs().sum() > 0
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        metrics = mp.collect_routing_metrics(model)
        assert metrics["mod/layer0/text/processed_frac"] < 1
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("experts, mod_interval", [("2t2i", 0), ("2t2i", 2), ("dense", 1)])
def test_causal_mode_is_causal_and_train_mode_is_not(experts, mod_interval):
    """Changing tokens after position t leaves logits up to t unchanged in causal mode; expert choice
    over the batch (train mode) does not promise that, and the same change shows it."""
    seq = 16
    model = tiny_model(tiny_config(num_layers=4, moma_experts=experts, mod_interval=mod_interval,
                                   mod_capacity=0.5), seq_length=seq)
    with torch.no_grad():  # aux scores spread around 0.5, so both decisions occur
        for _, router in mp.aux_router.aux_routers(model):
            router.fc2.mul_(40.0)
    mark_aux_routers_trained(model)
    model.eval()
    tokens, positions, ids = random_batch(2, seq, seed=7)
    t = 7
    changed_tokens, changed_ids = tokens.clone(), ids.clone()
    g = torch.Generator().manual_seed(8)
    changed_tokens[:, t + 1:] = torch.randint(0, 64, (2, seq - t - 1), generator=g)
    changed_ids[:, t + 1:] = 1 - ids[:, t + 1:]

    def logits(mode, tok, mods):
        set_routing_mode(model, mode)
        with torch.no_grad():
            return model(tok, positions, None, modality_ids=mods)

    causal = logits("causal", tokens, ids)
    causal_changed = logits("causal", changed_tokens, changed_ids)
    torch.testing.assert_close(causal_changed[:, :t + 1], causal[:, :t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(causal_changed[:, t + 1:], causal[:, t + 1:])
    train = logits("train", tokens, ids)
    train_changed = logits("train", changed_tokens, changed_ids)
    assert not torch.allclose(train_changed[:, :t + 1], train[:, :t + 1], atol=1e-5)
    # Routing really happened in causal mode: some aux decisions were yes, some no.
    x = torch.randn(64, 32)
    decisions = torch.cat([(r(x) > 0).reshape(-1) for _, r in mp.aux_router.aux_routers(model)])
    assert 0 < decisions.float().mean() < 1


def test_only_the_configured_layers_run_the_packed_path_with_kd_tokens(monkeypatch):
    """mod_start_layer=1, interval 2 on 5 layers: layers 1 and 3 (0-based) are MoD, and only they hand
    ``_forward_selected`` their k_d tokens, once per forward."""
    config = tiny_config(num_layers=5, mod_interval=2, mod_start_layer=1, mod_capacity=0.3)
    model = tiny_model(config, seq_length=10)
    assert [layer.is_mod for layer in model.decoder.layers] == [False, True, False, True, False]
    calls = []
    original = mp.MoMaTransformerLayer._forward_selected

    def counting(self, hidden_states, selected_K, *args, **kwargs):
        calls.append((self.layer_number, selected_K.numel(), selected_K.clone()))
        return original(self, hidden_states, selected_K, *args, **kwargs)

    monkeypatch.setattr(mp.MoMaTransformerLayer, "_forward_selected", counting)
    tokens, positions, ids = random_batch(3, 10, seed=9)
    with torch.no_grad():
        model(tokens, positions[:, :10], None, modality_ids=ids)
    k_d = math.ceil(30 * 0.3)
    assert [(number, count) for number, count, _ in calls] == [(2, k_d), (4, k_d)]
    for _, _, selected in calls:  # ascending, distinct flat token indices
        assert torch.equal(selected, selected.unique()) and int(selected.max()) < 30
    metrics = mp.collect_routing_metrics(model)
    assert {k.split("/")[1] for k in metrics if k.startswith("mod/")} == {"layer1", "layer3"}


def test_packed_mod_layer_matches_a_reference_with_expert_choice():
    """Two experts per modality, grouped execution: expert choice then runs over the k_d selected
    tokens of the whole micro-batch. Reference: selection by a Python sort of the router scores,
    attention per sample on its selected tokens alone, then the MLP (expert choice over all selected
    tokens, a layout built afresh) and x + r * (out - x). No packing or narrowing code involved."""
    config = tiny_config(num_layers=2, mod_interval=2, mod_capacity=0.4, moma_experts="2t2i",
                         moma_post_norm=True)
    model = tiny_model(config, seq_length=12)
    layer = _mod_layer(model)
    batch, seq = 3, 11
    tokens, positions, ids = random_batch(batch, seq, seed=6)
    x, y, _ = _layer_io(model, layer, (tokens, positions, ids))
    x_TH = x.reshape(-1, 32)
    with torch.no_grad():
        scores = torch.sigmoid(x_TH @ layer.mod_router.weight.t()).squeeze(1).tolist()
    k_d = math.ceil(batch * seq * 0.4)
    selected = sorted(sorted(range(batch * seq), key=lambda t: -scores[t])[:k_d])
    attended = {}
    layer.is_mod = False
    try:
        with torch.no_grad():
            for sample in range(batch):
                mine = [t for t in selected if t % batch == sample]
                if mine:
                    out, _ = layer._forward_attention(x_TH[mine].unsqueeze(1))
                    attended.update(zip(mine, out[:, 0]))
            y_K1H = torch.stack([attended[t] for t in selected]).unsqueeze(1)
            modality_T = ids.t().reshape(-1)
            layout = mp.build_modality_layout(modality_T[selected], 2)
            with layer.mlp.routing_layout(layout):
                out_K1H = layer._forward_mlp(y_K1H)
    finally:
        layer.is_mod = True
    expected = x_TH.clone()
    for row, t in enumerate(selected):
        expected[t] = x_TH[t] + scores[t] * (out_K1H[row, 0] - x_TH[t])
    torch.testing.assert_close(y.reshape(-1, 32), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True], ids=["torch-checkpoint", "reentrant"])
def test_recompute_counts_mod_metrics_and_aux_losses_once(reentrant, monkeypatch):
    """Full recompute reruns each checkpointed forward in backward (torch's early stop turned off, so
    the rerun goes to the end): the loss, every gradient (the aux routers' included), the raw routing
    and aux counts and the aux losses equal those without it. ``reentrant``: the forward runs without
    gradients, as in Megatron's ``tensor_parallel.checkpoint`` (the GPU path), emulated on the CPU."""
    if reentrant:
        monkeypatch.setattr(mp.MoMaTransformerBlock, "_checkpoint", lambda self, f, h, c:
                            torch.utils.checkpoint.checkpoint(f, h, c, use_reentrant=True))
    tokens, positions, ids = random_batch(2, 16, seed=4)
    counters = ("mod_tokens_M2", "tokens_per_expert_ME", "selection_histogram_M3", "confusion_M4")
    results = []
    for extra in ({}, dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1)):
        model = tiny_model(tiny_config(num_layers=4, mod_interval=2, mod_capacity=0.25,
                                       moma_post_norm=True, **extra))
        set_aux_router_training(model, True)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            loss = model(tokens, positions, None, labels=tokens, modality_ids=ids).mean()
        aux_losses = sum(len(owner._aux_losses) for owner in mp.aux_router.aux_owners(model))
        aux = pop_aux_loss(model)
        (loss + aux).backward()
        leftover = pop_aux_loss(model)  # nothing recorded again by the recompute in backward
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        counts = {n: b.clone() for n, b in model.named_buffers() if n.endswith(counters)}
        results.append((loss.detach(), aux.detach(), aux_losses, leftover, grads, counts))
    (loss0, aux0, n0, left0, grads0, counts0), (loss1, aux1, n1, left1, grads1, counts1) = results
    assert n0 == n1 == 2 + 4 * 2 and left0 is None and left1 is None  # 2 MoD + 4 layers x 2 groups
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(aux1, aux0)
    assert grads0.keys() == grads1.keys()
    assert any("mod_aux_router" in n for n in grads0) and any("mod_router" in n for n in grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    assert counts0.keys() == counts1.keys() and len(counts0) == 2 * 2 + 4 * 4
    for name in counts0:
        assert torch.equal(counts1[name], counts0[name]), name
    assert int(model.decoder.layers[2].mod_tokens_M2[:, 0].sum()) == 8  # ceil(32 * 0.25), once
