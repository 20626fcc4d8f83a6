"""Expert parallelism: the experts of every modality group split over EP ranks (gloo, 2 and 4
processes), against one process holding every expert."""

import faulthandler
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from moma_plugin.expert_parallel import check_expert_parallel, local_experts
from .conftest import free_port, run_ranks
from .helpers import (moma_mlp, random_batch, run_mlp, sequence_parallel_stand_ins, tiny_config,
                      tiny_model)
from .test_moma_mlp import _inputs

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
        "--no-progress-bar", "--log-interval", "1", "--eval-interval", "100", "--micro-batch-size", "1",
        "--global-batch-size", "8", "--mod-interval", "2", "--mod-capacity", "0.5", "--aux-router-joint",
        "--clip-grad", "0.5"]  # below these runs' gradient norms: every step clips


def test_each_ep_rank_holds_a_block_of_every_group():
    assert local_experts([4, 4], 2, 0) == [0, 1, 4, 5] and local_experts([4, 4], 2, 1) == [2, 3, 6, 7]
    assert local_experts([4, 4], 4, 3) == [3, 7]
    assert local_experts([6, 2], 2, 1) == [3, 4, 5, 7]
    groups = tiny_config(moma_experts="4t4i").moma_expert_groups
    with pytest.raises(ValueError, match=r"3 expert-parallel ranks cannot split the experts of "
                                         r"group\(s\) text \(4\), image \(4\) evenly.*expert count: 1, 2, 4$"):
        check_expert_parallel(groups, 3)
    with pytest.raises(ValueError, match=r"group\(s\) image \(2\) evenly.*expert count: 1, 2$"):
        check_expert_parallel(tiny_config(moma_experts="6t2i").moma_expert_groups, 3)


def _init(rank, world, port, ep, tp=1):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(170, exit=True, file=sys.stderr)
    from megatron.core import parallel_state

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)


def _layer_rank(rank, world, port, experts, modality_weights):
    """Rank r's own tokens through an EP=world layer and through a one-rank layer with every expert
    (the same weights): outputs and input gradients equal; each expert's gradient on its owner equals
    the sum over ranks of the one-rank layer's gradient of that expert."""
    _init(rank, world, port, ep=world)
    config = dict(moma_experts=experts, moma_expert_execution="chunked")
    reference = moma_mlp(tiny_config(**config), seed=3)
    sharded = moma_mlp(tiny_config(**config, expert_model_parallel_size=world), seed=3)
    weights = modality_weights[rank]
    x, ids, target = _inputs(s=16, b=2, seed=10 + rank, modality_weights=weights)
    results = {}
    for name, mlp in (("reference", reference), ("sharded", sharded)):
        inp = x.detach().clone().requires_grad_(True)
        y, _ = run_mlp(mlp, inp, ids)
        (y * target).sum().backward()
        grads = {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None}
        results[name] = (y.detach(), inp.grad, grads)
    (y_ref, dx_ref, g_ref), (y_ep, dx_ep, g_ep) = results["reference"], results["sharded"]
    torch.testing.assert_close(y_ep, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_ep, dx_ref, rtol=1e-5, atol=1e-6)
    held = sharded.experts.ep.owned[rank]
    for name in ("experts.fc1_weight", "experts.fc2_weight"):
        summed = g_ref[name].clone()
        torch.distributed.all_reduce(summed)
        torch.testing.assert_close(g_ep[name], summed[held], rtol=1e-5, atol=1e-6)
    for name, grad in g_ref.items():  # routers and aux routers: this rank's tokens only, as before
        if "experts" not in name:
            torch.testing.assert_close(g_ep[name], grad, rtol=1e-5, atol=1e-6)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world, experts, weights", [
    (2, "4t4i", None),
    (2, "4t4i", [None, [1.0, 0.0]]),  # rank 1 holds text only: its image experts run on nothing
    (2, "6t2i", None),
    (2, "8x", None),  # one shared group
    (4, "4t4i", [None, [0.0, 1.0], None, [1.0, 0.0]]),
])
def test_expert_parallel_layer_equals_one_rank_with_every_expert(tmp_path, world, experts, weights):
    run_ranks(_layer_rank, (world, free_port(), experts, weights or [None] * world), nprocs=world,
              timeout_s=180, what=f"EP {world}, {experts}")


