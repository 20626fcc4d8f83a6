"""moma-upcycle (moma_plugin/training/upcycle.py): which layouts upcycle to which, exact copies, the
oracle (with forced-balanced routing and gates forced to 1, the upcycled model computes what its source
computes), and the upcycled phase of moma-pretrain: a fresh schedule, the data position and the token
and FLOP counters kept, Gumbel noise on."""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import moma_plugin as mp
from moma_plugin.cli import UsageError
from moma_plugin.config import parse_expert_groups, parse_mot_parts
from moma_plugin.experts import per_expert_state
from moma_plugin.training import checkpointing, loop, upcycle as upcycle_tool
from moma_plugin.training.upcycle import DENSE, group_sources, untie_per_modality, upcycle, upcycle_model_state

from .conftest import free_port, run_ranks

MODALITIES = ("text", "image")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("source, target, plan", [
    ("dense", "1t1i", {"text": DENSE, "image": DENSE}),
    ("dense", "8x", {"shared": DENSE}),
    ("1t1i", "4t4i", {"text": "text", "image": "image"}),
    ("1t1i", "4t1i", {"text": "text", "image": "image"}),
    ("1x", "2t2i", {"text": "shared", "image": "shared"}),
])
def test_which_ffn_each_target_group_copies(source, target, plan):
    assert group_sources(source, target, MODALITIES) == plan


@pytest.mark.parametrize("source, target, message", [
    ("4t4i", "1t1i", "its group 'text' has 4 experts"),
    ("2t2i", "4t4i", "its group 'text' has 2 experts"),
    ("1t1i", "8x", "would start from several different FFNs of the checkpoint (groups text, image)"),
    ("1t1i", "1t1i", "is 1t1i already: nothing to upcycle"),
    ("1t1i", "dense", "upcycling makes expert groups"),
    ("1t1i", "4q4i", "names modality letter 'q'"),
])
def test_what_cannot_be_upcycled_is_one_clear_error(source, target, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        group_sources(source, target, MODALITIES)


def tiny_model(experts: str, **overrides):
    config = mp.MoMaConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                           use_cpu_initialization=True, add_bias_linear=True, hidden_dropout=0.0,
                           attention_dropout=0.0, moma_experts=experts, moma_vocab_ranges={"image": (32, 64)},
                           mod_interval=2, mod_capacity=1.0, moma_post_norm=True, **overrides)
    model = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config, use_te=False), vocab_size=64,
                            max_sequence_length=16)
    return model.eval()


@pytest.mark.parametrize("source, target", [("dense", "1t1i"), ("dense", "8x"), ("1t1i", "4t4i"),
                                            ("1t1i", "2t1i"), ("1x", "4t4i")])
def test_upcycled_experts_are_copies_and_the_model_computes_what_its_source_does(
        megatron_single_process, monkeypatch, source, target):
    """Every expert of a target group equals its source FFN, bit for bit, and everything but the routers
    and aux routers is copied; with forced-balanced routing (each token to exactly one expert) and
    gates forced to 1, the upcycled model's logits equal the source model's."""
    torch.manual_seed(0)
    before = tiny_model(source, moma_force_balanced_routing=True)
    with torch.no_grad():  # trained-looking aux routers and MoD routers, so that copies show
        for name, buffer in before.named_buffers():
            if name.endswith(".trained"):
                buffer.fill_(True)
    state = before.state_dict()
    plan = group_sources(source, target, MODALITIES)
    targets = parse_expert_groups(target, MODALITIES)
    upcycled = upcycle_model_state(state, plan, targets, init_std=0.02, router_noise=0.01, seed=3)
    after = tiny_model(target, moma_force_balanced_routing=True)
    after.load_state_dict(upcycled, strict=True)  # every key of the target model, nothing else

    counts = {group.name: group.num_experts for group in targets}
    for name, value in after.state_dict().items():
        parts = name.split(".")  # decoder.layers.L.mlp.experts.G.e.linear_fc1.weight, ...mlp.router.G.weight
        if ".mlp.experts." in name:
            origin = f"decoder.layers.{parts[2]}.mlp." + (
                "" if plan[parts[5]] is DENSE else f"experts.{plan[parts[5]]}.0.") + ".".join(parts[7:])
            assert torch.equal(value, state[origin]), name
        elif ".mlp.router." in name or ".mlp.aux_router." in name:
            group = parts[5]
            kept = plan[group] == group and counts[group] == 1  # a group that keeps its one expert
            if kept:
                assert torch.equal(value, state[name]), name
            elif name.endswith(".trained"):
                assert not value, name  # an upcycled group's aux router starts untrained
            elif ".mlp.router." in name and plan[group] is not DENSE:  # the source row, copied, plus noise
                source_row = state[f"decoder.layers.{parts[2]}.mlp.router.{plan[group]}.weight"]
                assert torch.allclose(value, source_row.expand_as(value), atol=0.1)
                assert not torch.equal(value[0], value[-1])
        elif torch.is_tensor(value):  # attention, norms, embeddings, MoD routers and their aux routers
            assert torch.equal(value, state[name]), name

    # The oracle: gates of 1, each token to exactly one expert (8 tokens of each modality per sample).
    monkeypatch.setattr("moma_plugin.moma_mlp.sigmoid_scores", lambda logits, noise=False: torch.ones_like(logits))
    tokens = torch.cat([torch.randint(0, 32, (2, 8)), torch.randint(32, 64, (2, 8))], dim=1)
    torch.testing.assert_close(logits(after, tokens), logits(before, tokens), rtol=1e-5, atol=1e-5)


