"""The main job, ``moma-pretrain``: end to end on the bundled corpus, exact resume, SIGTERM, NaN stop,
per-modality losses, YAML/flag precedence, clear errors, and data/tensor parallelism over gloo."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moma_plugin.training import checkpointing, loop, step
from moma_plugin.training.evaluation import evaluate
from moma_plugin.training.arguments import parse_args
from moma_plugin.training.initialize import build_model, setup_parallel
from moma_plugin.training.metrics_log import losses_from_sums

from .conftest import free_port, run_ranks

REPO = Path(__file__).resolve().parents[1]
# A small model and short run: a few seconds per run on 2 cores.
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "4", "--eval-iters", "2", "--no-progress-bar"]


def run_cli(args, **kwargs):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "moma_plugin.pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240, **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_end_to_end_on_the_bundled_corpus(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "--train-iters", "6", "--log-interval", "2", "--eval-interval", "3",
                    "--run-dir", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "iteration      2/6" in out and "tokens/s" in out and "TFLOP/s" in out
    assert "held-out loss: text" in out and "image" in out
    # Megatron's checkpoint layout.
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert (run_dir / "checkpoints" / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt").exists()
    state = torch.load(run_dir / "checkpoints/iter_0000006/mp_rank_00/model_optim_rng.pt",
                       weights_only=False)
    assert {"model", "optimizer", "opt_param_scheduler", "rng_state", "iteration", "args",
            "num_floating_point_operations_so_far", "moma"} <= state.keys()
    assert any(".mlp.experts.image.3.linear_fc1.weight" in k for k in state["model"])
    # Metrics: JSONL lines for every log and evaluation, TensorBoard events, the plot.
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iteration"] for r in train] == [2, 4, 6]
    assert [r["iteration"] for r in evals] == [3, 6]
    run = json.loads((run_dir / "run.json").read_text())
    tokens_per_iteration = 4 * 64
    for r in train:
        assert r["tokens"] == r["iteration"] * tokens_per_iteration
        assert r["flops"] == pytest.approx(r["tokens"] * run["flops_per_token"])
        assert r["expert_load_min"] <= r["expert_load_max"] and 0 <= r["unpicked_frac"] < 1
        assert r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0
        assert r["sampler_target_image"] == 0.5 and abs(r["sampler_share_image"] - 0.5) < 0.1
        assert min(r["loss_text"], r["loss_image"]) <= r["loss"] <= max(r["loss_text"], r["loss_image"])
        assert "moma/layer0/image/tokens_per_expert_max" in r
    assert all(math.isfinite(evals[-1][k]) for k in ("loss_text", "loss_image", "ppl_text", "ppl_image"))
    assert evals[-1]["ppl_image"] == pytest.approx(math.exp(evals[-1]["loss_image"]))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "loss_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_rate_follows_the_papers_schedule(megatron_single_process, tmp_path):
    result = loop.pretrain([*TINY, "--train-iters", "10", "--lr-warmup-iters", "2", "--lr", "1e-3",
                            "--log-interval", "1", "--eval-interval", "100", "--no-save",
                            "--run-dir", str(tmp_path)])
    lrs = {r["iteration"]: r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"}
    assert result.status == "completed"
    # Linear warm-up to the peak, then linear decay to 1% of it at the last iteration.
    assert lrs[1] == pytest.approx(0.5e-3) and lrs[2] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-5)
    assert lrs[6] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (10 - 6) / (10 - 2))


def test_resume_is_exact(megatron_single_process, tmp_path):
    """N iterations straight equal N/2, stop, resume, N/2 bit for bit (with dropout and Gumbel
    noise on, so every random stream must be restored)."""
    common = [*TINY, "--train-iters", "8", "--log-interval", "1", "--eval-interval", "100",
              "--hidden-dropout", "0.1", "--moma-router-gumbel-noise"]
    straight = loop.pretrain([*common, "--run-dir", str(tmp_path / "a")])
    first = loop.pretrain([*common, "--run-dir", str(tmp_path / "b"), "--exit-interval", "4"])
    assert first.status == "exit-interval" and first.iteration == 4
    assert checkpointing.read_tracker(tmp_path / "b" / "checkpoints") == 4
    # The same command again resumes from --save (what a requeued SLURM job does).
    second = loop.pretrain([*common, "--run-dir", str(tmp_path / "b")])
    assert second.status == "completed" and sorted(second.train_losses) == [5, 6, 7, 8]
    assert [first.train_losses[i] for i in range(1, 5)] == [straight.train_losses[i] for i in range(1, 5)]
    assert [second.train_losses[i] for i in range(5, 9)] == [straight.train_losses[i] for i in range(5, 9)]
    assert second.eval == straight.eval
    a = torch.load(tmp_path / "a/checkpoints/iter_0000008/mp_rank_00/model_optim_rng.pt", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/iter_0000008/mp_rank_00/model_optim_rng.pt", weights_only=False)
    for name, tensor in a["model"].items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, b["model"][name]), name
    assert a["moma"]["sampler"] == b["moma"]["sampler"]
    # The resumed run's metrics file holds both halves.
    iterations = [r["iteration"] for r in read_jsonl(tmp_path / "b/metrics.jsonl") if r["kind"] == "train"]
    assert iterations == list(range(1, 9))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moma_plugin.pretrain", *TINY, "--train-iters", "100000",
         "--log-interval", "1", "--eval-interval", "100000", "--run-dir", str(run_dir)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            if line.startswith("iteration      3/"):
                break
            assert time.monotonic() < deadline, "no third iteration within 180 s"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM" in out
    saved = checkpointing.read_tracker(run_dir / "checkpoints")
    assert saved is not None and 3 <= saved < 100000
    assert (checkpointing.iteration_dir(run_dir / "checkpoints", saved) / "mp_rank_00").is_dir()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    # It resumes from there.
    proc = run_cli([*TINY, "--train-iters", "100000", "--exit-interval", str(saved + 1),
                    "--log-interval", "1", "--eval-interval", "100000", "--run-dir", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpointing.iteration_dir(run_dir / 'checkpoints', saved)}" in proc.stdout


def test_per_modality_loss_sums_match_a_manual_computation():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 7, generator=g) * 5
    mask = (torch.rand(3, 7, generator=g) > 0.2).float()
    modality = torch.randint(0, 3, (3, 7), generator=g)
    sums = step.modality_loss_sums(loss, mask, modality, 3)
    values = losses_from_sums(sums, ("text", "image", "speech"), with_ppl=True)
    for m, name in enumerate(("text", "image", "speech")):
        picked = [loss[i, j].item() for i in range(3) for j in range(7)
                  if modality[i, j] == m and mask[i, j] > 0]
        assert values[f"loss_{name}"] == pytest.approx(sum(picked) / len(picked), rel=1e-12)
        assert values[f"ppl_{name}"] == pytest.approx(math.exp(sum(picked) / len(picked)))
    everything = [loss[i, j].item() for i in range(3) for j in range(7) if mask[i, j] > 0]
    assert values["loss"] == pytest.approx(sum(everything) / len(everything), rel=1e-12)


def test_evaluation_equals_a_manual_pass_over_the_held_out_split(megatron_single_process, tmp_path):
    """evaluate() against per-sample forwards with the label modality taken from the vocabulary."""
    args = parse_args([*TINY, "--run-dir", str(tmp_path), "--micro-batch-size", "2"])
    args.eval_iters = 3
    parallel = setup_parallel(args)
    from moma_plugin.data.corpus import bundled_dataset_prefix
    from moma_plugin.data.dataset import build_datasets

    _, valid = build_datasets([bundled_dataset_prefix()], args.seq_length, args.valid_fraction, args.seed)
    model, _ = build_model(args, valid.layout, parallel)
    values = evaluate(model, valid, args, valid.layout, parallel)
    image_start, image_end = valid.layout.range_of("image")
    totals = {"text": [0.0, 0], "image": [0.0, 0]}
    model.eval()
    with torch.no_grad():
        for pair in range(3):  # expert choice routes over a micro-batch: same micro-batches
            batch = step.collate([valid[2 * pair], valid[2 * pair + 1]])
            loss = step.forward_loss(model, batch)
            for i in range(2):
                for j in range(args.seq_length):
                    label = int(batch["labels"][i, j])
                    name = "image" if image_start <= label < image_end else "text"
                    totals[name][0] += float(loss[i, j])
                    totals[name][1] += 1
    for name, (total, count) in totals.items():
        assert values[f"loss_{name}"] == pytest.approx(total / count, rel=1e-6)


def test_yaml_config_and_command_line_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "num-layers: 3\nhidden_size: 48\n--lr: 5.0e-4\nmoma-experts: 6t2i\ndisable-bias-linear: true\n"
        "balanced-sampler: false\nno-progress-bar: true\ndata-path: [0.3, a, 0.7, b]\n"
        "moma-modalities: [text, image]\n")
    args = parse_args(["--config", str(config), "--lr", "1e-3", "--hidden-size", "64"])
    assert (args.num_layers, args.hidden_size, args.lr, args.moma_experts) == (3, 64, 1e-3, "6t2i")
    assert args.disable_bias_linear and not args.balanced_sampler and not args.progress_bar
    assert args.data_path == ["0.3", "a", "0.7", "b"] and args.moma_modalities == ("text", "image")
    assert args.min_lr == pytest.approx(1e-5)  # 1% of the command line's peak, not the file's
    assert args.lr_warmup_iters == args.train_iters // 10
    defaults = parse_args([])
    assert defaults.num_layers == 4 and defaults.lr == 3e-3


@pytest.mark.parametrize("text, flags, message", [
    ("hiden-size: 64\n", [], "unknown key 'hiden-size'"),
    ("hidden-size: lots\n", [], "invalid int value: 'lots'"),
    ("disable-bias-linear: maybe\n", [], "takes true or false"),
    ("- 1\n- 2\n", [], "must hold a mapping"),
    ("", ["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
    ("", ["--min-lr", "1", "--lr", "0.1"], "--min-lr 1.0 must lie in [0, --lr 0.1]"),
    ("", ["--lr-warmup-iters", "50", "--train-iters", "40"], "--lr-warmup-iters 50 must be below"),
    ("", ["--pipeline-model-parallel-size", "2", "--use-torch-fsdp2"], "runs under the default ddp engine only"),
    ("", ["--moma-expert-execution", "fast"], "invalid choice: 'fast'"),
    ("moma-experts: 4q4i\n", [], "names modality letter 'q'"),
    ("", ["--moma-experts", "4t-4i"], "does not parse"),
])
def test_bad_configs_and_flags_are_clear_errors(tmp_path, capsys, text, flags, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as error:
        parse_args(["--config", str(config), *flags])
    assert message in str(error.value) + capsys.readouterr().err


def test_bad_runtime_settings_are_clear_errors(megatron_single_process, tmp_path):
    def fails(argv, message):
        with pytest.raises(SystemExit) as error:
            loop.pretrain([*TINY, "--train-iters", "2", "--run-dir", str(tmp_path / "r"), *argv])
        assert message in str(error.value), str(error.value)

    fails(["--global-batch-size", "6"], "--global-batch-size 6 is not a multiple of")
    fails(["--tensor-model-parallel-size", "2"], "does not divide the 1 processes")
    fails(["--load", str(tmp_path / "nothing")], "no latest_checkpointed_iteration.txt")
    fails(["--data-path", str(tmp_path / "missing")], "no dataset at prefix")
    fails(["--moma-modalities", "text,image,speech", "--moma-experts", "4t4i1s"],
          "--moma-modalities is text,image,speech")
    loop.pretrain([*TINY, "--train-iters", "1", "--run-dir", str(tmp_path / "ok")])
    fails(["--load", str(tmp_path / "ok" / "checkpoints"), "--hidden-size", "64"],
          "--hidden-size: checkpoint 32, now 64")


# -- data and tensor parallelism over two gloo processes ---------------------------------------------
MOD_JOINT = ["--mod-interval", "2", "--mod-capacity", "0.5", "--aux-router-joint"]


def _rank_main(rank, port, workdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    common = [*TINY, "--train-iters", "3", "--log-interval", "1", "--eval-interval", "100", "--no-save"]
    losses = {}
    # DP=2: each rank one micro-batch of 2 per step; TP=2: one rank pair, micro-batches of 4.
    losses["dp2"] = loop.pretrain([*common, "--micro-batch-size", "2", "--global-batch-size", "4",
                                   "--run-dir", f"{workdir}/dp2"])
    losses["tp2"] = loop.pretrain([*common, "--tensor-model-parallel-size", "2",
                                   "--run-dir", f"{workdir}/tp2"])
    # Mixture-of-Depths with jointly trained aux routers (their gradients summed over DP ranks too).
    losses["dp2-mod"] = loop.pretrain([*common, *MOD_JOINT, "--micro-batch-size", "2",
                                       "--global-batch-size", "4", "--run-dir", f"{workdir}/dp2-mod"])
    losses["tp2-mod"] = loop.pretrain([*common, *MOD_JOINT, "--tensor-model-parallel-size", "2",
                                       "--run-dir", f"{workdir}/tp2-mod"])
    torch.save({k: (v.train_losses, v.eval) for k, v in losses.items()}, f"{workdir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_data_and_tensor_parallel_runs_match_one_process(megatron_single_process, tmp_path):
    common = [*TINY, "--train-iters", "3", "--log-interval", "1", "--eval-interval", "100", "--no-save"]
    # One process: the same global batches (2 micro-batches of 2 accumulated; one of 4).
    reference = {
        # --eval-iters counts micro-batches per rank: twice as many for one rank.
        "dp2": loop.pretrain([*common, "--micro-batch-size", "2", "--global-batch-size", "4",
                              "--eval-iters", "4", "--run-dir", str(tmp_path / "dp1")]),
        "tp2": loop.pretrain([*common, "--run-dir", str(tmp_path / "tp1")]),
        "dp2-mod": loop.pretrain([*common, *MOD_JOINT, "--micro-batch-size", "2", "--global-batch-size",
                                  "4", "--eval-iters", "4", "--run-dir", str(tmp_path / "dp1-mod")]),
        "tp2-mod": loop.pretrain([*common, *MOD_JOINT, "--run-dir", str(tmp_path / "tp1-mod")]),
    }
    run_ranks(_rank_main, (free_port(), str(tmp_path)))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for kind in ("dp2", "tp2", "dp2-mod", "tp2-mod"):
            losses, evaluation = result[kind]
            expected = reference[kind]
            assert sorted(losses) == [1, 2, 3]
            for i in (1, 2, 3):
                assert losses[i] == pytest.approx(expected.train_losses[i], rel=1e-5, abs=1e-5), (kind, i)
            keys = ["loss_text", "loss_image"]
            if kind.endswith("mod"):  # held-out loss with causal routing: the aux routers agree too
                keys += ["causal_loss_text", "causal_loss_image"]
            for key in keys:
                assert evaluation[key] == pytest.approx(expected.eval[key], rel=1e-5), (kind, key)


def test_paper_configs_parse_and_are_flops_matched():
    """examples/configs/paper: every file parses, and each sparse config's training FLOPs per token
    are within 0.5% of its dense counterpart's (the router's share)."""
    from moma_plugin.args import moma_config_from_args
    from moma_plugin.flops import training_flops_per_token

    files = sorted((REPO / "examples" / "configs" / "paper").glob("*.yaml"))
    assert len(files) == 24
    flops = {}
    for path in files:
        args = parse_args(["--config", str(path)])
        assert (args.seq_length, args.lr, args.lr_warmup_iters, args.lr_decay_style) == (4096, 1e-4, 4000, "linear")
        assert args.min_lr == pytest.approx(0.01 * args.lr)
        config = moma_config_from_args(args, add_bias_linear=not args.disable_bias_linear)
        flops[path.stem] = training_flops_per_token(config, args.seq_length, 65536)
    for size in ("90m", "435m", "1.4b"):
        for experts in ("8x", "1t1i", "4t4i", "6t2i", "7t1i"):
            ratio = flops[f"{experts}_{size}"] / flops[f"dense_{size}"]
            assert 1 <= ratio < 1.005, (experts, size, ratio)
        # The paper's MoD models (more layers, MoD every 2nd layer at 0.25) match within ~1%: a check
        # of the MoD FLOPs accounting against the paper's own matching.
        for experts in ("mod_4t4i", "mod_1t1i"):
            ratio = flops[f"{experts}_{size}"] / flops[f"dense_{size}"]
            assert 0.985 < ratio < 1.015, (experts, size, ratio)
    # The demo YAML writes out the defaults (the global batch is derived when not given).
    tiny = vars(parse_args(["--config", str(REPO / "examples/configs/tiny_cpu.yaml")]))
    defaults = vars(parse_args([]))
    differing = {k for k in tiny if tiny[k] != defaults[k]}
    assert differing == {"config", "global_batch_size", "explicit"} and tiny["global_batch_size"] == 8
