"""Attacks on the data side: a killed moma-preprocess over an existing dataset, files of different
datasets mixed, --moma-vocab-ranges against the data, images that are not plain 8-bit RGB, and expert
layouts the bundled data must serve with the sampler's bound."""

import builtins
import io
import json
import multiprocessing
import os
import re
import shutil

import numpy as np
import pytest

from moma_plugin.data.dataset import PackedSequenceDataset, build_datasets
from moma_plugin.training import loop

from .test_pretrain import TINY


def _corpus(directory, words, count=10):
    """A JSONL corpus of ``count`` documents: a caption from ``words`` and a digit image."""
    from PIL import Image
    from sklearn.datasets import load_digits

    directory.mkdir(parents=True, exist_ok=True)
    images = (load_digits().images[:count] * (255 / 16)).round().astype(np.uint8)
    lines = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"d{i}.png")
        lines.append(json.dumps({"segments": [{"text": f"{words} {i} {words}"}, {"image": f"d{i}.png"}]}))
    (directory / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "docs.jsonl"


def _preprocess_argv(source, prefix, codebook, tokenizers=None):
    argv = ["--input", str(source), "--output-prefix", str(prefix), "--quiet", "--codebook-size",
            str(codebook), "--text-vocab-size", "280"]
    if tokenizers:  # saved ones: no k-means or BPE training (whose threads a forked child must not use)
        argv += ["--text-tokenizer", f"{tokenizers}/text", "--image-tokenizer", f"{tokenizers}/image"]
    return argv


def _first_text(prefix) -> str:
    """The text of document 0 of ``prefix``, decoded with the tokenizers beside it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moma_plugin.data.image_tokenizer import load_image_tokenizer
    from moma_plugin.data.preprocess import DocumentEncoder
    from moma_plugin.data.text_tokenizer import load_text_tokenizer
    from moma_plugin.data.vocab import VocabularyLayout

    build_datasets([str(prefix)], 8, 0.2)  # opens it: refuses files that do not belong together
    encoder = DocumentEncoder(load_text_tokenizer(f"{prefix}.tokenizers/text"),
                              load_image_tokenizer(f"{prefix}.tokenizers/image"),
                              VocabularyLayout.load(f"{prefix}.vocab.json"))
    indexed = IndexedDataset(str(prefix))  # alive while its memory-mapped tokens are read
    return next(value for kind, value in encoder.decode(np.array(indexed[0])) if kind == "text")


def _preprocess_killed_at(argv, kill_at):
    """Child process: moma-preprocess dying (os._exit, as kill -9) before its ``kill_at``-th file
    operation (renames, deletions, fsyncs, and every file opened for writing)."""
    from moma_plugin.data import preprocess

    count = {"n": 0}

    def tick():
        count["n"] += 1
        if count["n"] == kill_at:
            os._exit(9)

    def lethal(function):
        def wrapper(*args, **kwargs):
            tick()
            return function(*args, **kwargs)
        return wrapper

    real_open = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            tick()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = opening
    for module, name in ((os, "replace"), (os, "rename"), (os, "unlink"), (os, "fsync"),
                         (shutil, "rmtree")):
        setattr(module, name, lethal(getattr(module, name)))
    preprocess.main(argv)
    os._exit(0)


def test_a_killed_preprocess_never_leaves_old_and_new_files_mixed(tmp_path):
    from moma_plugin.data.preprocess import main

    old_source = _corpus(tmp_path / "old", "apple orchard")
    new_source = _corpus(tmp_path / "new", "zebra quartz")
    original = tmp_path / "original" / "ds"
    main(_preprocess_argv(old_source, original, 16))
    assert _first_text(original) == "apple orchard 0 apple orchard"
    main(_preprocess_argv(new_source, tmp_path / "trained" / "ds", 24))  # the new run's tokenizers
    new_argv = lambda prefix: _preprocess_argv(new_source, prefix, 24, tmp_path / "trained" / "ds.tokenizers")
    context = multiprocessing.get_context("fork")
    seen = set()
    for kill_at in range(1, 200):
        directory = tmp_path / f"kill{kill_at}"
        shutil.copytree(original.parent, directory)
        prefix = directory / "ds"
        child = context.Process(target=_preprocess_killed_at, args=(new_argv(prefix), kill_at))
        child.start()
        child.join(120)
        if child.is_alive():
            child.kill()
            pytest.fail(f"the preprocessing child hung (kill point {kill_at})")
        try:
            text = _first_text(prefix)
        except FileNotFoundError as e:  # no dataset at the prefix (its vocabulary not yet in), never mixed
            assert "run moma-preprocess again" in str(e) or "no dataset at prefix" in str(e), e
            seen.add("none")
        else:
            assert text in ("apple orchard 0 apple orchard", "zebra quartz 0 zebra quartz"), text
            seen.add(text.split()[0])
        if child.exitcode == 0:
            break
    assert child.exitcode == 0 and {"apple", "zebra"} <= seen, seen
    assert not list(directory.glob(".ds.partial-*"))  # a finished run leaves nothing behind


@pytest.fixture
def two_datasets(tmp_path):
    from moma_plugin.data.preprocess import main

    main(_preprocess_argv(_corpus(tmp_path / "a", "apple orchard", 10), tmp_path / "a" / "ds", 16))
    main(_preprocess_argv(_corpus(tmp_path / "b", "zebra", 4), tmp_path / "b" / "ds", 16))
    return tmp_path / "a" / "ds", tmp_path / "b" / "ds"


@pytest.mark.parametrize("suffix", [".idx", ".bin", ".counts.npy"])
def test_a_file_of_another_dataset_is_refused(two_datasets, suffix):
    a, b = two_datasets
    shutil.copy(f"{b}{suffix}", f"{a}{suffix}")
    with pytest.raises(ValueError, match=f"{a}{suffix}".replace(".", r"\.") + ".*moma-preprocess"):
        PackedSequenceDataset(a, 8, "train", 0.2)


def test_an_idx_that_covers_less_than_the_bin_is_refused_without_checksums(two_datasets):
    """Datasets written by other tools carry no checksums: the .idx must still describe the .bin."""
    a, b = two_datasets
    vocab = json.loads(open(f"{a}.vocab.json").read())
    vocab.pop("files", None)
    open(f"{a}.vocab.json", "w").write(json.dumps(vocab))
    shutil.copy(f"{b}.idx", f"{a}.idx")
    with pytest.raises(ValueError, match=r"\.idx describes .* bytes of tokens but .*\.bin holds"):
        PackedSequenceDataset(a, 8, "train", 0.2)


def test_token_ids_beyond_the_vocabulary_name_the_dataset_and_document(two_datasets):
    a, _ = two_datasets
    vocab = json.loads(open(f"{a}.vocab.json").read())
    vocab["modality_sizes"]["image"] = 4  # a smaller vocabulary than the data was written with
    vocab.pop("vocab_size")
    open(f"{a}.vocab.json", "w").write(json.dumps(vocab))
    dataset = PackedSequenceDataset(a, 8, "train", 0.2)
    with pytest.raises(ValueError, match=rf"{a}: document \d+ .* holds token id \d+, outside the vocabulary"):
        dataset.modality_counts()


# -- --moma-vocab-ranges ------------------------------------------------------------------------------
@pytest.mark.parametrize("ranges", ["image:0:10", "image:459:800", "image:400:500"])
def test_moma_vocab_ranges_that_disagree_with_the_data_are_refused(megatron_single_process, tmp_path,
                                                                  ranges):
    with pytest.raises(SystemExit, match=rf"--moma-vocab-ranges {ranges} disagrees with the data.*"
                                         r"--moma-vocab-ranges image:459:715"):
        loop.pretrain([*TINY, "--train-iters", "1", "--moma-vocab-ranges", ranges,
                       "--run-dir", str(tmp_path)])


def test_moma_vocab_ranges_equal_to_the_data_are_used(megatron_single_process, tmp_path):
    result = loop.pretrain([*TINY, "--train-iters", "1", "--moma-vocab-ranges", "image:459:715",
                            "--run-dir", str(tmp_path)])
    assert result.status == "completed"


# -- images that are not 8-bit RGB ----------------------------------------------------------------------
def test_16_bit_greyscale_is_scaled_and_transparency_and_frames_are_reported(tmp_path, capsys):
    from collections import Counter

    from PIL import Image

    from moma_plugin.data import preprocess

    gradient = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000 of 65,535
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    deep = preprocess.load_image(tmp_path / "deep.png")
    assert deep.dtype == np.uint8 and deep.shape == (8, 8, 3)
    assert deep.min() < 10 and deep.max() > 240  # not a solid white image
    np.testing.assert_allclose(deep[..., 0].astype(float), gradient.astype(float) * 255 / 65535, atol=1)

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    frames = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (10, 250)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    notes = Counter()
    preprocess.load_image(tmp_path / "deep.png", notes)
    assert preprocess.load_image(tmp_path / "alpha.png", notes)[0, 0].tolist() == [200, 0, 0]
    assert preprocess.load_image(tmp_path / "anim.gif", notes).mean() < 50  # the first frame
    ALPHA_DROPPED, DEEP_CONVERTED, FRAMES_DROPPED = (preprocess.ALPHA_DROPPED, preprocess.DEEP_CONVERTED,
                                                     preprocess.FRAMES_DROPPED)
    assert notes == {DEEP_CONVERTED: 1, ALPHA_DROPPED: 1, FRAMES_DROPPED: 1}
    main = preprocess.main

    lines = [json.dumps({"segments": [{"text": f"picture {name}"}, {"image": name}]})
             for name in ("deep.png", "alpha.png", "anim.gif", "alpha.png")]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix", str(tmp_path / "out"), "--quiet",
          "--codebook-size", "8", "--patch-size", "4", "--image-size", "8"])
    err = capsys.readouterr().err
    assert f"note: 2 image(s) {ALPHA_DROPPED}" in err and f"note: 1 image(s) {FRAMES_DROPPED}" in err
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["image_notes"] == {DEEP_CONVERTED: 1, ALPHA_DROPPED: 2, FRAMES_DROPPED: 1}


# -- every paper layout on the bundled data ------------------------------------------------------------
def test_7t1i_on_the_interleaved_data_is_refused_with_the_fix(megatron_single_process, tmp_path):
    with pytest.raises(SystemExit) as error:
        loop.pretrain([*TINY, "--moma-experts", "7t1i", "--train-iters", "1", "--run-dir", str(tmp_path)])
    message = str(error.value)
    assert "the balanced sampler cannot serve 7t1i" in message
    assert "--balance-tolerance" in message and "--no-balanced-sampler" in message
    assert "--data-path 0.26 bundled:interleaved 0.74 bundled:text" in message


def test_6t2i_on_the_interleaved_data_warns_and_counts_the_misses(megatron_single_process, tmp_path,
                                                                  capsys):
    loop.pretrain([*TINY, "--moma-experts", "6t2i", "--train-iters", "2", "--log-interval", "1",
                   "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"image is 4\d\.\d% of the data's tokens, the experts' share 25\.0%", out)
    assert "--data-path 0.52 bundled:interleaved 0.48 bundled:text" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("sampler_violations" in r for r in records if r["kind"] == "train")


@pytest.mark.parametrize("experts, data_path", [
    ("7t1i", ["0.26", "bundled:interleaved", "0.74", "bundled:text"]),
    ("6t2i", ["0.52", "bundled:interleaved", "0.48", "bundled:text"]),
    ("6t2i", ["bundled:interleaved"]),
])
def test_the_blends_serve_every_paper_layout_within_the_bound(experts, data_path):
    from moma_plugin.data.corpus import resolve_data_path
    from moma_plugin.data.sampler import BalancedSampler, target_shares_from_experts

    train, _ = build_datasets(resolve_data_path(data_path), 128, 0.05, 1234)
    target = target_shares_from_experts(experts)
    sampler = BalancedSampler(train.modality_counts(), 8, 2, target, 0.05, seed=1234, strict=False)
    for _ in range(300):  # 4,800 samples: several passes over the interleaved part
        sampler.next_step()
    stats = sampler.stats()
    if len(data_path) == 1:  # the interleaved data alone (48% image) cannot keep 6t2i's 25% for long
        assert stats["violations"] > 0
    else:
        assert stats["violations"] == 0 and stats["worst_deviation"] <= 0.05
        assert stats["share_mean"][1] == pytest.approx(target[1], abs=0.02)