def _mod_model_rank(rank, world, port):
    """A two-layer model whose layers are both Mixture-of-Depths layers (each routes the MoMa MLP of
    its chosen tokens only): rank r's own batch through the EP=world model and through the model with
    every expert, the same weights; logits and the non-expert gradients equal, each expert's gradient
    the sum over ranks of the one-rank model's."""
    _init(rank, world, port, ep=world)
    config = dict(moma_experts="4t4i", mod_interval=1, mod_capacity=0.5, moma_expert_execution="chunked")
    batch = random_batch(2, 16, seed=20 + rank)
    results = {}
    for name, ep in (("reference", 1), ("sharded", world)):
        model = tiny_model(tiny_config(**config, expert_model_parallel_size=ep), seed=5)
        tokens, positions, modality_ids = batch
        logits = model(tokens, positions, None, modality_ids=modality_ids)
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))).sum().backward()
        results[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                           if p.grad is not None}, model)
    (y_ref, g_ref, _), (y_ep, g_ep, model) = results["reference"], results["sharded"]
    torch.testing.assert_close(y_ep, y_ref, rtol=1e-5, atol=1e-5)
    assert g_ep.keys() == g_ref.keys() and any("mod_router" in n for n in g_ep)
    held = model.decoder.layers[0].mlp.experts.ep.owned[rank]
    for name, grad in g_ref.items():
        if name.endswith(("experts.fc1_weight", "experts.fc2_weight")):
            grad = grad.clone()
            torch.distributed.all_reduce(grad)
            grad = grad[held]
        torch.testing.assert_close(g_ep[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.distributed.destroy_process_group()


def test_expert_parallel_mixture_of_depths_model_equals_one_rank():
    run_ranks(_mod_model_rank, (2, free_port()), nprocs=2, timeout_s=180, what="EP 2, MoD model")


def _fsdp2_expert_shards_rank(rank, world, port, workdir):
    """FSDP2 at EP 2 on four ranks: every rank holds half of its EP block's experts (sharded over its
    expert-data-parallel group of two); the experts each rank writes to a checkpoint (its rows)
    cover every expert of every layer once."""
    _init(rank, world, port, ep=1)
    from moma_plugin.training.arguments import batch_sizes, parse_args
    from moma_plugin.training.engines import build_engine
    from moma_plugin.training.initialize import build_model, build_optimizer, load_datasets, setup_parallel

    args = parse_args([*TINY, "--train-iters", "1", "--global-batch-size", "4", "--expert-model-parallel-size",
                       "2", "--use-torch-fsdp2"])
    parallel = setup_parallel(args)
    train_set, _ = load_datasets(args, parallel)
    model, _ = build_model(args, train_set.layout, parallel)
    engine = build_engine(model, args, parallel, batch_sizes(args, parallel.dp), build_optimizer)
    shards, written = {}, []
    for name, param in model.named_parameters():
        if name.endswith(("experts.fc1_weight", "experts.fc2_weight")):
            shards[name] = (param.device_mesh.size(), tuple(param.shape), param.to_local().shape[0])
            written.extend(engine._per_expert(name, param.detach()))
    every = [None] * world
    torch.distributed.all_gather_object(every, written)
    torch.save({"shards": shards, "written": every}, f"{workdir}/shards-{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_the_experts_over_the_expert_data_parallel_group(tmp_path):
    run_ranks(_fsdp2_expert_shards_rank, (4, free_port(), str(tmp_path)), nprocs=4, timeout_s=180,
              what="FSDP2 at EP 2 on 4 ranks")
    result = torch.load(tmp_path / "shards-0.pt")
    assert len(result["shards"]) == 4  # two layers, fc1 and fc2
    for mesh, shape, local_rows in result["shards"].values():
        assert mesh == 2 and shape[0] == 4 and local_rows == 2  # 4t4i at EP 2: 2 text + 2 image each
    written = [name for rank in result["written"] for name in rank]
    assert len(written) == len(set(written)) == 2 * 2 * 8  # (fc1, fc2) x layers x experts
    assert {n.split(".experts.")[1].split(".")[1] for n in written} == {"0", "1", "2", "3"}


# -- the training job: EP against one process, checkpoints across EP sizes ------------------------------
def _argv(name: str, world: int, workdir: str):
    """{name: (world size, argv)}: every run of one global batch of 8 sequences; --eval-iters counts
    one data-parallel rank's micro-batches."""
    base = lambda dp, iters: [*TINY, "--eval-iters", str(8 // dp), "--train-iters", str(iters)]  # noqa: E731
    ep = lambda n: ["--expert-model-parallel-size", str(n)]  # noqa: E731
    fsdp2 = ["--use-torch-fsdp2"]
    zero = lambda stage: ["--deepspeed", "--deepspeed-config",  # noqa: E731
                          str(REPO / f"examples/deepspeed/zero{stage}.json")]
    return {
        # one process, every expert: the reference; and its checkpoint at iteration 2
        "ref": (1, [*base(1, 4), "--no-save"]),
        "ref-half": (1, [*base(1, 4), "--exit-interval", "2", "--save", f"{workdir}/ep1"]),
        # EP 2 straight; stopped at 2 and resumed; resumed from the EP 1 checkpoint
        "ep2": (2, [*base(2, 4), *ep(2), "--no-save"]),
        "ep2-stop": (2, [*base(2, 4), *ep(2), "--exit-interval", "2", "--save", f"{workdir}/ep2"]),
        "ep2-resumed": (2, [*base(2, 4), *ep(2), "--save", f"{workdir}/ep2"]),
        "ep1-to-ep2": (2, [*base(2, 4), *ep(2), "--load", f"{workdir}/ep1", "--save", f"{workdir}/1to2"]),
        # four processes: TP 2 x EP 2, and the EP 2 checkpoint of iteration 2 at EP 4
        "tp2-ep2": (4, [*base(2, 4), *ep(2), "--tensor-model-parallel-size", "2", "--no-save"]),
        # TP 2 x EP 2 stopped at iteration 2, resumed at TP 2 x EP 1 (two processes)
        "tp2-ep2-stop": (4, [*base(2, 4), *ep(2), "--tensor-model-parallel-size", "2", "--exit-interval",
                             "2", "--save", f"{workdir}/tp2ep2"]),
        "tp2-ep2-to-tp2": (2, [*base(1, 4), "--tensor-model-parallel-size", "2", "--load",
                               f"{workdir}/tp2ep2", "--save", f"{workdir}/tp2ep2-to-tp2"]),
        # sequence parallelism (CPU stand-ins for its CUDA-bound calls: tests/helpers.py)
        "tp2-sp": (2, [*base(1, 4), "--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--no-save"]),
        "tp2-sp-fsdp2": (2, [*base(1, 4), "--tensor-model-parallel-size", "2", "--sequence-parallel",
                             "--use-torch-fsdp2", "--no-save"]),
        "tp2-ep2-sp": (4, [*base(2, 4), *ep(2), "--tensor-model-parallel-size", "2",
                           "--sequence-parallel", "--no-save"]),
        "ep2-to-ep4": (4, [*base(4, 4), *ep(4), "--load", f"{workdir}/ep2", "--ckpt-step", "2",
                           "--save", f"{workdir}/2to4"]),
        # one process again: the EP 2 checkpoint with every expert on one rank
        "ep2-to-ep1": (1, [*base(1, 4), "--load", f"{workdir}/ep2", "--ckpt-step", "2",
                           "--save", f"{workdir}/2to1"]),
        # FSDP2 with EP (experts left to EP): straight, on 4 ranks (EP 2 x expert-DP 2), stopped and
        # resumed; its checkpoint (one DCP entry per expert) at EP 4, read whole by ddp at EP 1, and
        # by FSDP2 without EP; the ddp engine's EP 2 checkpoint resumed by FSDP2
        "ep2-fsdp2": (2, [*base(2, 4), *ep(2), *fsdp2, "--no-save"]),
        "ep2-fsdp2-stop": (2, [*base(2, 4), *ep(2), *fsdp2, "--exit-interval", "2",
                               "--save", f"{workdir}/ep2f"]),
        "ep2-fsdp2-resumed": (2, [*base(2, 4), *ep(2), *fsdp2, "--save", f"{workdir}/ep2f"]),
        "ep2-ddp-to-fsdp2": (2, [*base(2, 4), *ep(2), *fsdp2, "--load", f"{workdir}/ep2", "--ckpt-step",
                                 "2", "--save", f"{workdir}/ddp-to-fsdp2"]),
        "ep2-dp4-fsdp2": (4, [*base(4, 4), *ep(2), *fsdp2, "--no-save"]),
        "ep2-dp4-fsdp2-stop": (4, [*base(4, 4), *ep(2), *fsdp2, "--exit-interval", "2",
                                   "--save", f"{workdir}/ep2dp4f"]),
        "ep2-dp4-fsdp2-resumed": (4, [*base(4, 4), *ep(2), *fsdp2, "--save", f"{workdir}/ep2dp4f"]),
        "dp4-fsdp2-bf16": (4, [*base(4, 4), *fsdp2, "--bf16", "--no-save"]),
        "ep2-dp4-fsdp2-bf16": (4, [*base(4, 4), *ep(2), *fsdp2, "--bf16", "--no-save"]),
        # FSDP2 without EP (stacked experts sharded by FSDP2), resumed by FSDP2 at EP 2
        "fsdp2-half": (1, [*base(1, 4), *fsdp2, "--exit-interval", "2", "--save", f"{workdir}/f1"]),
        "fsdp2-to-ep2-fsdp2": (2, [*base(2, 4), *ep(2), *fsdp2, "--load", f"{workdir}/f1", "--save",
                                   f"{workdir}/f1to2"]),
        # ... and at EP 2 x expert-DP 2, where each rank keeps half of its EP block's experts
        "fsdp2-to-ep2-dp4-fsdp2": (4, [*base(4, 4), *ep(2), *fsdp2, "--load", f"{workdir}/f1", "--save",
                                       f"{workdir}/f1to2x2"]),
        "ep2-fsdp2-to-ep4": (4, [*base(4, 4), *ep(4), *fsdp2, "--load", f"{workdir}/ep2f", "--ckpt-step",
                                 "2", "--save", f"{workdir}/f2to4"]),
        "ep2-fsdp2-to-ep1": (1, [*base(1, 4), "--load", f"{workdir}/ep2f", "--ckpt-step", "2",
                                 "--save", f"{workdir}/f2to1"]),
        "ep2-fsdp2-to-fsdp2-ep1": (1, [*base(1, 4), *fsdp2, "--load", f"{workdir}/ep2f", "--ckpt-step",
                                       "2", "--save", f"{workdir}/f2tof1"]),
        # DeepSpeed ZeRO-2 and ZeRO-1 with EP (expert parameter groups over expert-DP), against the
        # same engine without EP (DeepSpeed clips the aux routers with the model): straight, on 4
        # ranks (EP 2 x expert-DP 2), stopped and resumed
        "zero2": (2, [*base(2, 4), *zero(2), "--save", f"{workdir}/z2"]),
        "zero2-bf16": (2, [*base(2, 4), *zero(2), "--bf16", "--no-save"]),
        "ep2-zero2-bf16": (2, [*base(2, 4), *ep(2), *zero(2), "--bf16", "--no-save"]),
        "ep2-zero2-bf16-stop": (2, [*base(2, 4), *ep(2), *zero(2), "--bf16", "--exit-interval", "2",
                                    "--save", f"{workdir}/ep2zb"]),
        "ep2-zero2-bf16-resumed": (2, [*base(2, 4), *ep(2), *zero(2), "--bf16", "--save", f"{workdir}/ep2zb"]),
        "dp4-zero1": (4, [*base(4, 4), *zero(1), "--no-save"]),
        "ep2-zero2": (2, [*base(2, 4), *ep(2), *zero(2), "--no-save"]),
        "ep2-zero2-stop": (2, [*base(2, 4), *ep(2), *zero(2), "--exit-interval", "2",
                               "--save", f"{workdir}/ep2z"]),
        "ep2-zero2-resumed": (2, [*base(2, 4), *ep(2), *zero(2), "--save", f"{workdir}/ep2z"]),
        "ep2-dp4-zero1": (4, [*base(4, 4), *ep(2), *zero(1), "--no-save"]),
        "ep2-dp4-zero1-stop": (4, [*base(4, 4), *ep(2), *zero(1), "--exit-interval", "2",
                                   "--save", f"{workdir}/ep2dp4z"]),
        "ep2-dp4-zero1-resumed": (4, [*base(4, 4), *ep(2), *zero(1), "--save", f"{workdir}/ep2dp4z"]),
        # DeepSpeed's EP 2 checkpoint under DeepSpeed at EP 1: refused (REFUSED)
        "ep2-zero2-to-ep1": (2, [*base(2, 4), *zero(2), "--load", f"{workdir}/ep2z", "--ckpt-step", "2",
                                 "--no-save"]),
        # the FSDP2 EP 2 checkpoint of iteration 2 converted to the single-file layout, resumed by ddp
        "ep2-fsdp2-converted-to-ep1": (1, [*base(1, 4), "--load", f"{workdir}/ep2f-converted",
                                           "--save", f"{workdir}/ep2f-converted"]),
    }


STAGES = [(1, ["ref", "ref-half", "fsdp2-half"]),
          (2, ["ep2", "ep2-stop", "ep2-resumed", "ep1-to-ep2", "tp2-sp", "tp2-sp-fsdp2", "ep2-fsdp2",
               "ep2-fsdp2-stop", "ep2-fsdp2-resumed", "ep2-ddp-to-fsdp2", "fsdp2-to-ep2-fsdp2", "zero2",
               "ep2-zero2", "ep2-zero2-stop", "ep2-zero2-resumed", "ep2-zero2-to-ep1", "zero2-bf16", "ep2-zero2-bf16", "ep2-zero2-bf16-stop",
               "ep2-zero2-bf16-resumed"]),
          (4, ["tp2-ep2", "tp2-ep2-stop", "tp2-ep2-sp", "ep2-to-ep4", "ep2-dp4-fsdp2", "ep2-dp4-fsdp2-stop",
               "ep2-dp4-fsdp2-resumed", "ep2-fsdp2-to-ep4", "fsdp2-to-ep2-dp4-fsdp2", "dp4-fsdp2-bf16", "ep2-dp4-fsdp2-bf16", "dp4-zero1", "ep2-dp4-zero1",
               "ep2-dp4-zero1-stop", "ep2-dp4-zero1-resumed"]),
          (1, ["ep2-to-ep1", "ep2-fsdp2-to-ep1", "ep2-fsdp2-to-fsdp2-ep1", "ep2-fsdp2-converted-to-ep1"]),
          (2, ["tp2-ep2-to-tp2"])]
REFUSED = {"ep2-zero2-to-ep1"}  # runs whose result is the message that refused them


def _pretrain_rank(rank, world, port, workdir, names):
    _init(rank, world, port, ep=1)
    from moma_plugin.training import convert, loop

    results = {}
    for name in names:
        size, argv = _argv(name, world, workdir)[name]
        assert size == world
        print(f"== {world} process(es): {name}", flush=True)
        if name == "ep2-fsdp2-converted-to-ep1":  # moma-convert-checkpoint's function
            convert.convert(f"{workdir}/ep2f", f"{workdir}/ep2f-converted", iteration=2)
        if name in REFUSED:
            with pytest.raises(SystemExit) as refusal:
                loop.pretrain([*argv, "--run-dir", f"{workdir}/runs/{name}"])
            results[name] = str(refusal.value)
            continue
        with sequence_parallel_stand_ins() if "--sequence-parallel" in argv else nullcontext():
            result = loop.pretrain([*argv, "--run-dir", f"{workdir}/runs/{name}"])
        records = [json.loads(line) for line in open(f"{workdir}/runs/{name}/metrics.jsonl")]
        norms = {r["iteration"]: r["grad_norm"] for r in records if r.get("kind") == "train"}
        parameters = json.load(open(f"{workdir}/runs/{name}/run.json"))["num_parameters"]
        results[name] = (result.train_losses, result.status, norms, parameters)
    if rank == 0:
        torch.save(results, f"{workdir}/{names[0]}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ep")
    results = {}
    for world, names in STAGES:
        run_ranks(_pretrain_rank, (world, free_port(), str(workdir), names), nprocs=world, timeout_s=600,
                  what=f"the {world}-process runs {names}")
        results.update(torch.load(workdir / f"{names[0]}.pt"))
    results["workdir"] = workdir
    return results


@pytest.mark.parametrize("name", ["ep2", "tp2-ep2", "tp2-sp", "tp2-sp-fsdp2", "tp2-ep2-sp", "ep2-fsdp2",
                                  "ep2-dp4-fsdp2"])
def test_expert_parallel_training_equals_one_process(ep_runs, name):
    """Per-iteration losses within 1e-5 of one process with every expert (a MoD layer and joint aux
    routers on): the experts' gradients reduced over the expert-data-parallel group, clipping counting
    each expert once; with sequence parallelism, MoMa and MoD layers routing the gathered sequence
    and the norms' gradients summed over the TP group."""
    (reference, _, reference_norms, parameters), (losses, status, norms, counted) = (ep_runs["ref"],
                                                                                    ep_runs[name])
    assert counted == parameters  # the start-of-run count holds every rank's experts
    assert status == "completed" and sorted(losses) == sorted(reference)
    for i, loss in losses.items():
        assert loss == pytest.approx(reference[i], rel=1e-5), (name, i)
        # Adam hides a gradient off by a constant factor from the losses; the norm does not.
        assert norms[i] == pytest.approx(reference_norms[i], rel=1e-5), (name, i)


@pytest.mark.parametrize("name, reference, tolerance", [
    ("ep2-zero2", "zero2", 1e-5), ("ep2-dp4-zero1", "dp4-zero1", 1e-5),
    # bf16: the sums' rounding differs with EP
    ("ep2-zero2-bf16", "zero2-bf16", 2e-3), ("ep2-dp4-fsdp2-bf16", "dp4-fsdp2-bf16", 2e-3)])
def test_expert_parallel_equals_the_same_engine_without_it(ep_runs, name, reference, tolerance):
    """DeepSpeed ZeRO-2 at EP 2 (fp32 and bf16) and ZeRO-1 at EP 2 x expert-DP 2, the experts in
    DeepSpeed's expert parameter groups; FSDP2 in bf16 at EP 2 x expert-DP 2, the experts sharded over
    expert-DP: equal to the same engine without EP (losses and gradient norms; every step clipped).
    The references are the engines', not one process': DeepSpeed clips the aux routers' gradients
    with the model's, and bf16 rounds differently on another number of ranks."""
    (reference, _, reference_norms, parameters), (losses, status, norms, counted) = (ep_runs[reference],
                                                                                    ep_runs[name])
    assert counted == parameters and status == "completed" and sorted(losses) == sorted(reference)
    for i, loss in losses.items():
        assert loss == pytest.approx(reference[i], rel=tolerance), (name, i)
        assert norms[i] == pytest.approx(reference_norms[i], rel=tolerance), (name, i)


def test_a_deepspeed_expert_parallel_checkpoint_holds_every_expert(ep_runs):
    """The rank file of DeepSpeed's EP 2 run holds the weights of every expert, as the run without EP
    holds them (DeepSpeed's own model file holds EP rank 0's only); resuming it at another EP size is
    refused with a message that says what to do."""
    def weights(save):
        path = ep_runs["workdir"] / save / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["model"]

    expert_parallel, whole = weights("ep2z"), weights("z2")
    assert expert_parallel.keys() == whole.keys()
    assert any(".experts.image.3." in key for key in whole)
    for key, value in whole.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(expert_parallel[key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{key}: {m}")
    refusal = ep_runs["ep2-zero2-to-ep1"]
    assert "written by DeepSpeed at EP 2 on 2 data-parallel ranks; this run has EP 1 on 2" in refusal
    assert "--expert-model-parallel-size 2" in refusal and "moma-convert-checkpoint" in refusal


@pytest.mark.parametrize("engine", ["", "-fsdp2", "-dp4-fsdp2", "-zero2", "-dp4-zero1", "-zero2-bf16"])  # -dp4: expert-DP 2
def test_resume_under_expert_parallelism_is_exact(ep_runs, engine):
    straight, stop, resumed = (ep_runs[f"ep2{engine}"][0], ep_runs[f"ep2{engine}-stop"],
                               ep_runs[f"ep2{engine}-resumed"][0])
    assert stop[1] == "exit-interval" and sorted(stop[0]) == [1, 2] and sorted(resumed) == [3, 4]
    assert [resumed[i] for i in (3, 4)] == [straight[i] for i in (3, 4)]


@pytest.mark.parametrize("name", ["ep1-to-ep2", "ep2-to-ep1", "ep2-to-ep4", "ep2-ddp-to-fsdp2",
                                  "ep2-fsdp2-to-ep4", "ep2-fsdp2-to-ep1", "ep2-fsdp2-to-fsdp2-ep1",
                                  "fsdp2-to-ep2-fsdp2", "fsdp2-to-ep2-dp4-fsdp2", "ep2-fsdp2-converted-to-ep1",
                                  "tp2-ep2-to-tp2"])
def test_a_checkpoint_loads_at_another_expert_parallel_size(ep_runs, name):
    """Saved at EP 1 or 2 (or TP 2 x EP 2) after iteration 2 (ddp engine: every expert in the rank
    file; FSDP2: one DCP entry per expert; or converted to the single-file layout), resumed at EP 2, 1
    and 4, by either engine: iterations 3 and 4 as the run that did not stop (1e-5: another number of
    processes)."""
    reference, (losses, status, _, _) = ep_runs["ref"][0], ep_runs[name]
    assert status == "completed" and sorted(losses) == [3, 4]
    for i in (3, 4):
        assert losses[i] == pytest.approx(reference[i], rel=1e-5), (name, i)


@pytest.mark.parametrize("saved", ["ep2", "ep2f", "ep2z"])
def test_generation_and_aux_router_training_read_an_expert_parallel_checkpoint(ep_runs, saved,
                                                                              megatron_single_process):
    """One process, every expert: the EP 2 checkpoint's rank file (ddp, DeepSpeed) or DCP entries
    (FSDP2) hold them all."""
    from moma_plugin.training import aux_routers, generate

    load, out = ep_runs["workdir"] / saved, ep_runs["workdir"] / f"after-{saved}"
    generated = generate.run(["--load", str(load), "--max-new-tokens", "4", "--compare-kv-cache",
                              "--output-dir", str(out / "gen")])
    assert generated["iteration"] == 4 and generated["kv_cache_matches_recompute"] is True
    report = aux_routers.train_aux_routers(["--load", str(load), "--save", str(out / "aux"),
                                            "--train-iters", "1", "--eval-iters", "2"])
    assert report["iteration"] == 4 and (out / "aux" / "iter_0000004" / "aux_routers.json").exists()


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--expert-model-parallel-size", "3", "--moma-experts", "4t4i"],
     "--expert-model-parallel-size 3 with --moma-experts 4t4i: 3 expert-parallel ranks cannot split"),
    (["--expert-model-parallel-size", "2", "--moma-experts", "dense"],
     "a dense model has no experts to split"),
    (["--expert-model-parallel-size", "2", "--deepspeed", "--deepspeed-config",
      str(REPO / "examples/deepspeed/zero3.json")],
     "--expert-model-parallel-size 2 with ZeRO stage 3 ("),
    (["--expert-model-parallel-size", "2", "--deepspeed", "--deepspeed-config", "missing.json"],
     "--deepspeed-config missing.json: no such file"),
    (["--expert-model-parallel-size", "2", "--use-megatron-ddp"],
     "--expert-model-parallel-size 2 with --use-megatron-ddp is not supported yet"),
    (["--expert-model-parallel-size", "0"], "--expert-model-parallel-size must be at least 1"),
])
def test_expert_parallel_flag_errors_are_clear(capsys, flags, message):
    from moma_plugin.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args([*TINY, "--train-iters", "1", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--sequence-parallel", "--seq-length", "63"],
     "--sequence-parallel splits each sequence over the TP ranks: --seq-length 63 is not a multiple of "
     "--tensor-model-parallel-size 2"),
])
def test_sequence_parallel_flag_errors_are_clear(capsys, flags, message):
    from moma_plugin.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args([*TINY, "--train-iters", "1", "--tensor-model-parallel-size", "2", *flags])
    assert message in capsys.readouterr().err


def test_sequence_parallel_without_cuda_says_so(tmp_path):
    """On a machine without CUDA the job stops before it starts, saying why; without tensor
    parallelism the flag does nothing and is turned off."""
    from moma_plugin.training import loop
    from moma_plugin.training.arguments import parse_args

    assert parse_args([*TINY, "--train-iters", "1", "--sequence-parallel"]).sequence_parallel is False

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="--sequence-parallel needs CUDA: Megatron-Core's sequence-parallel "
                                         "communication allocates its buffers on the current CUDA device"):
        loop.pretrain([*TINY, "--train-iters", "1", "--no-save", "--tensor-model-parallel-size", "2",
                       "--sequence-parallel", "--run-dir", str(tmp_path / "run")])


def test_more_expert_parallel_ranks_than_data_parallel_ranks_is_refused(megatron_single_process, tmp_path):
    from moma_plugin.training import loop

    with pytest.raises(SystemExit, match="--expert-model-parallel-size 2 does not divide the 1 "
                                         "data-parallel ranks"):
        loop.pretrain([*TINY, "--train-iters", "1", "--no-save", "--expert-model-parallel-size", "2",
                       "--run-dir", str(tmp_path / "run")])
