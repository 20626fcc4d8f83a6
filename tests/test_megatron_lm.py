"""The plugin inside a real Megatron-LM checkout: ../shared/thirdparty's pristine training-side snapshot
of the release matching the installed megatron-core (core_v0.16.1 under megatron-core 0.16, Python 3.11;
core_v0.19.0 under 0.19, Python 3.12) unpacked into a temporary directory, patched with this repository's
patch for it as a user would (``git apply``), its own argument parsing, model building, datasets and
``forward_step`` run on CPU (gloo, one process). Both patches are also checked to apply to their
release whichever megatron-core is installed.

Stand-ins for Megatron-LM's CUDA-bound calls, inside the test process only (STAND_INS lists them): its
batch loader moves the batch with ``Tensor.cuda`` and allocates on ``torch.cuda.current_device()``,
which here keep it on the CPU. Everything else is Megatron-LM's own code."""

import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from .conftest import free_port, run_ranks
from .test_pipeline_parallel import schedule_stand_ins

REPO = Path(__file__).resolve().parents[1]
THIRDPARTY = REPO.parent / "shared" / "thirdparty"
RELEASES = ("v0.16.1", "v0.19.0")  # Megatron-LM tags core_v..., each with its patch in patches/
SNAPSHOTS = {version: THIRDPARTY / f"megatron-lm-core_{version}-training.tar.gz" for version in RELEASES}
STAND_INS = {"torch.Tensor.cuda": "returns the tensor itself (CPU): get_batch moves the batch to the GPU "
                                  "with it",
             "torch.cuda.current_device": "returns 'cpu': get_batch_on_this_tp_rank allocates the buffers "
                                          "it broadcasts there"}
# docs/MEGATRON_LM.md's commands, as written there
APPLY = {"v0.16.1": "git apply $MOMA_PLUGIN/patches/megatron-lm-core_v0.16.1.patch",
         "v0.19.0": "git apply $MOMA_PLUGIN/patches/megatron-lm-core_v0.19.0.patch"}


def installed_release():
    """The Megatron-LM release matching the installed megatron-core (its training side must match)."""
    from moma_plugin.megatron_compat import megatron_core_version

    line = megatron_core_version()[:2]
    return {(0, 16): "v0.16.1", (0, 19): "v0.19.0"}.get(line)


def unpack(version: str, into: Path) -> Path:
    if not SNAPSHOTS[version].exists():
        pytest.skip(f"no Megatron-LM snapshot at {SNAPSHOTS[version]}")
    with tarfile.open(SNAPSHOTS[version]) as tar:
        tar.extractall(into, filter="data")
    return into / f"Megatron-LM-core_{version}"


def checkout(into: Path, how: str) -> Path:
    """The snapshot of the installed release unpacked into ``into``, made a MoMa job ``how`` a user
    would: this repository's patch applied by git ("patch", the command of docs/MEGATRON_LM.md), or
    examples/megatron_lm/pretrain_moma_gpt.py put beside the untouched pretrain_gpt.py ("script")."""
    version = installed_release()
    if version is None:
        pytest.skip("no Megatron-LM snapshot for the installed megatron-core (tested: 0.16, 0.19)")
    root = unpack(version, into)
    if how == "patch":
        subprocess.run(["bash", "-e", "-c", APPLY[version]], cwd=root, env=dict(os.environ, MOMA_PLUGIN=str(REPO)),
                       check=True)
    else:
        shutil.copy(REPO / "examples" / "megatron_lm" / "pretrain_moma_gpt.py", root)
    return root


@pytest.mark.parametrize("version", RELEASES)
def test_each_patch_applies_to_its_release(tmp_path, version):
    """Whichever megatron-core is installed: the patch applies cleanly to a pristine checkout, and
    the patched script compiles."""
    root = unpack(version, tmp_path)
    patch = REPO / "patches" / f"megatron-lm-core_{version}.patch"
    subprocess.run(["git", "apply", "--check", str(patch)], cwd=root, check=True)
    subprocess.run(["bash", "-e", "-c", APPLY[version]], cwd=root, env=dict(os.environ, MOMA_PLUGIN=str(REPO)),
                   check=True)
    patched = (root / "pretrain_gpt.py").read_text()
    compile(patched, "pretrain_gpt.py", "exec")
    assert "from moma_plugin import megatron_lm as moma" in patched
    assert "forward_step = moma.forward_step(forward_step, get_batch)" in patched