def logits(model, tokens):
    """The tiny model's logits of [2, 16] ``tokens`` (ids 32 and up are image tokens)."""
    with torch.no_grad():
        return model(tokens, torch.arange(16).expand(2, 16), None, modality_ids=(tokens >= 32).long())


# -- the upcycled phase of moma-pretrain --------------------------------------------------------------
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "4", "--eval-iters", "2", "--no-progress-bar", "--log-interval", "1",
        "--eval-interval", "100", "--lr", "1e-3", "--lr-warmup-iters", "2", "--mod-interval", "2"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_continues_from_an_upcycled_checkpoint(megatron_single_process, tmp_path, capsys):
    """1t1i for 3 iterations (saved), upcycled to 4t4i, 3 more: the schedule restarts (warm-up again),
    the data continues (the sampler ends where 6 straight iterations of the source end), tokens and
    FLOPs continue from the source's, Gumbel noise is on, and the new phase saves and resumes as any run."""
    source = loop.pretrain([*TINY, "--moma-experts", "1t1i", "--train-iters", "6", "--save-interval", "3",
                            "--run-dir", str(tmp_path / "source")])
    assert source.status == "completed"
    saved = tmp_path / "source" / "checkpoints"
    upcycle(saved, tmp_path / "up", "4t4i", iteration=3)
    with pytest.raises(SystemExit, match="holds checkpoints already"):
        upcycle_tool.main(["--load", str(saved), "--save", str(tmp_path / "up"), "--moma-experts", "4t4i"])
    with pytest.raises(SystemExit, match="--hidden-size: checkpoint 32, now 64"):  # flags the upcycled model lacks
        loop.pretrain([*TINY, "--moma-experts", "4t4i", "--train-iters", "3", "--save", str(tmp_path / "up"),
                       "--hidden-size", "64", "--run-dir", str(tmp_path / "wrong")])
    up = loop.pretrain([*TINY, "--moma-experts", "4t4i", "--train-iters", "3", "--save", str(tmp_path / "up"),
                        "--run-dir", str(tmp_path / "phase2")])
    assert up.status == "completed" and list(up.train_losses) == [1, 2, 3]
    assert "upcycled phase: iteration 3 of 1t1i" in capsys.readouterr().out
    train = [r for r in read_jsonl(tmp_path / "phase2" / "metrics.jsonl") if r["kind"] == "train"]
    source_train = {r["iteration"]: r for r in read_jsonl(tmp_path / "source" / "metrics.jsonl") if r["kind"] == "train"}
    assert [r["lr"] for r in train][:2] == pytest.approx([0.5e-3, 1e-3])  # warm-up again
    assert train[0]["tokens"] == source_train[4]["tokens"]  # counted on from the source's 3 iterations
    assert train[0]["flops"] > source_train[3]["flops"]
    run = json.loads((tmp_path / "phase2" / "run.json").read_text())
    assert run["args"]["moma_router_gumbel_noise"] is True and run["moma_experts"] == "4t4i"
    # The data position: the same samples as the source's iterations 4-6 (4t4i asks the same 1:1 ratio).
    ended = checkpointing.load_checkpoint(tmp_path / "up", 0)
    assert ended["iteration"] == 3 and ended["moma"]["sampler"] == \
        checkpointing.load_checkpoint(saved, 0, iteration=6)["moma"]["sampler"]
    assert ended["moma"]["consumed_tokens"] == checkpointing.load_checkpoint(saved, 0, iteration=6)["moma"]["consumed_tokens"]
    # The flag wins over the default: no Gumbel noise when asked.
    upcycle(saved, tmp_path / "up-quiet", "4t4i", iteration=3)
    quiet = loop.pretrain([*TINY, "--moma-experts", "4t4i", "--train-iters", "3", "--save",
                           str(tmp_path / "up-quiet"), "--run-dir", str(tmp_path / "quiet"), "--no-moma-router-gumbel-noise"])
    assert json.loads((tmp_path / "quiet" / "run.json").read_text())["args"]["moma_router_gumbel_noise"] is False
    assert quiet.train_losses[1] != up.train_losses[1]  # the same weights and data: the noise routed differently


