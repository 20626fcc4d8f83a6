"""The data-parallel engines (ddp, FSDP2, DeepSpeed ZeRO 1/2/3) on two gloo processes: no hang when one
rank's micro-batches hold no image (or no text) tokens, 2-process runs equal to 1-process runs of the
same global batches, exact resume, bf16, and the bad flag combinations."""

import faulthandler
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from moma_plugin.training import loop
from moma_plugin.training.arguments import batch_sizes, parse_args

from .conftest import free_port, run_ranks

pytest.importorskip("deepspeed", reason="the DeepSpeed engine's tests need `pip install moma_plugin[deepspeed]`")
from moma_plugin.training.engines.deepspeed import fp16_supported  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
        "--no-progress-bar", "--log-interval", "1", "--eval-interval", "100"]
MOD_JOINT = ["--mod-interval", "2", "--mod-capacity", "0.5", "--aux-router-joint"]
DS = ["--deepspeed", "--deepspeed-config"]
ENGINES = {
    "ddp": [],
    "fsdp2": ["--use-torch-fsdp2"],
    "zero1": [*DS, str(REPO / "examples/deepspeed/zero1.json")],
    "zero2": [*DS, str(REPO / "examples/deepspeed/zero2.json")],
    "zero3": [*DS, str(REPO / "examples/deepspeed/zero3.json")],
}


def _init_rank(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    # A hang shows every thread's stack instead of only the harness's timeout.
    faulthandler.dump_traceback_later(240, exit=True, file=sys.stderr)


# -- no hang when a rank holds no tokens of a modality ----------------------------------------------
STEPS, MICRO, SEQ = 3, 2, 64


def synthetic_batch(layout, modality: str, seed: int):
    """A micro-batch of MICRO samples whose tokens (and labels) are all of ``modality``."""
    g = torch.Generator().manual_seed(seed)
    low, high = (0, layout.text_size) if modality == "text" else layout.range_of(modality)
    window = torch.randint(low, high, (MICRO, SEQ + 1), generator=g)
    return {"tokens": window[:, :-1], "labels": window[:, 1:],
            "loss_mask": torch.ones(MICRO, SEQ), "position_ids": torch.arange(SEQ).expand(MICRO, SEQ),
            "modality_ids": torch.full((MICRO, SEQ), layout.modalities.index(modality))}


def global_batches(train_set, layout, starved: str):
    """Per step, the global batch's four micro-batches: rank 0's two (real interleaved samples, both
    modalities), then rank 1's two, which hold only the other modality than ``starved``."""
    from moma_plugin.training.step import collate

    only = "text" if starved == "image" else "image"
    steps = []
    for step in range(STEPS):
        real = [collate([train_set[8 * step + 2 * i + j] for j in range(MICRO)]) for i in range(2)]
        steps.append(real + [synthetic_batch(layout, only, 100 * step + i) for i in range(2)])
    return steps


def _no_hang_rank(rank, world, port, workdir, name, engine_flags, starved):
    _init_rank(rank, world, port)
    from moma_plugin.aux_router import set_aux_router_training
    from moma_plugin.training.engines import build_engine
    from moma_plugin.training.initialize import (build_model, build_optimizer, load_datasets,
                                                 seed_everything, setup_parallel)
    from moma_plugin.training.metrics_log import mean_loss
    from moma_plugin.training.step import train_step

    args = parse_args([*TINY, *MOD_JOINT, "--micro-batch-size", str(MICRO), "--global-batch-size",
                       str(4 * MICRO), "--clip-grad", "0", *engine_flags])
    parallel = setup_parallel(args)
    num_micro = batch_sizes(args, parallel.dp)
    seed_everything(args.seed)
    train_set, _ = load_datasets(args, parallel)
    layout = train_set.layout
    model, _ = build_model(args, layout, parallel)
    set_aux_router_training(model, True)
    engine = build_engine(model, args, parallel, num_micro, build_optimizer)
    losses = []
    for micro_batches in global_batches(train_set, layout, starved):
        mine = micro_batches[rank * num_micro:(rank + 1) * num_micro]
        sums, _, finite = train_step(engine, mine, layout, args, parallel)
        assert finite
        losses.append(mean_loss(sums))
    state = {k: v.float() for k, v in engine.full_model_state_dict().items() if torch.is_tensor(v)}
    torch.save({"losses": losses, "state": state}, f"{workdir}/{name}-{starved}-{world}-{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("starved", ["image", "text"])
def test_a_rank_without_tokens_of_one_modality_never_hangs(tmp_path, starved):
    """Rank 1's micro-batches hold no image tokens (then no text tokens), with MoD and jointly
    trained aux routers. Under every engine the steps complete within the timeout, and the full
    parameters afterwards (gathered for FSDP2 and ZeRO-3) are equal on both ranks and equal those of
    one process that trained on the same global batches (its four micro-batches accumulated)."""
    run_ranks(_no_hang_rank, (1, free_port(), str(tmp_path), "reference", [], starved), nprocs=1,
              what="the one-process reference")
    reference = torch.load(tmp_path / f"reference-{starved}-1-0.pt")
    for name, flags in ENGINES.items():
        run_ranks(_no_hang_rank, (2, free_port(), str(tmp_path), name, flags, starved), timeout_s=240,
                  what=f"{name} with rank 1 holding no {starved} tokens")
        ranks = [torch.load(tmp_path / f"{name}-{starved}-2-{rank}.pt") for rank in range(2)]
        for rank, result in enumerate(ranks):
            assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5), (name, rank)
            assert result["state"].keys() == reference["state"].keys()
            for key, value in result["state"].items():
                # Sums in another order: rounding, which Adam's g / sqrt(v) amplifies where a gradient
                # is near zero; 1e-5 is 0.3% of one step's update at --lr 3e-3.
                torch.testing.assert_close(value, reference["state"][key], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{name} rank {rank} {key}: {m}")
        for key, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][key]), (name, key)


