"""The MoMa MLP: expert choice inside modality groups, the expert executions against the reference
loop and the loop against a row-by-row definition, stacked weights in per-expert checkpoints, and
the dense-MLP oracle."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules

import moma_plugin.experts as experts_module
import moma_plugin.moma_mlp as moma_mlp_module
from moma_plugin.config import expert_capacity
from moma_plugin.experts import (
    expert_of_each_row,
    run_experts_chunked,
    run_experts_grouped,
    run_experts_loop,
    run_experts_padded,
)

from .helpers import moma_mlp, run_mlp, tiny_config

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def _inputs(s=24, b=3, hidden=32, num_modalities=2, seed=0, modality_weights=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, hidden, generator=g, requires_grad=True)
    if modality_weights is None:
        ids = torch.randint(0, num_modalities, (s, b), generator=g)
    else:
        ids = torch.multinomial(torch.tensor(modality_weights), s * b, replacement=True,
                                generator=g).view(s, b)
    target = torch.randn(s, b, hidden, generator=g)
    return x, ids, target


def _forward_backward(mlp, x, ids, target):
    x = x.detach().clone().requires_grad_(True)
    out, _ = run_mlp(mlp, x, ids)
    (out * target).sum().backward()  # a real loss: _grouped_mm's backward rejects stride-0 grads
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


CONFIGS = [
    dict(moma_experts="4t4i"),
    dict(moma_experts="7t1i"),
    dict(moma_experts="8x"),
    dict(moma_experts="2t1i3s", moma_modalities=("text", "image", "speech")),
    dict(moma_experts="4t4i", add_bias_linear=True),
    dict(moma_experts="2t2i", moma_capacity_factor=2.0),
    dict(moma_experts="4t4i", moma_force_balanced_routing=True),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("execution", ["chunked", "grouped", "padded", "auto"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_paths_match_reference_loop(overrides, execution, seed):
    loop = moma_mlp(tiny_config(moma_expert_execution="loop", **overrides), seed=seed)
    fast = moma_mlp(tiny_config(moma_expert_execution=execution, **overrides), seed=seed)
    x, ids, target = _inputs(num_modalities=loop.config.num_modalities, seed=seed)
    ref_out, ref_dx, ref_grads = _forward_backward(loop, x, ids, target)
    out, dx, grads = _forward_backward(fast, x, ids, target)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def _row_by_row(x_AH, tokens_per_expert, experts):
    """The definition, in float64: row r of expert e is W2_e (silu(gate_e(x_r)) * up_e(x_r)) + b2_e."""
    expert_A = expert_of_each_row(tokens_per_expert, x_AH.device)
    rows = []
    for x_H, e in zip(x_AH.double(), expert_A.tolist()):
        h = experts.fc1_weight[e].double() @ x_H
        if experts.fc1_bias is not None:
            h = h + experts.fc1_bias[e].double()
        gate, up = h.chunk(2)
        y = experts.fc2_weight[e].double() @ (torch.nn.functional.silu(gate) * up)
        rows.append(y + experts.fc2_bias[e].double() if experts.fc2_bias is not None else y)
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("loads", [[3, 0, 5, 1], [4, 4, 4, 4], [0, 0, 0, 7]])
def test_every_execution_matches_the_row_by_row_definition(bias, loads):
    """Random weights (biases too) and uneven loads, idle experts included."""
    mlp = moma_mlp(tiny_config(moma_experts="2t2i", add_bias_linear=bias))
    experts = mlp.experts
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    x_AH = torch.randn(sum(loads), 32, generator=torch.Generator().manual_seed(3))
    expected = _row_by_row(x_AH, loads, experts).float()
    target_AH = torch.randn(sum(loads), 32, generator=torch.Generator().manual_seed(4))
    gradients = {}
    for run in (run_experts_loop, run_experts_chunked, run_experts_grouped, run_experts_padded):
        x = x_AH.clone().requires_grad_(True)
        out = run(x, loads, experts)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=run.__name__)
        grads = torch.autograd.grad((out * target_AH).sum(), [x, *experts.parameters()])
        gradients[run.__name__] = grads
    for name, grads in gradients.items():  # against autograd through the reference loop
        for got, want in zip(grads, gradients["run_experts_loop"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_grouped_path_uses_grouped_mm(monkeypatch):
    calls = []
    original = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    mlp = moma_mlp(tiny_config(moma_experts="4t4i", moma_expert_execution="grouped"))
    x, ids, target = _inputs()
    run_mlp(mlp, x, ids)
    assert len(calls) == 2  # fc1 and fc2, all experts at once


@pytest.mark.parametrize("seq, expected", [(24, "grouped"), (400, "chunked")])
def test_auto_on_cpu_runs_chunked_unless_experts_get_few_tokens(seq, expected, monkeypatch):
    """The rule of moma_plugin.experts.choose_execution on CPU: chunked, or grouped below
    CHUNKED_MIN_TOKENS_PER_EXPERT tokens per expert (24 x 3 tokens: 9 per expert; 400 x 3: 150)."""
    calls = []
    for name in ("run_experts_chunked", "run_experts_grouped"):
        original = getattr(experts_module, name)
        monkeypatch.setattr(experts_module, name, lambda *a, n=name, f=original: calls.append(n) or f(*a))
    mlp = moma_mlp(tiny_config(moma_experts="4t4i"))
    assert mlp.config.moma_expert_execution == "auto"
    run_mlp(mlp, *_inputs(s=seq)[:2])
    assert calls == [f"run_experts_{expected}"]


def test_odd_hidden_size_falls_back_to_padded_path():
    # 30 * 4 bytes is not a multiple of 16: _grouped_mm cannot take it.
    loop = moma_mlp(tiny_config(hidden_size=30, num_attention_heads=2, ffn_hidden_size=50,
                                moma_expert_execution="loop"))
    fast = moma_mlp(tiny_config(hidden_size=30, num_attention_heads=2, ffn_hidden_size=50,
                                moma_expert_execution="grouped"))
    x, ids, target = _inputs(hidden=30)
    torch.testing.assert_close(_forward_backward(fast, x, ids, target)[0],
                               _forward_backward(loop, x, ids, target)[0])


@pytest.mark.parametrize("experts", ["4t4i", "6t2i", "1t1i"])
def test_each_expert_takes_exactly_its_capacity_of_its_own_modality(experts):
    mlp = moma_mlp(tiny_config(moma_experts=experts))
    x, ids, _ = _inputs(s=40, b=2, modality_weights=[0.7, 0.3])
    layout = run_mlp(mlp, x, ids)[1]
    plan = mlp.route(x.reshape(-1, 32), layout)
    chosen = torch.split(plan.token_index_A, plan.tokens_per_expert)
    modality_T = ids.reshape(-1)
    expert = 0
    for group in mlp.groups:
        k_e = expert_capacity(layout.counts[group.modalities[0]], group.num_experts, 1.0)
        for _ in range(group.num_experts):
            tokens = chosen[expert]
            assert tokens.numel() == k_e
            assert tokens.unique().numel() == k_e  # no token twice in one expert
            assert (modality_T[tokens] == group.modalities[0]).all()
            expert += 1


def test_capacity_larger_than_modality_is_capped():
    mlp = moma_mlp(tiny_config(moma_experts="1t1i", moma_capacity_factor=4.0))
    x, ids, target = _inputs(s=8, b=1)
    out, layout = run_mlp(mlp, x, ids)
    plan = mlp.route(x.reshape(-1, 32), layout)
    assert plan.tokens_per_expert == list(layout.counts)  # every token of its modality, once


def test_modality_absent_from_micro_batch_still_runs_every_expert():
    mlp = moma_mlp(tiny_config(moma_experts="2t2i"))
    x, _, target = _inputs(s=12, b=2)
    ids = torch.zeros(12, 2, dtype=torch.long)  # text only
    out, dx, grads = _forward_backward(mlp, x, ids, target)
    assert torch.isfinite(out).all()
    for name, p in mlp.named_parameters():
        if "aux_router" in name:  # trained by their own loss only (moma_plugin.aux_router)
            assert not p.requires_grad and p.grad is None, name
            continue
        assert p.grad is not None, name  # an idle expert still gets a (zero) gradient
    image_experts = grads["experts.fc1_weight"][2:]  # text 0, 1, then image 0, 1
    assert image_experts.abs().sum() == 0
    assert grads["experts.fc1_weight"][:2].abs().sum() > 0


def test_shared_experts_route_across_modalities():
    mlp = moma_mlp(tiny_config(moma_experts="8x"))
    x, ids, _ = _inputs(s=32, b=2)
    layout = run_mlp(mlp, x, ids)[1]
    plan = mlp.route(x.reshape(-1, 32), layout)
    per_expert = torch.split(plan.token_index_A, plan.tokens_per_expert)
    assert plan.tokens_per_expert == [8] * 8  # ceil(64 / 8)
    mixed = [ids.reshape(-1)[t].unique().numel() == 2 for t in per_expert]
    assert any(mixed)
    assert [n for n, _ in mlp.named_parameters()][0] == "router.shared.weight"


def test_checkpoint_names_carry_the_modality_and_the_expert():
    mlp = moma_mlp(tiny_config(moma_experts="2t3i", add_bias_linear=True))
    names = {n for n, _ in mlp.named_parameters()}
    assert "router.text.weight" in names and "router.image.weight" in names
    assert {"experts.fc1_weight", "experts.fc2_weight", "experts.fc1_bias", "experts.fc2_bias"} < names
    state = mlp.state_dict()
    experts = sorted(k for k in state if k.startswith("experts."))
    assert experts == sorted(f"experts.{g}.{i}.linear_fc{n}.{kind}" for g, count in (("text", 2), ("image", 3))
                             for i in range(count) for n in (1, 2) for kind in ("weight", "bias"))
    torch.testing.assert_close(state["experts.image.2.linear_fc1.weight"], mlp.experts.fc1_weight[4])
    torch.testing.assert_close(state["experts.text.1.linear_fc2.bias"], mlp.experts.fc2_bias[1])


def test_state_dict_round_trip_and_errors():
    source = moma_mlp(tiny_config(moma_experts="2t2i", add_bias_linear=True), seed=1)
    target = moma_mlp(tiny_config(moma_experts="2t2i", add_bias_linear=True), seed=2)
    state = source.state_dict()
    target.load_state_dict(state)
    for name, p in source.named_parameters():
        torch.testing.assert_close(dict(target.named_parameters())[name], p, rtol=0, atol=0)
    x, ids, target_grad = _inputs()
    torch.testing.assert_close(run_mlp(target, x, ids)[0], run_mlp(source, x, ids)[0])
    # One expert missing, one extra, one of the wrong shape: each reported by name.
    broken = dict(state)
    del broken["experts.image.1.linear_fc2.weight"]
    broken["experts.image.7.linear_fc1.weight"] = state["experts.text.0.linear_fc1.weight"]
    result = target.load_state_dict(broken, strict=False)
    assert result.missing_keys == ["experts.image.1.linear_fc2.weight"]
    assert result.unexpected_keys == ["experts.image.7.linear_fc1.weight"]
    wrong = dict(state, **{"experts.text.1.linear_fc1.weight": torch.zeros(3, 32)})
    with pytest.raises(RuntimeError, match=r"size mismatch for experts\.text\.1\.linear_fc1\.weight"):
        target.load_state_dict(wrong)


def test_oracle_one_expert_per_modality_equals_dense_mlp(monkeypatch):
    """1t1i with both experts holding the dense MLP's weights and gates forced to 1 == dense MLP."""
    config = tiny_config(moma_experts="1t1i", add_bias_linear=True)
    dense = MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                ffn_hidden_size=config.ffn_hidden_size)
    for execution in ("loop", "chunked", "grouped", "padded"):
        config.moma_expert_execution = execution
        mlp = moma_mlp(config)
        mlp.experts.load_state_dict({f"{expert}.{key}": value for expert in ("text.0", "image.0")
                                     for key, value in dense.state_dict().items()})
        monkeypatch.setattr(moma_mlp_module, "sigmoid_scores",
                            lambda logits, noise: torch.ones_like(logits.float()))
        x, ids, target = _inputs()
        dense.zero_grad()
        x_dense = x.detach().clone().requires_grad_(True)
        y, bias = dense(x_dense)
        ((y + bias) * target).sum().backward()
        out, dx, grads = _forward_backward(mlp, x, ids, target)
        torch.testing.assert_close(out, (y + bias).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, x_dense.grad, rtol=1e-5, atol=1e-5)
        for name, p in dense.named_parameters():
            # Each token went to exactly one of the two copies: their gradients add up to dense's.
            stacked = "experts." + name.replace("linear_", "").replace(".", "_")
            summed = grads[stacked][0] + grads[stacked][1]
            torch.testing.assert_close(summed, p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_metrics_record_loads_and_selection_histogram():
    mlp = moma_mlp(tiny_config(moma_experts="2t2i"))
    x, ids, _ = _inputs(s=20, b=2)
    layout = run_mlp(mlp, x, ids)[1]
    loads = mlp.tokens_per_expert_ME
    histogram = mlp.selection_histogram_M3
    assert histogram.sum(1).tolist() == list(layout.counts)
    caps = [expert_capacity(c, 2, 1.0) for c in layout.counts]
    assert loads.sum(0).tolist() == [caps[0]] * 2 + [caps[1]] * 2
    assert loads[1, :2].sum() == 0 and loads[0, 2:].sum() == 0  # no cross-modality assignments
    # Picks per token add up to the assignments.
    assert (histogram[:, 1] + 2 * histogram[:, 2]).sum() <= loads.sum()
    assert (histogram[:, 1] + histogram[:, 2]).sum() > 0
    mlp.reset_metrics()
    assert mlp.tokens_per_expert_ME.sum() == 0


@pytest.mark.parametrize("execution", ["loop", "chunked", "grouped", "padded"])
def test_bf16_executions_close_to_fp32_reference(execution):
    loop = moma_mlp(tiny_config(moma_expert_execution="loop"))
    fast = moma_mlp(tiny_config(moma_expert_execution=execution)).to(torch.bfloat16)
    x, ids, _ = _inputs()
    ref = run_mlp(loop, x.detach(), ids)[0]
    out = run_mlp(fast, x.detach().bfloat16(), ids)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_missing_layout_is_a_clear_error():
    mlp = moma_mlp(tiny_config())
    with pytest.raises(RuntimeError, match="no modality layout.*MoMaGPTModel"):
        mlp(torch.randn(4, 1, 32))


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_accumulates_into_existing_gradients_like_autograd(bias):
    """Gradient accumulation over micro-batches: the chunked backward writes into the .grad the
    training loop keeps; the sums equal those autograd accumulates through the reference loop."""
    results = {}
    for execution in ("loop", "chunked"):
        mlp = moma_mlp(tiny_config(moma_expert_execution=execution, add_bias_linear=bias))
        for seed in (0, 1, 2):
            x, ids, target = _inputs(seed=seed)
            out, _ = run_mlp(mlp, x, ids)
            (out * target).sum().backward()
        results[execution] = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
    assert results["chunked"].keys() == results["loop"].keys()
    for name, grad in results["chunked"].items():
        torch.testing.assert_close(grad, results["loop"][name], rtol=1e-5, atol=1e-5, msg=name)
