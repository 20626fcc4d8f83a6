"""Checkpoints written before the experts' weights were stacked still load, and still resume.

``tests/data/checkpoint_8d57523`` was written by moma_plugin at commit 8d57523 (each expert a Megatron
``MLP`` with its own parameters): ``moma-pretrain`` with the flags in its ``expected.json`` for 2
iterations. ``expected.json`` also records what that old code produced: the names of its optimizer's
parameters in order, and the loss and gradient norm of iterations 3 and 4 when it resumed the checkpoint.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from moma_plugin.experts import stacked_parameter_sources
from moma_plugin.training import checkpointing, loop, resume
from moma_plugin.training.from_checkpoint import args_from_checkpoint, build_from_checkpoint
from moma_plugin.training.initialize import build_optimizer, setup_parallel

OLD = Path(__file__).parent / "data" / "checkpoint_8d57523"
EXPECTED = json.loads((OLD / "expected.json").read_text())


@pytest.fixture(scope="module")
def old_state():
    return checkpointing.load_checkpoint(OLD)


@pytest.fixture(scope="module")
def rebuilt(old_state):
    args = args_from_checkpoint(old_state["args"])
    parallel = setup_parallel(args)
    model, _, _ = build_from_checkpoint(old_state, args, parallel)
    return model, args


def test_every_old_tensor_loads_into_the_stacked_experts(old_state, rebuilt):
    model, _ = rebuilt
    # (Megatron's linears save an ``_extra_state``, None without FP8; the stacked experts have none.)
    new = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    old = {k: v for k, v in old_state["model"].items() if not k.endswith("_extra_state")}
    assert new.keys() == old.keys()  # the same names, one tensor per expert
    for name, tensor in old.items():
        torch.testing.assert_close(new[name], tensor, rtol=0, atol=0, msg=name)
    stacked = dict(model.named_parameters())["decoder.layers.1.mlp.experts.fc1_weight"]
    assert stacked.shape == (4, 64, 16)  # 2t2i: [E, 2F, H]
    torch.testing.assert_close(stacked[3], old["decoder.layers.1.mlp.experts.image.1.linear_fc1.weight"])


def test_old_optimizer_state_is_stacked_expert_by_expert(old_state, rebuilt):
    model, args = rebuilt
    optimizer = build_optimizer(model, args)
    resume.load_optimizer_state(optimizer, model, old_state)
    saved = old_state["optimizer"]
    old_names = EXPECTED["optimizer_parameter_names"]  # recorded by the old code itself
    old_by_name = {name: saved["state"][i] for group, names in zip(saved["param_groups"], old_names)
                   for name, i in zip(names, group["params"]) if i in saved["state"]}
    params = dict(model.named_parameters())
    sources = stacked_parameter_sources(model)
    checked = 0
    for name, param in params.items():
        state = optimizer.state.get(param)
        per_expert = sources.get(name, [name])
        if not any(n in old_by_name for n in per_expert):
            assert not state, name
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            expected = [old_by_name[n][key] for n in per_expert]
            expected = torch.stack(expected) if name in sources else expected[0]
            torch.testing.assert_close(state[key], expected, rtol=0, atol=0, msg=f"{name} {key}")
        assert float(state["step"]) == 2.0
        checked += 1
    assert checked >= 20 and len(sources) == 8  # 2 layers x fc1/fc2 weight and bias
    assert all(g["fused"] for g in optimizer.param_groups)  # this optimizer's kernel, not the saved one's


def test_resuming_the_old_checkpoint_continues_as_the_old_code_did(tmp_path):
    """Same losses and gradient norms as the old code's own resume (fused AdamW and foreach norms
    against its unfused ones: agreement to rounding)."""
    save = tmp_path / "checkpoints"
    shutil.copytree(OLD, save)
    (save / "expected.json").unlink()
    result = loop.pretrain([*EXPECTED["flags"], "--train-iters", str(EXPECTED["resumed_to"]),
                            "--save", str(save), "--run-dir", str(tmp_path / "run"), "--no-progress-bar"])
    assert result.status == "completed" and result.iteration == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = {r["iteration"]: r for r in records if r["kind"] == "train"}
    for iteration, old in EXPECTED["resumed_train_log"].items():
        assert train[int(iteration)]["loss"] == pytest.approx(old["loss"], rel=1e-5), iteration
        assert train[int(iteration)]["grad_norm"] == pytest.approx(old["grad_norm"], rel=1e-4), iteration