def megatron_args(prefix: str, vocab_size: int, tensorboard: str):
    """Megatron-LM flags of a tiny MoMa model on the bundled corpus (what a user's job passes)."""
    return ["--spec", "moma_plugin", "moma_layer_spec", "--moma-experts", "4t4i", "--mod-interval", "2",
            "--mod-capacity", "0.5", "--aux-router-joint",
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "1", "--lr", "1e-3", "--data-path", prefix, "--split", "100,0,0",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size),
            "--position-embedding-type", "learned_absolute", "--transformer-impl", "local", "--normalization",
            "RMSNorm", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--use-cpu-initialization",
            "--seed", "7", "--tensorboard-dir", tensorboard]


# Mixture-of-Transformers with a 4-expert text MoE: Megatron-LM's flags, and moma-pretrain's.
MOT = ["--mot", "all", "--moma-experts", "4t1i"]


def _job_rank(rank, world, port, root, script, prefix, vocab_size, out, extra=()):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, root)
    flags = megatron_args(prefix, vocab_size, f"{out}.tb")
    if extra:  # the MoT layer spec object, as a MoT job names it
        flags[flags.index("moma_layer_spec")] = "mot_layer_spec"
    sys.argv = ["pretrain_gpt.py", *flags, *extra]
    torch.set_num_threads(1)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # STAND_INS
    torch.cuda.current_device = lambda: "cpu"
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    import pretrain_gpt  # the stock script, patched or not
    job = importlib.import_module(script)  # what the user runs: the patched script, or ours beside it
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    from moma_plugin import megatron_lm
    from moma_plugin.data.vocab import VocabularyLayout
    from moma_plugin.training.arguments import parse_args as moma_parse_args
    from moma_plugin.training.initialize import Parallel, build_model
    from moma_plugin.training.step import forward_loss

    args = parse_args(extra_args_provider=megatron_lm.extra_args_provider())
    validate_args(args)
    set_global_variables(args, build_tokenizer=True)
    torch.manual_seed(args.seed)
    if hasattr(job, "gpt_config_from_args"):  # core_v0.19: what pretrain() builds from the model config
        from megatron.core.process_groups_config import ProcessGroupCollection

        model_config = job.gpt_config_from_args(args)
        builder = model_config.get_builder_cls()(model_config)
        model = builder.build_model(ProcessGroupCollection.use_mpu_process_groups())
        built_by = type(builder).__name__
    else:  # core_v0.16: model_provider with the builder
        model = pretrain_gpt.model_provider(job.gpt_builder)
        built_by = "model_provider"
    train, _, _ = job.train_valid_test_datasets_provider([4, 0, 0])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=args.micro_batch_size)))
    output, loss_func = job.forward_step(iter([batch]), model)
    loss, num_tokens, report = loss_func(output)
    from megatron.training.global_vars import get_tensorboard_writer

    get_tensorboard_writer().flush()

    # moma-pretrain's model from the same flags, with the Megatron-LM model's weights
    layout = VocabularyLayout.load(f"{prefix}.vocab.json")
    moma_args = moma_parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "64", "--moma-experts", "4t4i", "--mod-interval", "2",
                                 "--mod-capacity", "0.5", "--aux-router-joint", "--data-path", prefix,
                                 "--train-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "2", *extra])
    parallel = Parallel(rank=0, world=1, tp_rank=0, tp=1, dp_rank=0, dp=1, device=torch.device("cpu"))
    reference, _ = build_model(moma_args, layout, parallel)
    reference.load_state_dict(model.state_dict())
    mine = {"tokens": batch["tokens"], "labels": batch["labels"], "position_ids": batch["position_ids"],
            "modality_ids": torch.from_numpy(layout.modality_ids(batch["tokens"].numpy()))}
    reference_loss = (forward_loss(reference, mine) * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    torch.save({"loss": float(loss.detach()), "num_tokens": int(num_tokens), "report": report,
                "reference": float(reference_loss), "mask": float(batch["loss_mask"].sum()),
                "model": type(model).__name__, "modalities": layout.modalities,
                "built_by": built_by, "keys": list(model.state_dict())}, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def bundled():
    from moma_plugin.data.corpus import bundled_dataset_prefix
    from moma_plugin.data.vocab import VocabularyLayout

    prefix = bundled_dataset_prefix()
    return prefix, VocabularyLayout.load(f"{prefix}.vocab.json").vocab_size


@pytest.mark.parametrize("how, script, extra", [("patch", "pretrain_gpt", ()), ("script", "pretrain_moma_gpt", ()),
                                                ("patch", "pretrain_gpt", tuple(MOT))], ids=["patch", "script", "mot"])
def test_a_megatron_lm_job_trains_moma_like_moma_pretrain(tmp_path, bundled, how, script, extra):
    """Megatron-LM's parse_args with --spec moma_plugin moma_layer_spec and the MoMa flags, its
    model_provider through the wrapped builder (a MoMaGPTModel), a GPTDataset batch over the bundled
    corpus, the wrapped forward_step and its loss_func, in the patched pretrain_gpt.py and in the
    example script beside an unpatched one: the loss (without the aux routers' part) equals that of
    moma-pretrain's model with the same weights; the report holds each modality's loss, the aux-router
    loss and routing metrics."""
    pytest.importorskip("triton", reason="Megatron-LM's training side imports triton: pip install "
                                         "moma_plugin[megatron-lm]")
    root = checkout(tmp_path, how)
    prefix, vocab_size = bundled
    run_ranks(_job_rank, (1, free_port(), str(root), script, prefix, vocab_size, str(tmp_path / "out.pt"), extra),
              nprocs=1, timeout_s=300, what=f"{script}.py ({how})")
    result = torch.load(tmp_path / "out.pt")
    # --mot all: per-modality projections and norms, a routed text MoE, an unrouted image FFN
    mot_keys = {"decoder.layers.0.self_attention.linear_qkv.image.weight", "decoder.layers.0.mlp.router.text.weight"}
    assert (mot_keys <= set(result["keys"])) == bool(extra)
    assert ("decoder.layers.0.mlp.router.image.weight" in result["keys"]) != bool(extra)
    assert result["model"] == "MoMaGPTModel" and result["num_tokens"] == result["mask"]
    assert result["built_by"] == {"v0.16.1": "model_provider", "v0.19.0": "MoMaGPTModelBuilder"}[installed_release()]
    report = result["report"]
    lm_loss = float(report["lm loss"][0] / report["lm loss"][1])
    assert lm_loss == pytest.approx(result["reference"], rel=1e-5)
    # The returned loss adds the aux routers' BCE (times the tokens: Megatron divides by them).
    aux = float(report["aux router loss"][0])
    assert result["loss"] / result["num_tokens"] == pytest.approx(lm_loss + aux, rel=1e-5) and aux > 0
    per_modality = [report[f"{m} lm loss"] for m in result["modalities"]]
    assert sum(float(p[1]) for p in per_modality) == result["num_tokens"]
    assert sum(float(p[0]) for p in per_modality) == pytest.approx(float(report["lm loss"][0]), rel=1e-6)
    # The same keys on every rank and micro-batch (Megatron-LM all-reduces each): the routing metrics,
    # whose keys follow the tokens, go to its TensorBoard writer instead.
    assert set(report) == {"lm loss", "aux router loss", *(f"{m} lm loss" for m in result["modalities"])}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(tmp_path / "out.pt.tb")).Reload().Tags()["scalars"]
    assert any(tag.startswith("moma/layer") for tag in scalars) and any(tag.startswith("mod/") for tag in scalars)


# -- pipeline parallelism: three stages, the middle one without tokens or labels --------------------
PIPELINE_STAND_INS = dict(STAND_INS, **{
    "torch.cuda.synchronize": "does nothing: the schedule's p2p exchange synchronizes the device",
    "torch.zeros(device='cuda')": "allocates on the CPU: the schedule's token counter"})
STAGES, MICRO_BATCHES = 3, 2


def _pipeline_job_rank(rank, world, port, root, script, prefix, vocab_size, workdir):
    """One stage of a Megatron-LM job at --pipeline-model-parallel-size 3: its own arguments, model
    stage, datasets (every stage builds them: the wrapped is_dataset_built_on_rank) and the wrapped
    forward_step under Megatron-Core's 1F1B schedule, forward and backward of two micro-batches."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, root)
    flags = megatron_args(prefix, vocab_size, f"{workdir}/tb")
    flags[flags.index("--num-layers") + 1] = str(STAGES)
    flags[flags.index("--global-batch-size") + 1] = str(2 * MICRO_BATCHES)
    flags[flags.index("--mod-interval") + 1] = "1"  # MoD layers 1 and 2: on the stages without tokens
    sys.argv = ["pretrain_gpt.py", *flags, "--mod-start-layer", "1", "--pipeline-model-parallel-size", str(world)]
    torch.set_num_threads(1)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # PIPELINE_STAND_INS
    schedule_stand_ins()  # the schedule's: current_device, synchronize, zeros(device="cuda")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world)
    import pretrain_gpt
    job = importlib.import_module(script)
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    from moma_plugin import megatron_lm

    args = parse_args(extra_args_provider=megatron_lm.extra_args_provider())
    validate_args(args)
    set_global_variables(args, build_tokenizer=True)
    torch.manual_seed(args.seed + rank)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    if hasattr(job, "gpt_config_from_args"):  # core_v0.19
        from megatron.core.process_groups_config import ProcessGroupCollection

        model_config = job.gpt_config_from_args(args)
        model = model_config.get_builder_cls()(model_config).build_model(ProcessGroupCollection.use_mpu_process_groups())
    else:
        model = pretrain_gpt.model_provider(job.gpt_builder, pre_process=first, post_process=last)
    train, _, _ = job.train_valid_test_datasets_provider([2 * MICRO_BATCHES, 0, 0])
    seen = []  # the micro-batches this stage read

    def read():
        for batch in torch.utils.data.DataLoader(train, batch_size=args.micro_batch_size):
            seen.append({key: value.clone() for key, value in batch.items() if torch.is_tensor(value)})
            yield batch

    reports = get_forward_backward_func()(
        forward_step_func=job.forward_step, data_iterator=read() if train is not None else None, model=[model],
        num_microbatches=MICRO_BATCHES, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        forward_only=False)
    torch.save({"first": first, "last": last, "pre_process": model.pre_process, "reports": reports, "seen": seen,
                "state": model.state_dict(),
                "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}},
               f"{workdir}/stage{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("how, script", [("patch", "pretrain_gpt"), ("script", "pretrain_moma_gpt")])
def test_a_megatron_lm_job_in_pipeline_stages_trains_the_whole_model(megatron_single_process, tmp_path, bundled,
                                                                    how, script):
    """Three pipeline stages of a patched (or example-script) Megatron-LM job, 4t4i with MoD layers on
    the two stages without tokens and aux routers trained jointly: every stage reads the same micro-batches (the
    middle one too, which the stock script gives no data), and the losses of the last stage and the
    gradients of every stage equal moma-pretrain's whole model with the stages' weights."""
    pytest.importorskip("triton", reason="Megatron-LM's training side imports triton: pip install "
                                         "moma_plugin[megatron-lm]")
    root = checkout(tmp_path, how)
    prefix, vocab_size = bundled
    run_ranks(_pipeline_job_rank, (STAGES, free_port(), str(root), script, prefix, vocab_size, str(tmp_path)),
              nprocs=STAGES, timeout_s=300, what=f"{script}.py ({how}) in {STAGES} pipeline stages")
    stages = [torch.load(tmp_path / f"stage{rank}.pt", weights_only=False) for rank in range(STAGES)]
    assert [s["pre_process"] for s in stages] == [True, False, False] and stages[-1]["last"]
    for stage in stages[1:]:  # every stage read the same micro-batches
        assert len(stage["seen"]) == MICRO_BATCHES
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(stage["seen"], stages[0]["seen"]))
    assert [r for s in stages[:-1] for r in s["reports"]] == []

    from moma_plugin import pipeline
    from moma_plugin.aux_router import pop_aux_loss, set_aux_router_training
    from moma_plugin.data.vocab import VocabularyLayout
    from moma_plugin.training.arguments import parse_args as moma_parse_args
    from moma_plugin.training.initialize import Parallel, build_model
    from moma_plugin.training.step import forward_loss

    whole, grads = {}, {}
    for index, stage in enumerate(stages):
        for key, value in stage["state"].items():
            whole.setdefault(pipeline.whole_model_name(key, index), value)
        for key, grad in stage["grads"].items():
            key = "embedding.word_embeddings.weight" if key == "output_layer.weight" else key  # tied
            name = pipeline.whole_model_name(key, index)
            grads[name] = grads[name] + grad if name in grads else grad
    whole.pop("output_layer.weight")
    layout = VocabularyLayout.load(f"{prefix}.vocab.json")
    moma_args = moma_parse_args(["--num-layers", str(STAGES), "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "64", "--moma-experts", "4t4i", "--mod-interval", "1",
                                 "--mod-start-layer", "1", "--mod-capacity", "0.5", "--aux-router-joint",
                                 "--data-path", prefix, "--train-iters", "1", "--micro-batch-size", "2"])
    parallel = Parallel(rank=0, world=1, tp_rank=0, tp=1, dp_rank=0, dp=1, device=torch.device("cpu"))
    reference, _ = build_model(moma_args, layout, parallel)
    reference.load_state_dict(whole)
    set_aux_router_training(reference, True)
    assert [layer.is_mod for layer in reference.decoder.layers] == [False, True, True]
    expected = []
    for batch in stages[0]["seen"]:
        mine = {"tokens": batch["tokens"], "labels": batch["labels"], "position_ids": batch["position_ids"],
                "modality_ids": torch.from_numpy(layout.modality_ids(batch["tokens"].numpy()))}
        loss = (forward_loss(reference, mine) * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        ((loss + pop_aux_loss(reference)) / MICRO_BATCHES).backward()  # as Megatron-LM's loss_func
        expected.append(float(loss.detach()))
    reports = stages[-1]["reports"]
    assert [float(r["lm loss"][0] / r["lm loss"][1]) for r in reports] == pytest.approx(expected, rel=1e-5)
    assert all(float(r["aux router loss"][0]) > 0 for r in reports)
    reference_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys()
    assert any(".aux_router" in name and ".layers.1." in name for name in grads)  # the middle stage's learn
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("change, message", [
    ({"ckpt_format": "torch_dist"}, "add --ckpt-format torch"),
    ({"pipeline_model_parallel_size": 2, "context_parallel_size": 2}, "--context-parallel-size > 1 is not supported"),
    ({"pipeline_model_parallel_size": 2, "calculate_per_token_loss": True}, "--calculate-per-token-loss is not supported"),
    ({"expert_model_parallel_size": 2}, "--expert-model-parallel-size > 1 is not supported yet")])
def test_what_megatron_lm_jobs_cannot_do_yet_is_refused(change, message):
    from types import SimpleNamespace

    from moma_plugin import megatron_lm

    args = SimpleNamespace(save="ckpt", ckpt_format="torch", pipeline_model_parallel_size=1,
                           expert_model_parallel_size=1, context_parallel_size=1, aux_router_joint=True,
                           calculate_per_token_loss=False)
    megatron_lm.check_args(args)
    for key, value in change.items():
        setattr(args, key, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        megatron_lm.check_args(args)


def test_the_patch_leaves_plain_gpt_jobs_alone(tmp_path):
    """Without --spec moma_plugin ... the wrapped builder and forward step are the stock ones."""
    from moma_plugin import megatron_lm

    calls = []
    stock_builder = lambda *args, **kwargs: calls.append("builder") or "gpt"  # noqa: E731
    args = type("Args", (), {"spec": None})()
    assert megatron_lm.builder(stock_builder)(args, True, True) == "gpt" and calls == ["builder"]
    args.spec = ["megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"]
    assert not megatron_lm.uses_moma(args)
    args.spec = ["moma_plugin", "moma_layer_spec"]
    assert megatron_lm.uses_moma(args)
    calls.clear()
    stock_config = lambda args, config=None, **kwargs: calls.append(("config", config, kwargs)) or "cfg"  # noqa
    args.spec = None
    assert megatron_lm.config_from_args(stock_config)(args) == "cfg" and calls == [("config", None, {})]


def test_a_moma_job_refuses_modelopt():
    """core_v0.19's ModelOpt model config class is refused with what to do."""
    from types import SimpleNamespace

    from moma_plugin import megatron_lm

    args = SimpleNamespace(spec=["moma_plugin", "moma_layer_spec"])
    ModelOptModelConfig = type("ModelOptModelConfig", (), {})
    with pytest.raises(ValueError, match="leave ModelOpt off"):
        megatron_lm.config_from_args(lambda *a, **k: None)(args, model_config_cls=ModelOptModelConfig)


@pytest.mark.parametrize("names", [
    ("tokens", "labels", "loss_mask", "attention_mask", "position_ids", "packed_seq_params"),  # core_v0.16.1
    ("attention_mask", "cu_seqlens", "cu_seqlens_padded", "hybrid_cp_group", "labels", "local_cp_size",
     "loss_mask", "max_seqlen", "position_ids", "tokens")])  # core_v0.19.0 (its BATCH_KEYS)
def test_get_batch_of_either_release_is_read_by_name(names):
    from moma_plugin.megatron_compat import megatron_lm_batch

    batch = megatron_lm_batch([f"value of {name}" for name in names])
    assert all(batch[name] == f"value of {name}" for name in names)
    with pytest.raises(ValueError, match="returned 7 values"):
        megatron_lm_batch(list(range(7)))