# -- 2 processes equal 1 process; exact resume; checkpoints across engines -----------------------------
COMMON = [*TINY, "--micro-batch-size", "2", "--global-batch-size", "8", "--eval-iters", "2"]
RECOMPUTE = ["--recompute-granularity", "full"]
BF16_ENGINES = ("ddp", "fsdp2", "zero2")
FP16 = fp16_supported()  # this CPU's


def _runs(world: int, workdir: str):
    """{name: pretrain argv} of the runs compared (the same on one process, except --eval-iters,
    which counts one rank's micro-batches, and the resume runs, which only the 2-process job does)."""
    evals = ["--eval-iters", str(2 * (3 - world))]
    runs = {}
    for name, flags in ENGINES.items():
        runs[f"{name}-mod"] = [*COMMON, *evals, *MOD_JOINT, *flags, "--train-iters", "4",
                               "--save", f"{workdir}/{world}/{name}-mod"]
        runs[f"{name}-recompute"] = [*COMMON, *evals, *RECOMPUTE, *flags, "--train-iters", "3", "--no-save"]
        if name in BF16_ENGINES:
            runs[f"{name}-bf16"] = [*COMMON, *evals, "--bf16", *flags, "--train-iters", "3", "--no-save"]
        if name == "zero2" and FP16:  # fp16 with DeepSpeed's dynamic loss scaling
            runs[f"{name}-fp16"] = [*COMMON, *evals, "--fp16", *flags, "--train-iters", "3", "--no-save"]
        if name == "fsdp2":  # a 2-D mesh on two processes: TP 2 x DP 1 (the reference: TP 1)
            tp = ["--tensor-model-parallel-size", "2", "--global-batch-size", "4"] if world == 2 else \
                ["--global-batch-size", "4"]
            runs[f"{name}-tp"] = [*COMMON, *MOD_JOINT, *flags, *tp, "--train-iters", "3", "--no-save"]
        if world == 2:  # stopped at iteration 2, then the same command again resumes
            resumed = [*COMMON, *MOD_JOINT, *flags, "--train-iters", "4", "--save", f"{workdir}/{name}-resume"]
            runs[f"{name}-stop"] = [*resumed, "--exit-interval", "2"]
            runs[f"{name}-resumed"] = resumed
    if world == 1:  # an FSDP2 checkpoint of one process, resumed by two (DCP reshards it)
        runs["fsdp2-half"] = [*COMMON, *evals, *MOD_JOINT, *ENGINES["fsdp2"], "--train-iters", "4",
                              "--exit-interval", "2", "--save", f"{workdir}/1/fsdp2-half"]
    else:
        runs["fsdp2-1to2"] = [*COMMON, *MOD_JOINT, *ENGINES["fsdp2"], "--train-iters", "4",
                              "--load", f"{workdir}/1/fsdp2-half", "--save", f"{workdir}/fsdp2-1to2"]
    # A ddp checkpoint resumed by FSDP2 and the other way round (one checkpoint layout).
    if world == 2:
        for first, then in (("ddp", "fsdp2"), ("fsdp2", "ddp")):
            save = [*COMMON, *MOD_JOINT, "--train-iters", "4", "--save", f"{workdir}/{first}-to-{then}"]
            runs[f"{first}-to-{then}-stop"] = [*save, *ENGINES[first], "--exit-interval", "2"]
            runs[f"{first}-to-{then}"] = [*save, *ENGINES[then]]
    return runs