# -- tensor- and expert-parallel runs -----------------------------------------------------------------
PHASE = [*TINY, "--train-iters", "3", "--no-moma-router-gumbel-noise", "--moma-experts", "4t4i"]


def _parallel_ranks(rank, port, workdir, phase):
    """Phase "source": 1t1i trained at TP 2. Phase "upcycled": the TP 2 upcycled checkpoint trained on at
    TP 2, and the 4t4i phase of a TP 1 upcycled checkpoint with its experts split over two ranks (EP 2)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if phase == "source":
        loop.pretrain([*TINY, "--moma-experts", "1t1i", "--train-iters", "3", "--tensor-model-parallel-size", "2",
                       "--run-dir", f"{workdir}/source-tp2"])
    else:
        losses = {"tp2": loop.pretrain([*PHASE, "--tensor-model-parallel-size", "2", "--save", f"{workdir}/up-tp2",
                                        "--run-dir", f"{workdir}/phase-tp2"]).train_losses,
                  "tp1->tp2": loop.pretrain([*PHASE, "--tensor-model-parallel-size", "2", "--save",
                                             f"{workdir}/up-to-tp2", "--run-dir", f"{workdir}/phase-to-tp2"]).train_losses,
                  "ep2": loop.pretrain([*PHASE, "--expert-model-parallel-size", "2", "--micro-batch-size", "2",
                                        "--global-batch-size", "4", "--save", f"{workdir}/up-ep2",
                                        "--run-dir", f"{workdir}/phase-ep2"]).train_losses}
        torch.save(losses, f"{workdir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_upcycling_at_tensor_and_expert_parallel_sizes(megatron_single_process, tmp_path):
    """A TP 2 source upcycled and trained on at TP 2 or (re-split) at TP 1, a TP 1 source upcycled for
    TP 2, and a TP 1 upcycled checkpoint trained on under EP 2 give the losses of the same phase in one
    process (the CPU initialisation does not depend on TP, and the fresh routers depend on the seed
    only)."""
    loop.pretrain([*TINY, "--moma-experts", "1t1i", "--train-iters", "3", "--run-dir", str(tmp_path / "source")])
    for name in ("up", "up-ep1", "up-ep2"):
        upcycle(tmp_path / "source" / "checkpoints", tmp_path / name, "4t4i")
    upcycle(tmp_path / "source" / "checkpoints", tmp_path / "up-to-tp2", "4t4i", tensor_model_parallel_size=2)
    reference = loop.pretrain([*PHASE, "--save", str(tmp_path / "up"), "--run-dir", str(tmp_path / "phase")])
    accumulated = loop.pretrain([*PHASE, "--micro-batch-size", "2", "--global-batch-size", "4", "--save",
                                 str(tmp_path / "up-ep1"), "--run-dir", str(tmp_path / "phase-ep1")])
    run_ranks(_parallel_ranks, (free_port(), str(tmp_path), "source"), timeout_s=300, what="the TP 2 source")
    upcycle(tmp_path / "source-tp2" / "checkpoints", tmp_path / "up-tp2", "4t4i")  # one process, both TP files
    run_ranks(_parallel_ranks, (free_port(), str(tmp_path), "upcycled"), timeout_s=300, what="the TP 2 and EP 2 runs")
    for rank in range(2):
        losses = torch.load(tmp_path / f"rank{rank}.pt")
        assert losses["tp2"] == pytest.approx(reference.train_losses, rel=1e-5)
        assert losses["tp1->tp2"] == pytest.approx(reference.train_losses, rel=1e-5)  # re-split for TP 2
        assert losses["ep2"] == pytest.approx(accumulated.train_losses, rel=1e-5)
    # The TP 2 source upcycled to one TP rank (its shards joined) trains on in one process.
    upcycle(tmp_path / "source-tp2" / "checkpoints", tmp_path / "up-to-tp1", "4t4i", tensor_model_parallel_size=1)
    joined = loop.pretrain([*PHASE, "--save", str(tmp_path / "up-to-tp1"), "--run-dir", str(tmp_path / "phase-to-tp1")])
    assert joined.train_losses == pytest.approx(reference.train_losses, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["--use-torch-fsdp2"], ["--deepspeed", "--deepspeed-config", "examples/deepspeed/zero2.json"]],
                         ids=["fsdp2", "deepspeed"])
def test_fsdp2_and_deepspeed_checkpoints_upcycle(megatron_single_process, tmp_path, engine, monkeypatch):
    """An FSDP2 checkpoint (weights in its sharded DCP directory) and a DeepSpeed one upcycle like a ddp
    one: the upcycled weights are those of the source's whole tensors, and the new phase trains under
    the same engine, saves and resumes."""
    monkeypatch.chdir(REPO)
    loop.pretrain([*TINY, "--moma-experts", "1t1i", "--train-iters", "3", *engine, "--run-dir", str(tmp_path / "source")])
    saved = tmp_path / "source" / "checkpoints"
    upcycle(saved, tmp_path / "up", "4t4i", seed=5)
    found = checkpointing.find_checkpoint(saved, 0)
    whole = per_expert_state(checkpointing.full_state(found.state, found.directory, 0)["model"],
                             parse_expert_groups("1t1i", MODALITIES))
    expected = upcycle_model_state(whole, group_sources("1t1i", "4t4i", MODALITIES),
                                   parse_expert_groups("4t4i", MODALITIES), init_std=0.02, seed=5)
    got = checkpointing.load_checkpoint(tmp_path / "up", 0)["model"]
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items() if torch.is_tensor(v))
    phase = [*PHASE, *engine, "--save", str(tmp_path / "up"), "--run-dir", str(tmp_path / "phase")]
    stopped = loop.pretrain([*phase, "--exit-interval", "2"])
    resumed = loop.pretrain(phase)
    assert stopped.status == "exit-interval" and resumed.status == "completed" and list(resumed.train_losses) == [3]
    assert all(math.isfinite(v) for v in [*stopped.train_losses.values(), *resumed.train_losses.values()])



def test_tp_layout_split_and_merge_are_inverse():
    """Whole tensors cut for TP 2 and 4 and joined again are the same tensors; SwiGLU's fc1 shards hold
    a slice of the gate and one of the up projection; the vocabulary is re-padded."""
    from moma_plugin.training import tp_layout

    g = torch.Generator().manual_seed(0)
    whole = {"embedding.word_embeddings.weight": torch.randn(512, 8, generator=g),
             "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(24, 8, generator=g),
             "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(8, 8, generator=g),
             "decoder.layers.0.mlp.experts.text.1.linear_fc1.weight": torch.randn(16, 8, generator=g),
             "decoder.layers.0.mlp.experts.text.1.linear_fc1.bias": torch.randn(16, generator=g),
             "decoder.layers.0.mlp.experts.text.1.linear_fc2.weight": torch.randn(8, 8, generator=g),
             "decoder.layers.0.mlp.experts.text.1.linear_fc2.bias": torch.randn(8, generator=g),
             "decoder.layers.0.mlp.router.text.weight": torch.randn(2, 8, generator=g),
             "decoder.layers.0.self_attention.linear_qkv._extra_state": None}
    for tp in (2, 4):
        shards = tp_layout.split(whole, tp, vocab_rows=512)
        merged = tp_layout.merge(shards)
        assert merged.keys() == whole.keys()
        assert all(torch.equal(merged[k], v) for k, v in whole.items() if torch.is_tensor(v))
        fc1 = shards[1]["decoder.layers.0.mlp.experts.text.1.linear_fc1.weight"]
        gate, up = whole["decoder.layers.0.mlp.experts.text.1.linear_fc1.weight"].chunk(2)
        assert torch.equal(fc1, torch.cat([gate.chunk(tp)[1], up.chunk(tp)[1]]))
        assert torch.equal(shards[1]["decoder.layers.0.mlp.experts.text.1.linear_fc2.bias"],
                           whole["decoder.layers.0.mlp.experts.text.1.linear_fc2.bias"])  # replicated
    padded = tp_layout.merge(tp_layout.split(whole, 2, vocab_rows=768))["embedding.word_embeddings.weight"]
    assert padded.shape == (768, 8) and torch.equal(padded[:512], whole["embedding.word_embeddings.weight"])
    assert not padded[512:].any()


# -- dense -> Mixture-of-Transformers -----------------------------------------------------------------
@pytest.mark.parametrize("target, mot", [("1t1i", "all"), ("1t1i", "ffn,norms"), ("dense", "attention")])
def test_dense_upcycled_to_mot_computes_what_the_dense_model_does(megatron_single_process, target, mot):
    """Every modality's copy starts from the dense weights, so on mixed sequences the MoT model's logits
    equal the dense model's; the copies are bit-for-bit, and then the modalities' weights can diverge."""
    torch.manual_seed(0)
    dense = tiny_model("dense")
    state = dense.state_dict()
    after = tiny_model(target, mot=mot)
    untied = upcycle_model_state(state, group_sources("dense", target, MODALITIES, untying=True),
                                 after.config.moma_expert_groups, init_std=0.02, seed=3)
    untied = untie_per_modality(untied, parse_mot_parts(mot), MODALITIES)
    after.load_state_dict(untied, strict=True)
    assert not any(".router." in key for key in untied)  # untied FFNs are not routed
    if "attention" in mot:
        qkv = after.decoder.layers[0].self_attention.linear_qkv.weight
        assert qkv.dim() == 3 and torch.equal(qkv[0], qkv[1])
        assert torch.equal(qkv[1], state["decoder.layers.0.self_attention.linear_qkv.weight"])
    tokens = torch.randint(0, 64, (2, 16))
    expected = logits(dense, tokens)
    torch.testing.assert_close(logits(after, tokens), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for name, param in after.named_parameters():  # the check can fail: image weights matter
            if name.endswith(("linear_qkv.weight", "layernorm.weight")) and ".layers." in name:
                param[1].mul_(1.5)
            elif name.endswith("experts.fc1_weight"):
                param[1].mul_(1.5)
    assert not torch.allclose(logits(after, tokens), expected, atol=1e-3)


def test_moma_upcycle_dense_to_mot_and_training_continues(megatron_single_process, tmp_path):
    source = loop.pretrain([*TINY, "--moma-experts", "dense", "--train-iters", "3", "--save-interval", "3",
                            "--run-dir", str(tmp_path / "dense")])
    assert source.status == "completed"
    saved = tmp_path / "dense" / "checkpoints"
    with pytest.raises(SystemExit, match="shares a group between modalities"):
        upcycle_tool.main(["--load", str(saved), "--save", str(tmp_path / "x"), "--moma-experts", "4x", "--mot", "all"])
    upcycle_tool.main(["--load", str(saved), "--save", str(tmp_path / "mot"), "--moma-experts", "4t1i", "--mot", "all"])
    with pytest.raises(SystemExit, match="--mot: checkpoint 'ffn,attention,norms', now ''"):
        loop.pretrain([*TINY, "--moma-experts", "4t1i", "--train-iters", "3", "--save", str(tmp_path / "mot"),
                       "--run-dir", str(tmp_path / "wrong")])
    up = loop.pretrain([*TINY, "--moma-experts", "4t1i", "--mot", "all", "--train-iters", "3",
                        "--save", str(tmp_path / "mot"), "--run-dir", str(tmp_path / "phase2")])
    assert up.status == "completed" and list(up.train_losses) == [1, 2, 3]
    saved_state = checkpointing.load_checkpoint(tmp_path / "mot", 0)["model"]
    assert "decoder.layers.1.self_attention.linear_qkv.image.weight" in saved_state
    assert "decoder.layers.1.mlp.router.text.weight" in saved_state
    assert "decoder.layers.1.mlp.router.image.weight" not in saved_state
    with pytest.raises(SystemExit, match="would tie attention, norms again"):
        upcycle_tool.main(["--load", str(tmp_path / "mot"), "--save", str(tmp_path / "y"), "--moma-experts", "4t4i",
                           "--mot", "ffn"])
