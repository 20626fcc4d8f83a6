"""The tools after pretraining: ``moma-train-aux-routers`` (stage 2), ``--aux-router-joint``, MoD flags
of ``moma-pretrain``, and ``moma-generate`` from a checkpoint (KV cache against recompute, images)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moma_plugin.training import checkpointing, loop
from moma_plugin.training.aux_routers import train_aux_routers
from moma_plugin.training.generate import run as generate_run

from .test_pretrain import TINY, read_jsonl

pytestmark = pytest.mark.usefixtures("megatron_single_process")
MOD = ["--mod-interval", "2", "--mod-capacity", "0.5"]


@pytest.fixture(scope="module")
def pretrained(megatron_single_process, tmp_path_factory):
    """A tiny MoD 2t2i model pretrained for 30 iterations (no aux routers trained)."""
    run_dir = tmp_path_factory.mktemp("mod_run")
    result = loop.pretrain([*TINY, *MOD, "--moma-experts", "2t2i", "--train-iters", "30",
                            "--log-interval", "10", "--eval-interval", "100",
                            "--run-dir", str(run_dir)])
    assert result.status == "completed"
    return run_dir


def test_mod_pretraining_logs_processed_share_per_modality(pretrained):
    train = [r for r in read_jsonl(pretrained / "metrics.jsonl") if r["kind"] == "train"]
    for record in train:
        shares = {k: v for k, v in record.items() if k.startswith("mod/") and k.endswith("processed_frac")}
        assert {k.split("/")[1] for k in shares} == {"layer0"}  # 2 layers, MoD on layer index 0
        # Capacity 0.5 of the tokens overall: the per-modality shares straddle it.
        assert min(shares.values()) <= 0.5 + 1e-9 <= max(shares.values()) + 1e-9
        assert "mod_processed_text" in record
    run = json.loads((pretrained / "run.json").read_text())
    dense_run_flops = run["flops_per_token"]
    assert run["args"]["mod_interval"] == 2 and dense_run_flops > 0


def test_stage_two_beats_all_zeros_and_saves_a_causal_checkpoint(pretrained, tmp_path):
    report = train_aux_routers(["--load", str(pretrained / "checkpoints"), "--save", str(tmp_path),
                                "--train-iters", "40", "--log-interval", "20", "--eval-iters", "2"])
    held_out = report["held_out_aux"]
    assert held_out["aux/accuracy"] > held_out["aux/all_zeros_accuracy"] + 0.02
    for layer, modality, kind in (("layer0", "text", "mod"), ("layer1", "image", "experts")):
        for metric in ("accuracy", "precision", "recall"):
            assert 0 <= held_out[f"aux/{layer}/{modality}/{kind}_{metric}"] <= 1
    for mode in ("train", "causal"):
        losses = report[f"held_out_loss_{mode}_routing"]
        assert torch.isfinite(torch.tensor([losses["loss_text"], losses["loss_image"]])).all()
    # Same iteration, model weights of the original except the aux routers, flags set.
    original = checkpointing.load_checkpoint(str(pretrained / "checkpoints"), 0)
    saved = checkpointing.load_checkpoint(str(tmp_path), 0)
    assert saved["iteration"] == original["iteration"] == 30
    for key, value in original["model"].items():
        if not isinstance(value, torch.Tensor):  # Megatron's _extra_state entries
            continue
        if "aux_router" in key:
            if key.endswith("trained"):
                assert not value and saved["model"][key]
            else:
                assert not torch.equal(value, saved["model"][key]), key
        else:
            assert torch.equal(value, saved["model"][key]), key
    assert json.loads((Path(report["checkpoint_saved"]) / "aux_routers.json").read_text())["train_iters"] == 40
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records if r["kind"] == "aux_train"] == [20, 40]
    assert "aux/layer0/text/mod_precision" in records[0] and "aux/layer1/image/experts_recall" in records[1]
    assert records[-1]["kind"] == "aux_eval" and "causal_routing_loss_image" in records[-1]

    # moma-generate from it: KV cache and recompute agree; an image prompt yields a PNG.
    out = tmp_path / "gen"
    summary = generate_run(["--load", str(tmp_path), "--compare-kv-cache", "--max-new-tokens", "20",
                            "--output-dir", str(out), "--prompt", "Here is a handwritten",
                            "--prompt", "First a three:<image>"])
    assert summary["kv_cache_matches_recompute"] is True
    assert set(summary["tokens_per_s"]) == {"kv_cache", "recompute"}
    image_output = summary["outputs"][1]
    assert image_output["images"], image_output["text"]
    png = Path(image_output["images"][0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:  # the 16 x 16 image enlarged by nearest neighbour, to be seen
        assert image.size == (256, 256)
        pixels = np.asarray(image)
        assert (pixels[:16, :16] == pixels[0, 0]).all()  # one source pixel -> a 16 x 16 block
    again = generate_run(["--load", str(tmp_path), "--max-new-tokens", "4", "--output-dir", str(out)])
    first_dir, second_dir = Path(image_output["images"][0]).parent, Path(again["outputs"][0]["output_dir"])
    assert first_dir != second_dir and first_dir.parent == second_dir.parent == out  # nothing overwritten
    assert png.exists()
    begin, end = 457, 458  # bundled vocabulary: <boi>, <eoi>
    new = image_output["new_tokens"]
    assert new[16] == end and all(459 <= t < 715 for t in new[:16])  # 16 codes per image, then <eoi>
    assert begin not in new[:17]


def test_causal_generation_refuses_untrained_aux_routers(pretrained, tmp_path):
    with pytest.raises(SystemExit, match="moma-train-aux-routers"):
        generate_run(["--load", str(pretrained / "checkpoints"), "--output-dir", str(tmp_path)])


def test_joint_aux_training_leaves_the_model_training_unchanged(tmp_path):
    """Stop-gradient and separate clipping: the model's losses are bit-identical with and without
    --aux-router-joint, while the aux routers learn and are marked trained. (The loop expert path:
    the grouped one is not bit-reproducible on multi-threaded CPU.)"""
    common = [*TINY, *MOD, "--moma-experts", "2t2i", "--train-iters", "8", "--log-interval", "4",
              "--eval-interval", "100", "--moma-expert-execution", "loop"]
    plain = loop.pretrain([*common, "--run-dir", str(tmp_path / "plain")])
    joint = loop.pretrain([*common, "--aux-router-joint", "--run-dir", str(tmp_path / "joint")])
    assert plain.train_losses == joint.train_losses
    assert "causal_loss_image" in joint.eval and "causal_loss" not in plain.eval
    records = [r for r in read_jsonl(tmp_path / "joint" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(0 < r["aux/accuracy"] <= 1 for r in records)
    state = checkpointing.load_checkpoint(str(tmp_path / "joint" / "checkpoints"), 0)
    assert all(bool(v) for k, v in state["model"].items() if k.endswith("aux_router.trained"))


@pytest.mark.parametrize("flags, message", [
    (["--mod-interval", "2", "--mod-capacity", "1.5"], r"--mod-capacity must lie in \(0, 1\]"),
    (["--mod-interval", "-1"], "--mod-interval -1 and --mod-start-layer 0 must be >= 0"),
    (["--mod-interval", "2", "--mod-start-layer", "5"], "--mod-start-layer 5 leaves no MoD layer"),
])
def test_bad_mod_flags_are_clear_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        loop.pretrain([*TINY, *flags, "--train-iters", "1", "--run-dir", str(tmp_path)])
    assert re.search(message, capsys.readouterr().err)


def test_checkpoint_with_other_mod_layout_is_refused(pretrained, tmp_path):
    with pytest.raises(SystemExit, match="--mod-interval"):
        loop.pretrain([*TINY, "--moma-experts", "2t2i", "--train-iters", "31",
                       "--load", str(pretrained / "checkpoints"), "--run-dir", str(tmp_path)])


def _stage_two_rank(rank, port, load, workdir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    save = checkpointing.save_checkpoint

    def keep_a_copy(directory, iteration, state, tp_rank, writes, **kwargs):  # every rank's routers
        torch.save({k: v for k, v in state["model"].items() if "aux_router" in k},
                   f"{workdir}/routers{rank}.pt")
        return save(directory, iteration, state, tp_rank, writes=writes, **kwargs)

    checkpointing.save_checkpoint = keep_a_copy
    report = train_aux_routers(["--load", load, "--save", f"{workdir}/aux", "--train-iters", "6",
                                "--log-interval", "3", "--eval-iters", "1"])
    torch.save(report["held_out_aux"], f"{workdir}/report{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_stage_two_over_two_data_parallel_ranks(pretrained, tmp_path):
    """Each rank trains on its own micro-batches; gradients are averaged, so both ranks hold the same
    routers (rank 0 writes the checkpoint) and report the same held-out numbers."""
    from .conftest import free_port, run_ranks

    run_ranks(_stage_two_rank, (free_port(), str(pretrained / "checkpoints"), str(tmp_path)))
    reports = [torch.load(tmp_path / f"report{r}.pt", weights_only=False) for r in range(2)]
    assert reports[0] == reports[1]
    routers = [torch.load(tmp_path / f"routers{r}.pt") for r in range(2)]
    assert routers[0].keys() == routers[1].keys()
    for key in routers[0]:
        torch.testing.assert_close(routers[0][key], routers[1][key], rtol=1e-6, atol=1e-7, msg=key)
    state = checkpointing.load_checkpoint(str(tmp_path / "aux"), 0)
    original = checkpointing.load_checkpoint(str(pretrained / "checkpoints"), 0)
    moved = [k for k, v in original["model"].items()
             if "aux_router.fc" in k and not torch.equal(v, state["model"][k])]
    assert moved and all(bool(v) for k, v in state["model"].items() if k.endswith("aux_router.trained"))


def test_render_writes_finished_images_and_marks_the_rest(tmp_path):
    from moma_plugin.data.corpus import bundled_dataset_prefix
    from moma_plugin.data.vocab import VocabularyLayout
    from moma_plugin.training.generate import load_tokenizers, render

    prefix = bundled_dataset_prefix()
    layout = VocabularyLayout.load(f"{prefix}.vocab.json")
    text, image = load_tokenizers(prefix, layout)
    codes = [layout.range_of("image")[0] + i for i in range(image.tokens_per_image())]
    ids = (text.encode("Two is even.") + [layout.begin_id("image"), *codes, layout.end_id("image"),
                                          layout.eod_id]
           + text.encode("Then") + [layout.begin_id("image"), *codes[:3]])
    out = render(ids, text, image, layout, tmp_path / "sample")
    assert out["images"] == [str(tmp_path / "sample_0.png")]
    assert Path(out["images"][0]).read_bytes()[:4] == b"\x89PNG"
    assert out["text"].startswith("Two is even.")
    assert out["text"].index("[image 0:") < out["text"].index("<eod>") < out["text"].index("Then")
    assert out["text"].endswith("[unfinished image: 3 codes]")