def _pretrain_rank(rank, world, port, workdir):
    _init_rank(rank, world, port)
    results = {}
    for name, argv in _runs(world, workdir).items():
        print(f"== {world} process(es): {name}", flush=True)
        result = loop.pretrain([*argv, "--run-dir", f"{workdir}/{world}/runs/{name}"])
        results[name] = (result.train_losses, result.eval, result.status)
    torch.save(results, f"{workdir}/pretrain-{world}-{rank}.pt")
    torch.distributed.destroy_process_group()


def _after_rank(rank, world, port, workdir):
    """One process, on the two-process runs' checkpoints: the FSDP2 one of iteration 2 resumed by
    FSDP2 (2 -> 1 ranks), read whole by ddp, converted and resumed by ddp; generation and aux-router
    training from the FSDP2 and ZeRO-3 ones."""
    _init_rank(rank, world, port)
    from moma_plugin.training import aux_routers, convert, generate

    sharded = f"{workdir}/fsdp2-resume"
    resumed = [*COMMON, "--eval-iters", "4", *MOD_JOINT, "--train-iters", "4", "--ckpt-step", "2"]
    convert.convert(sharded, f"{workdir}/converted", iteration=2)
    runs = {"fsdp2-2to1": [*resumed, *ENGINES["fsdp2"], "--load", sharded, "--save", f"{workdir}/2to1"],
            "dcp-ddp": [*resumed, "--load", sharded, "--save", f"{workdir}/dcp-ddp"],
            "converted-ddp": [*resumed, "--load", f"{workdir}/converted", "--save", f"{workdir}/converted"]}
    results = {}
    for name, argv in runs.items():
        result = loop.pretrain([*argv, "--run-dir", f"{workdir}/after/runs/{name}"])
        results[name] = (result.train_losses, result.eval, result.status)
    for engine in ("fsdp2", "zero3"):
        load = f"{workdir}/2/{engine}-mod"
        results[f"generate-{engine}"] = generate.run(
            ["--load", load, "--max-new-tokens", "6", "--compare-kv-cache",
             "--output-dir", f"{workdir}/after/gen-{engine}"])
        results[f"aux-{engine}"] = aux_routers.train_aux_routers(
            ["--load", load, "--save", f"{workdir}/after/aux-{engine}", "--train-iters", "2",
             "--log-interval", "1", "--eval-iters", "2"])
    torch.save(results, f"{workdir}/after.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def pretrain_results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("engines")
    run_ranks(_pretrain_rank, (1, free_port(), str(workdir)), nprocs=1, timeout_s=600,
              what="the one-process runs")
    run_ranks(_pretrain_rank, (2, free_port(), str(workdir)), nprocs=2, timeout_s=900,
              what="the two-process runs")
    run_ranks(_after_rank, (1, free_port(), str(workdir)), nprocs=1, timeout_s=600,
              what="the one-process runs on the two-process checkpoints")
    results = {world: [torch.load(workdir / f"pretrain-{world}-{rank}.pt") for rank in range(world)]
               for world in (1, 2)}
    results["after"] = torch.load(workdir / "after.pt", weights_only=False)
    results["workdir"] = workdir
    return results


CASES = [(engine, kind) for engine in ENGINES for kind in ("mod", "recompute")] + \
    [(engine, "bf16") for engine in BF16_ENGINES] + [("fsdp2", "tp"), pytest.param(
        "zero2", "fp16", marks=pytest.mark.skipif(not FP16, reason="DeepSpeed takes fp16 on CPUs with "
                                                                     "AVX-512 FP16 or AMX-FP16 only"))]


@pytest.mark.parametrize("engine, kind", CASES)
def test_two_processes_equal_one_process(pretrain_results, engine, kind):
    """Per-iteration training losses and the held-out losses within 1e-5 in fp32 (with MoD and joint
    aux routers; with full activation recompute; FSDP2 beside tensor parallelism); in bf16 and fp16
    within 1e-2 (half-precision sums in another order)."""
    name = f"{engine}-{kind}"
    one = pretrain_results[1][0][name]
    tolerance = 1e-2 if kind in ("bf16", "fp16") else 1e-5
    for rank in range(2):
        losses, evaluation, status = pretrain_results[2][rank][name]
        assert status == "completed"
        assert sorted(losses) == sorted(one[0]) and losses
        for i, loss in losses.items():
            assert loss == pytest.approx(one[0][i], rel=tolerance), (name, rank, i)
        for key in ("loss_text", "loss_image", *(("causal_loss_text",) if kind in ("mod", "tp") else ())):
            assert evaluation[key] == pytest.approx(one[1][key], rel=tolerance), (name, rank, key)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_resume_is_exact_under_every_engine(pretrain_results, engine):
    """Stopped after iteration 2 (--exit-interval) and run again: iterations 3 and 4 bit-equal to
    the run that did not stop (each engine's own checkpoint: torch files, FSDP2's gathered
    tensors, DeepSpeed's directory)."""
    straight = pretrain_results[2][0][f"{engine}-mod"][0]
    stop, resumed = (pretrain_results[2][0][f"{engine}-{k}"] for k in ("stop", "resumed"))
    assert stop[2] == "exit-interval" and sorted(stop[0]) == [1, 2]
    assert sorted(resumed[0]) == [3, 4]
    assert [resumed[0][i] for i in (3, 4)] == [straight[i] for i in (3, 4)]


@pytest.mark.parametrize("first,then", [("ddp", "fsdp2"), ("fsdp2", "ddp")])
def test_a_checkpoint_moves_between_ddp_and_fsdp2(pretrain_results, first, then):
    straight = pretrain_results[2][0][f"{then}-mod"][0]
    resumed = pretrain_results[2][0][f"{first}-to-{then}"][0]
    assert sorted(resumed) == [3, 4]
    for i in (3, 4):
        assert resumed[i] == pytest.approx(straight[i], rel=1e-5)


def test_an_fsdp2_checkpoint_is_sharded_and_loads_on_any_number_of_ranks(pretrain_results):
    """FSDP2 writes DCP shards, no whole tensor in the rank file; resumed on one process (2 -> 1)
    and on two from a one-process checkpoint (1 -> 2), iterations 3 and 4 equal the straight
    two-process run (1e-5, as one process equals two)."""
    from moma_plugin.training import checkpointing

    directory = pretrain_results["workdir"] / "fsdp2-resume" / "iter_0000002"
    state = torch.load(checkpointing.rank_file(directory, 0), weights_only=False)
    assert state["engine"] == "fsdp2" and state["model"] is None and state["optimizer"]["state"] is None
    files = json.loads((directory / checkpointing.MANIFEST).read_text())["files"]
    shards = sorted(name for name in files if name.startswith("dcp/mp_rank_00/"))
    assert "dcp/mp_rank_00/.metadata" in shards and len(shards) == 3, shards  # metadata + 2 ranks
    keys = checkpointing.dcp_keys(checkpointing.dcp_dir(directory, 0))
    assert any(k.endswith("experts.fc1_weight") for k in keys)  # stacked, sharded on experts
    assert any(k.startswith("optimizer/") and k.endswith("/exp_avg_sq") for k in keys)
    straight = pretrain_results[2][0]["fsdp2-mod"][0]
    for resumed in (pretrain_results["after"]["fsdp2-2to1"][0], pretrain_results[2][0]["fsdp2-1to2"][0]):
        assert sorted(resumed) == [3, 4]
        for i in (3, 4):
            assert resumed[i] == pytest.approx(straight[i], rel=1e-5)


def test_a_truncated_dcp_shard_makes_the_checkpoint_incomplete(pretrain_results, tmp_path):
    """The manifest lists the DCP shards: one cut short, the newest intact checkpoint is taken."""
    import shutil

    from moma_plugin.training import checkpointing

    save = tmp_path / "save"
    shutil.copytree(pretrain_results["workdir"] / "fsdp2-resume", save)
    shard = sorted((save / "iter_0000004" / "dcp" / "mp_rank_00").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    found = checkpointing.find_checkpoint(save, 0)
    assert found.iteration == 2 and found.tracker_stale
    assert any(f"{shard}" in note and "(truncated)" in note for note in found.notes), found.notes


def test_moma_convert_checkpoint_writes_the_whole_tensors_of_an_fsdp2_checkpoint(pretrain_results):
    """The converted checkpoint holds the DCP shards' tensors whole in one torch file; ddp resumes
    it bit-equal to ddp resuming the sharded original (and within 1e-5 of the straight run)."""
    from moma_plugin.training import checkpointing

    workdir = pretrain_results["workdir"]
    converted = torch.load(checkpointing.rank_file(workdir / "converted" / "iter_0000002", 0),
                           weights_only=False)
    whole = checkpointing.read_dcp(checkpointing.dcp_dir(workdir / "fsdp2-resume" / "iter_0000002", 0))
    model, optimizer = checkpointing.split_dcp(whole)
    assert converted["model"].keys() == model.keys()
    for key, value in model.items():
        assert torch.equal(converted["model"][key], value), key
    assert len(converted["optimizer"]["state"]) == len(optimizer)
    after = pretrain_results["after"]
    assert after["converted-ddp"][0] == after["dcp-ddp"][0] and sorted(after["dcp-ddp"][0]) == [3, 4]
    straight = pretrain_results[2][0]["ddp-mod"][0]
    for i in (3, 4):
        assert after["dcp-ddp"][0][i] == pytest.approx(straight[i], rel=1e-5)


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_generation_and_aux_router_training_read_sharded_checkpoints(pretrain_results, engine):
    after = pretrain_results["after"]
    generated = after[f"generate-{engine}"]
    assert generated["iteration"] == 4 and generated["kv_cache_matches_recompute"] is True
    assert [len(o["new_tokens"]) for o in generated["outputs"]] == [6, 6]
    report = after[f"aux-{engine}"]
    assert report["iteration"] == 4 and report["history"] and \
        (Path(report["checkpoint_saved"]) / "aux_routers.json").exists()


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--use-torch-fsdp2", *ENGINES["zero2"]], "--deepspeed and --use-torch-fsdp2 are two data-parallel "
                                               "engines; give one"),
    (["--deepspeed"], "--deepspeed needs --deepspeed-config FILE.json"),
    (["--deepspeed-config", "x.json"], "add --deepspeed"),
    (["--fp16"], "--fp16 (dynamic loss scaling) is offered by the DeepSpeed engine only"),
    (["--bf16", "--fp16", *ENGINES["zero2"]], "--bf16 and --fp16 exclude each other"),
    ([*ENGINES["zero2"], "--tensor-model-parallel-size", "2"], "use the default ddp engine or "
                                                               "--use-torch-fsdp2 with tensor parallelism"),
    (["--use-distributed-optimizer"], "add --use-megatron-ddp"),
    pytest.param(["--use-megatron-ddp"], "--use-megatron-ddp needs CUDA", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="the CPU message")),
])
def test_engine_flag_conflicts_are_clear_errors(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args([*TINY, *flags])
    assert message in capsys.readouterr().err


def test_a_deepspeed_json_that_disagrees_with_the_flags_is_refused(megatron_single_process, tmp_path):
    for config, message in (
            ({"train_batch_size": 16}, "sets train_batch_size 16 but --global-batch-size makes it 8"),
            ({"bf16": {"enabled": True}}, "has bf16.enabled true but --bf16 is not given"),
            ({"gradient_clipping": 0.5}, "sets gradient_clipping 0.5 but --clip-grad is 1.0"),
    ):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(config))
        with pytest.raises(SystemExit) as error:
            loop.pretrain([*COMMON, "--clip-grad", "1.0", "--train-iters", "1", "--no-save", "--run-dir",
                           str(tmp_path / "run"), "--deepspeed", "--deepspeed-config", str(path)])
        assert message in str(error.value)


