"""Vocabulary layout, indexed-dataset packing, blending, bad input in preprocessing."""

import json

import numpy as np
import pytest

from moma_plugin.data.dataset import (
    BlendedDataset,
    PackedSequenceDataset,
    parse_data_path,
    split_documents,
    write_indexed_dataset,
)
from moma_plugin.data.preprocess import BadDocument, parse_line, read_documents
from moma_plugin.data.vocab import VocabularyLayout


def test_vocabulary_layout_ranges_and_json(tmp_path):
    layout = VocabularyLayout(text_size=100, modality_sizes={"image": 50, "speech": 10})
    assert layout.modalities == ("text", "image", "speech")
    assert layout.eod_id == 100
    assert (layout.begin_id("image"), layout.end_id("image")) == (101, 102)
    assert (layout.begin_id("speech"), layout.end_id("speech")) == (103, 104)
    assert layout.range_of("image") == (105, 155) and layout.range_of("speech") == (155, 165)
    assert layout.vocab_size == 165
    ids = layout.modality_ids([0, 99, 100, 101, 104, 105, 154, 155, 164])
    assert ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 2]  # sentinels and end-of-doc are text
    layout.save(tmp_path / "v.json")
    assert VocabularyLayout.load(tmp_path / "v.json") == layout
    assert json.loads((tmp_path / "v.json").read_text())["ranges"]["image"] == [105, 155]
    with pytest.raises(ValueError, match="outside"):
        layout.modality_ids([165])


def _synthetic_documents(rng, layout, count):
    docs = []
    for _ in range(count):
        text = rng.integers(0, layout.text_size, rng.integers(1, 12)).tolist()
        image = rng.integers(*layout.range_of("image"), 8).tolist()
        docs.append(text + [layout.begin_id("image")] + image + [layout.end_id("image")])
    return docs


@pytest.fixture
def small_dataset(tmp_path):
    layout = VocabularyLayout(text_size=40, modality_sizes={"image": 16})
    docs = _synthetic_documents(np.random.default_rng(0), layout, 30)
    prefix = tmp_path / "ds"
    assert write_indexed_dataset(prefix, docs, layout) == 30
    return prefix, docs, layout


def test_packed_samples_are_the_document_stream(small_dataset):
    prefix, docs, layout = small_dataset
    dataset = PackedSequenceDataset(prefix, seq_length=16, split="train", valid_fraction=0.2, seed=3)
    stream = np.concatenate([np.asarray(docs[d] + [layout.eod_id]) for d in dataset.documents])
    assert len(dataset) == (len(stream) - 1) // 16
    for i in range(len(dataset)):
        item = dataset[i]
        window = stream[i * 16 : i * 16 + 17]
        assert item["tokens"].tolist() == window[:-1].tolist()
        assert item["labels"].tolist() == window[1:].tolist()
        assert item["modality_ids"].tolist() == layout.modality_ids(window[:-1]).tolist()
        assert item["position_ids"].tolist() == list(range(16))
    counts = dataset.modality_counts()
    assert counts.shape == (len(dataset), 2) and (counts.sum(1) == 16).all()
    assert counts[3].tolist() == np.bincount(dataset[3]["modality_ids"].numpy(), minlength=2).tolist()
    per_document = np.load(f"{prefix}.counts.npy")
    assert per_document.shape == (30, 2) and per_document[:, 1].tolist() == [8] * 30


def test_train_and_valid_splits_are_disjoint_and_deterministic(small_dataset):
    prefix, _, _ = small_dataset
    train = PackedSequenceDataset(prefix, 8, "train", valid_fraction=0.2, seed=3)
    valid = PackedSequenceDataset(prefix, 8, "valid", valid_fraction=0.2, seed=3)
    assert not set(train.documents) & set(valid.documents)
    assert len(set(train.documents) | set(valid.documents)) == 30
    again = PackedSequenceDataset(prefix, 8, "train", valid_fraction=0.2, seed=3)
    assert again.documents.tolist() == train.documents.tolist()
    assert split_documents(30, 0.2, 4)["valid"].tolist() != split_documents(30, 0.2, 3)["valid"].tolist()


def test_missing_dataset_and_too_short_split_are_clear(small_dataset, tmp_path):
    prefix, _, _ = small_dataset
    with pytest.raises(FileNotFoundError, match="moma-preprocess"):
        PackedSequenceDataset(tmp_path / "nothing", 8)
    with pytest.raises(ValueError, match="fewer than one sample"):
        PackedSequenceDataset(prefix, 10_000)