def test_fp16_where_deepspeed_cannot_take_it_says_to_use_bf16(megatron_single_process, tmp_path,
                                                              monkeypatch):
    """A CPU without fp16 instructions (DeepSpeed's own check, forced here on CPUs that have them)."""
    from moma_plugin.training.engines import deepspeed as engine

    monkeypatch.setattr(engine, "fp16_supported", lambda: False)
    with pytest.raises(SystemExit, match="--fp16: DeepSpeed does not train fp16 on this cpu .*use --bf16"):
        loop.pretrain([*COMMON, "--fp16", "--train-iters", "1", "--no-save", "--run-dir",
                       str(tmp_path / "run"), *ENGINES["zero2"]])


def test_a_missing_deepspeed_package_names_the_extra(monkeypatch):
    from moma_plugin.cli import UsageError
    from moma_plugin.training.engines.deepspeed import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an absent package looks like to import
    with pytest.raises(UsageError, match=r"pip install moma_plugin\[deepspeed\]"):
        import_deepspeed()


def test_resuming_across_deepspeed_and_the_torch_engines_is_refused(megatron_single_process, tmp_path):
    """DeepSpeed's optimizer state is its own (partitioned): a ddp checkpoint does not resume under
    --deepspeed, nor a DeepSpeed one under ddp; both say which engine wrote it."""
    run = [*COMMON, *MOD_JOINT, "--run-dir", str(tmp_path / "run")]
    loop.pretrain([*run, "--train-iters", "1", "--save", str(tmp_path / "ddp")])
    with pytest.raises(SystemExit, match="written by the ddp engine: it holds no DeepSpeed state"):
        loop.pretrain([*run, "--train-iters", "2", "--save", str(tmp_path / "ddp"), *ENGINES["zero2"]])
    loop.pretrain([*run, "--train-iters", "1", "--save", str(tmp_path / "ds"), *ENGINES["zero2"]])
    with pytest.raises(SystemExit, match="written by the deepspeed engine"):
        loop.pretrain([*run, "--train-iters", "2", "--save", str(tmp_path / "ds")])