def test_blending_follows_weights(small_dataset):
    prefix, _, _ = small_dataset
    a = PackedSequenceDataset(prefix, 8, seed=1)
    b = PackedSequenceDataset(prefix, 16, seed=2)
    blend = BlendedDataset([a, b], [3, 1], size=400)
    assert np.bincount(blend.dataset_index).tolist() == [300, 100]
    assert blend[1]["tokens"].shape[0] in (8, 16)
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == [(0.7, "a"), (0.3, "b")]
    assert parse_data_path(["only"]) == [(1.0, "only")]
    with pytest.raises(ValueError, match="weight"):
        parse_data_path(["x", "a", "0.3", "b"])


def _png(path, rng):
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"segments": [{"text": "a"}', "not valid JSON"),
        ('{"segments": []}', "empty document"),
        ('{"segments": [{"text": ""}]}', "empty document"),
        ('{"segments": [{"image": "missing.png"}]}', "does not exist"),
        ('{"segments": [{"image": "corrupt.png"}]}', "cannot read image"),
        ('{"segments": [{"video": "x"}]}', "expected {\"text\": str}"),
        ('"just a string"', "expected {\"segments\""),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    source = tmp_path / "docs.jsonl"
    with pytest.raises(BadDocument) as error:
        parse_line(line, 7, source)
    assert f"{source}:7" in str(error.value) and message in str(error.value)


def test_skip_bad_counts_and_keeps_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    _png(tmp_path / "ok.png", rng)
    lines = ['{"segments": [{"text": "hello"}, {"image": "ok.png"}]}', "{broken",
             '{"segments": [{"image": "gone.png"}]}', "", '[{"text": "bare list"}]']
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    skipped = []
    docs = list(read_documents(tmp_path / "docs.jsonl", True, skipped))
    assert [d.line for d in docs] == [1, 5]
    assert len(skipped) == 2 and ":2:" in skipped[0] and ":3:" in skipped[1]
    assert docs[0].segments[1][1].shape == (8, 8, 3)
    with pytest.raises(BadDocument, match=":2: not valid JSON"):
        list(read_documents(tmp_path / "docs.jsonl", False, []))


def test_builtin_corpus_is_built_once_and_interleaved(tmp_path):
    from moma_plugin.data.corpus import build_builtin_corpus

    path = build_builtin_corpus(tmp_path / "corpus")
    documents = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(documents) > 500
    images = sum(1 for d in documents for s in d["segments"] if "image" in s)
    assert images == 1797 + 64  # every digit and every photo crop
    first_kinds = {next(iter(d["segments"][0])) for d in documents}
    assert first_kinds == {"text", "image"}  # captions before and after images
    assert any(sum("image" in s for s in d["segments"]) > 1 for d in documents)
    mtime = path.stat().st_mtime
    assert build_builtin_corpus(tmp_path / "corpus") == path and path.stat().st_mtime == mtime


def _corpus_jsonl(tmp_path, rng, count=12):
    from sklearn.datasets import load_digits

    images = (load_digits().images[:count] * (255 / 16)).round().astype(np.uint8)
    lines = []
    for i, image in enumerate(images):
        from PIL import Image

        Image.fromarray(image).save(tmp_path / f"d{i}.png")
        segments = [{"text": f"Document {i}: a digit."}, {"image": f"d{i}.png"}]
        if i % 3 == 0:
            segments = segments[::-1] + [{"text": "The end.\nBye."}]
        lines.append(json.dumps({"segments": segments}))
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "docs.jsonl", images


def _args(**overrides):
    from moma_plugin.data.preprocess import build_parser

    args = build_parser().parse_args(["--input", "x", "--output-prefix", "y", "--quiet"])
    for key, value in overrides.items():
        setattr(args, key.replace("-", "_"), value)
    return args


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_then_detokenize_reproduces_documents(tmp_path, workers):
    from moma_plugin.data.image_tokenizer import load_image_tokenizer
    from moma_plugin.data.preprocess import DocumentEncoder, preprocess
    from moma_plugin.data.text_tokenizer import load_text_tokenizer
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    source, images = _corpus_jsonl(tmp_path, np.random.default_rng(0))
    prefix = tmp_path / "out" / "ds"
    summary = preprocess(_args(input=str(source), output_prefix=str(prefix), workers=workers,
                               codebook_size=16, text_vocab_size=300))
    assert summary["documents"] == 12 and summary["skipped"] == 0
    assert summary["tokens"]["image"] == 12 * 16  # a 4x4 grid of codes per image
    layout = VocabularyLayout.load(f"{prefix}.vocab.json")
    encoder = DocumentEncoder(load_text_tokenizer(f"{prefix}.tokenizers/text"),
                              load_image_tokenizer(f"{prefix}.tokenizers/image"), layout)
    indexed = IndexedDataset(str(prefix))
    documents = [json.loads(line)["segments"] for line in source.read_text().splitlines()]
    for i, segments in enumerate(documents):
        merged = []  # adjacent text segments come back as one text run: their concatenation
        for segment in segments:
            if "text" in segment and merged and "text" in merged[-1]:
                merged[-1] = {"text": merged[-1]["text"] + segment["text"]}
            else:
                merged.append(segment)
        segments = merged
        decoded = encoder.decode(indexed[i])
        assert [kind for kind, _ in decoded] == [next(iter(s)) for s in segments]
        for (kind, value), segment in zip(decoded, segments):
            if kind == "text":
                assert value == segment["text"]  # text is exact
            else:
                assert value.shape == (16, 16, 3)
                original = encoder.image.resize(images[i]).astype(float)
                assert np.abs(value.astype(float) - original).mean() < 40  # lossy but close
        ids = np.asarray(indexed[i])
        assert (layout.modality_ids(ids) == 1).sum() == 16


def test_cli_skip_bad_reports_and_builds_the_rest(tmp_path, capsys):
    from moma_plugin.data.preprocess import main

    source, _ = _corpus_jsonl(tmp_path, np.random.default_rng(0), count=6)
    with open(source, "a") as f:
        f.write("{not json\n" + '{"segments": [{"image": "absent.png"}]}\n')
    prefix = tmp_path / "ds"
    with pytest.raises(SystemExit, match=r"(?s)docs.jsonl:7: not valid JSON.*--skip-bad"):
        main(["--input", str(source), "--output-prefix", str(prefix), "--quiet"])
    main(["--input", str(source), "--output-prefix", str(prefix), "--quiet", "--skip-bad",
          "--codebook-size", "16"])
    captured = capsys.readouterr()
    assert '"skipped": 2' in captured.out and '"documents": 6' in captured.out
    assert "docs.jsonl:8: segment 1: image file" in captured.err


def test_bundled_corpus_through_the_whole_pipeline(tmp_path, monkeypatch):
    from moma_plugin.data.preprocess import main
    from moma_plugin.data.sampler import BalancedSampler, target_shares_from_experts

    monkeypatch.setenv("MOMA_CACHE", str(tmp_path / "cache"))
    prefix = tmp_path / "builtin"
    main(["--builtin", "--output-prefix", str(prefix), "--quiet"])
    summary = json.loads(open(f"{prefix}.summary.json").read())
    assert summary["documents"] == len(open(tmp_path / "cache" / "builtin_corpus_v3" /
                                            "documents.jsonl").read().splitlines())
    train = PackedSequenceDataset(prefix, 64, "train")
    valid = PackedSequenceDataset(prefix, 64, "valid")
    assert len(train) > 10 * len(valid) > 0
    item = train[0]
    layout = VocabularyLayout.load(f"{prefix}.vocab.json")
    assert item["modality_ids"].tolist() == layout.modality_ids(item["tokens"].numpy()).tolist()
    counts = train.modality_counts()
    sampler = BalancedSampler(counts, 2, 4, target_shares_from_experts("4t4i"), 0.1, seed=0,
                              strict=False)
    for _ in range(10):
        sampler.next_step()
    assert sampler.stats()["steps"] == 10


def test_build_datasets_from_data_path(small_dataset):
    from moma_plugin.data.dataset import build_datasets

    prefix, _, _ = small_dataset
    train, valid = build_datasets([str(prefix)], 8, valid_fraction=0.2)
    assert isinstance(train, PackedSequenceDataset) and train.split == "train"
    blended_train, blended_valid = build_datasets(["2", str(prefix), "1", str(prefix)], 8,
                                                  valid_fraction=0.2, train_samples=90)
    assert len(blended_train) == 90
    assert np.bincount(blended_train.dataset_index).tolist() == [60, 30]
    assert len(blended_valid) == 2 * len(valid)