# -- what the docs say ----------------------------------------------------------------------------------
def test_the_memory_table_of_the_docs_is_what_the_accounting_gives(megatron_single_process):
    """docs/TRAINING.md's table, computed again from the paper configs (parameters counted on the
    meta device), and the accounting itself against hand-computed cases."""
    from moma_plugin.training.engines import memory

    text = (REPO / "docs/TRAINING.md").read_text()
    documented = text.split("<!-- memory table -->\n")[1].split("\n<!-- end of memory table -->")[0]
    names = [line.split(" | ")[0].lstrip("| ") for line in documented.splitlines()[2:]]
    configs = [str(REPO / f"examples/configs/paper/{name}.yaml") for name in dict.fromkeys(names)]
    assert memory.table(configs, [8, 64, 256]) == documented
    n, w = 1000, 8
    assert memory.state_bytes_per_rank(n, "ddp", w, bf16=False) == 16 * n
    assert memory.state_bytes_per_rank(n, "zero1", w, bf16=False) == (4 + 4 + 8 / w) * n
    assert memory.state_bytes_per_rank(n, "zero2", w, bf16=True) == (2 + 14 / w) * n
    assert memory.state_bytes_per_rank(n, "zero3", w, bf16=True) == memory.state_bytes_per_rank(
        n, "fsdp2", w, bf16=True) == 16 * n / w


def test_the_engine_configs_are_the_paper_configs_with_their_engine():
    import yaml

    for name, paper, engine in (("fsdp2_bf16_4t4i_1.4b", "4t4i_1.4b", {"use-torch-fsdp2": True, "bf16": True}),
                                ("bf16_4t4i_435m", "4t4i_435m", {"bf16": True})):
        shipped = yaml.safe_load((REPO / f"examples/configs/engines/{name}.yaml").read_text())
        assert shipped == {**yaml.safe_load((REPO / f"examples/configs/paper/{paper}.yaml").read_text()),
                           **engine}
        parse_args(["--config", str(REPO / f"examples/configs/engines/{name}.yaml")])
