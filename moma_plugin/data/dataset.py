"""Interleaved token datasets: Megatron indexed datasets (.bin/.idx) plus the vocabulary JSON, packed
into fixed-length training sequences like Megatron's GPT dataset.

Files of a dataset with prefix P:
  P.bin, P.idx         one sequence per document (megatron.core's IndexedDataset format)
  P.vocab.json         the VocabularyLayout: which ids are text, image codes, sentinels; and the size
                       and SHA-256 of each file the vocabulary belongs with (``files``)
  P.counts.npy         [documents, modalities] tokens of each modality in each document
  P.tokenizers/        the text and image tokenizers that wrote it (``moma-preprocess``)
A token's modality follows from its id and the vocabulary, so no modality stream is stored.

Opening a dataset checks that its files belong together: each file listed in the vocabulary JSON
must have its recorded size and checksum (files over ``FULL_CHECK_BYTES`` are checked by size and a
sampled checksum, ``storage.sampled_sha256``), and the .idx must describe exactly the tokens the .bin
holds. A set that does not match is refused with the file named.
"""

import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from .. import storage
from .vocab import VocabularyLayout

FULL_CHECK_BYTES = 256 << 20
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_FIXED_BYTES = 34  # header 9, version 8, dtype code 1, sequence count 8, document count 8
CHECKSUMMED = (".bin", ".idx", ".counts.npy")
TOKENIZERS = ".tokenizers/"  # the names of the tokenizer files in a ``files`` record start so


def write_indexed_dataset(prefix: Union[str, Path], documents: Iterable[Sequence[int]],
                          layout: VocabularyLayout) -> int:
    """Writes documents (token id sequences) with megatron-core's builder; returns how many."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if layout.vocab_size <= np.iinfo(np.uint16).max else np.int32
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    counts = []
    for tokens in documents:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size == 0:
            raise ValueError("cannot write an empty document")
        builder.add_item(torch.from_numpy(tokens.astype(dtype)))
        builder.end_document()
        counts.append(np.bincount(layout.modality_ids(tokens), minlength=len(layout.modalities)))
    builder.finalize(f"{prefix}.idx")
    np.save(f"{prefix}.counts.npy", np.array(counts, dtype=np.int64).reshape(-1, len(layout.modalities)))
    layout.save(f"{prefix}.vocab.json", files=file_records(prefix))  # last: it makes the others a dataset
    return len(counts)


def dataset_exists(prefix: Union[str, Path]) -> bool:
    return all(Path(f"{prefix}{suffix}").exists() for suffix in (".bin", ".idx", ".vocab.json"))


def file_records(prefix: Union[str, Path]) -> Dict[str, Dict[str, object]]:
    """{suffix or tokenizer file: {bytes, sha256[, sampled_sha256]}} of a dataset's files, for its
    vocabulary JSON."""
    prefix = Path(prefix)
    names = list(CHECKSUMMED)
    tokenizers = Path(f"{prefix}.tokenizers")
    if tokenizers.is_dir():
        names += [TOKENIZERS + p.relative_to(tokenizers).as_posix()
                  for p in sorted(tokenizers.rglob("*")) if p.is_file()]
    paths = {name: _record_path(prefix, name) for name in names}
    records = {}
    for name, path in paths.items():
        if path.exists():
            record = {"bytes": path.stat().st_size, "sha256": storage.sha256_file(path)}
            if record["bytes"] > FULL_CHECK_BYTES:
                record["sampled_sha256"] = storage.sampled_sha256(path)
            records[name] = record
    return records


def dataset_fingerprint(prefix: Union[str, Path]) -> str:
    """A digest of a dataset's tokens and vocabulary (not of its path): what a checkpoint's data
    position refers to. From the checksums its vocabulary JSON records; for datasets without them, read
    from the .idx and a sample of the .bin."""
    import hashlib

    records = VocabularyLayout.load_files(f"{prefix}.vocab.json")
    parts = [json_key(VocabularyLayout.load(f"{prefix}.vocab.json"))]
    for suffix in (".bin", ".idx"):
        record = records.get(suffix)
        parts.append(record["sha256"] if record else
                     storage.sampled_sha256(f"{prefix}{suffix}") if suffix == ".bin" else
                     storage.sha256_file(f"{prefix}{suffix}"))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _record_path(prefix, name: str) -> Path:
    """The file a ``files`` record name means: a suffix of the prefix, or a tokenizer file."""
    if name.startswith(TOKENIZERS):
        return Path(f"{prefix}.tokenizers") / name[len(TOKENIZERS):]
    return Path(f"{prefix}{name}")


def _tokenizer_records(prefix) -> Dict[str, str]:
    return {name: record["sha256"] for name, record in
            VocabularyLayout.load_files(f"{prefix}.vocab.json").items() if name.startswith(TOKENIZERS)}


def check_dataset_files(prefix: Union[str, Path]) -> None:
    """Raises ValueError naming the file when the dataset's files do not belong together (see the
    module docstring)."""
    prefix = Path(prefix)
    vocab_path = Path(f"{prefix}.vocab.json")
    for name, record in VocabularyLayout.load_files(vocab_path).items():
        path = _record_path(prefix, name)
        if not path.exists():
            raise ValueError(f"{path} is missing ({vocab_path} lists it); run moma-preprocess again")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ValueError(f"{path} has {size:,} bytes but {vocab_path} records {record['bytes']:,}: "
                             "the files are from different moma-preprocess runs or one is truncated; "
                             "run moma-preprocess again")
        if "sampled_sha256" in record:
            same = storage.sampled_sha256(path) == record["sampled_sha256"]
        else:
            same = storage.sha256_file(path) == record["sha256"]
        if not same:
            raise ValueError(f"{path} does not match its checksum in {vocab_path}: it belongs to another "
                             "dataset or was changed; run moma-preprocess again")
    _check_indexed_files(prefix)


def _check_indexed_files(prefix: Path) -> None:
    """The .idx describes exactly the tokens of the .bin (also for datasets written by other tools)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    idx_size, bin_size = idx.stat().st_size, bin_.stat().st_size
    if bin_size == 0:
        raise ValueError(f"{bin_} is empty; run moma-preprocess again")
    with open(idx, "rb") as f:
        header = f.read(_IDX_FIXED_BYTES)
        if len(header) < _IDX_FIXED_BYTES or header[:9] != _IDX_HEADER:
            raise ValueError(f"{idx} is not a Megatron indexed-dataset index (truncated or another "
                             "format); run moma-preprocess again")
        dtype_code = header[17]
        sequences = int(np.frombuffer(header[18:26], dtype="<u8")[0])
        documents = int(np.frombuffer(header[26:34], dtype="<u8")[0])
        expected = _IDX_FIXED_BYTES + 12 * sequences + 8 * documents
        if idx_size < expected:
            raise ValueError(f"{idx} is truncated: {idx_size:,} bytes, its header announces "
                             f"{sequences:,} sequences ({expected:,} bytes); run moma-preprocess again")
        lengths = np.frombuffer(f.read(4 * sequences), dtype=np.int32)
    try:
        itemsize = np.dtype(DType.dtype_from_code(dtype_code)).itemsize
    except (KeyError, ValueError):
        raise ValueError(f"{idx} names an unknown token dtype code {dtype_code}") from None
    tokens_bytes = int(lengths.astype(np.int64).sum()) * itemsize
    if tokens_bytes != bin_size:
        raise ValueError(f"{idx} describes {tokens_bytes:,} bytes of tokens but {bin_} holds "
                         f"{bin_size:,}: the .idx and .bin are not of the same dataset (or one is "
                         "truncated); run moma-preprocess again")


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> Dict[str, np.ndarray]:
    """Deterministic train/valid split of document indices (at least one valid document when
    valid_fraction > 0 and there are two or more documents)."""
    order = np.random.default_rng(seed).permutation(num_documents)
    num_valid = int(round(num_documents * valid_fraction))
    if valid_fraction > 0 and num_documents > 1:
        num_valid = max(num_valid, 1)
    return {"valid": np.sort(order[:num_valid]), "train": np.sort(order[num_valid:])}


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Fixed-length samples packed from a shuffled stream of documents, each followed by end-of-doc.

    Sample i holds stream tokens [i*s, i*s + s + 1): ``tokens`` are the first s, ``labels`` the last s.
    Items are dicts of tensors: tokens, labels, loss_mask, position_ids, modality_ids (all [s]).
    ``check_files=False`` skips ``check_dataset_files`` (for a caller that has just run it).
    """

    def __init__(self, prefix: Union[str, Path], seq_length: int, split: str = "train",
                 valid_fraction: float = 0.05, seed: int = 1234, check_files: bool = True):
        if not dataset_exists(prefix):
            raise FileNotFoundError(_missing_dataset_message(prefix))
        self.prefix, self.seq_length, self.split = str(prefix), seq_length, split
        self.layout = VocabularyLayout.load(f"{prefix}.vocab.json")
        if check_files:
            check_dataset_files(prefix)
        self.indexed = IndexedDataset(self.prefix)
        num_documents = len(self.indexed.document_indices) - 1
        documents = split_documents(num_documents, valid_fraction, seed)[split]
        self.documents = np.random.default_rng(seed + 1).permutation(documents)
        lengths = self.indexed.sequence_lengths[self.documents].astype(np.int64) + 1  # + end-of-doc
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.num_samples = max(0, int(self.offsets[-1] - 1) // seq_length)
        if self.num_samples == 0:
            raise ValueError(
                f"the {split} split of {prefix} holds {int(self.offsets[-1])} tokens, fewer than one "
                f"sample of seq_length {seq_length} + 1; use a shorter sequence or more data."
            )

    def __len__(self) -> int:
        return self.num_samples

    def stream(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the packed stream."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, position = [], start
        for index in range(first, len(self.documents)):
            if position >= end:
                break
            doc_start = int(self.offsets[index])
            within = position - doc_start
            length = int(self.offsets[index + 1]) - doc_start - 1  # without end-of-doc
            if within < length:
                take = min(length - within, end - position)
                pieces.append(self.indexed.get(int(self.documents[index]), offset=within, length=take))
                position += take
            if position < end and position == doc_start + length:
                pieces.append(np.array([self.layout.eod_id]))
                position += 1
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} of {self.num_samples}")
        start = index * self.seq_length
        window = self.stream(start, start + self.seq_length + 1)
        self._check_ids(window, start)
        window = torch.from_numpy(window)
        tokens, labels = window[:-1], window[1:]
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
            "modality_ids": torch.from_numpy(self.layout.modality_ids(tokens.numpy()).astype(np.int64)),
        }

    def _check_ids(self, tokens: np.ndarray, start: int):
        """Raises ValueError naming the dataset and document of a token id outside the vocabulary
        (``start``: the stream position of ``tokens[0]``)."""
        bad = np.nonzero((tokens < 0) | (tokens >= self.layout.vocab_size))[0]
        if not len(bad):
            return
        position = start + int(bad[0])
        document = int(self.documents[int(np.searchsorted(self.offsets, position, side="right")) - 1])
        raise ValueError(
            f"{self.prefix}: document {document} (0-based, in .bin order) holds token id "
            f"{int(tokens[bad[0]])}, outside the vocabulary [0, {self.layout.vocab_size}) of "
            f"{self.prefix}.vocab.json: the .bin was written with another vocabulary; run "
            "moma-preprocess again")

    def modality_counts(self) -> np.ndarray:
        """[samples, modalities] input tokens of each modality per sample (what a balanced sampler
        needs); computed once over the whole stream, which also checks every token id."""
        stream = self.stream(0, self.num_samples * self.seq_length)
        self._check_ids(stream, 0)
        ids = self.layout.modality_ids(stream).reshape(self.num_samples, self.seq_length)
        num_modalities = len(self.layout.modalities)
        return np.stack([(ids == m).sum(1) for m in range(num_modalities)], axis=1).astype(np.int64)


class BlendedDataset(torch.utils.data.Dataset):
    """Samples drawn from several datasets in proportion to weights (Megatron's
    ``--data-path w1 p1 w2 p2``): sample i comes from the dataset furthest behind its share."""

    def __init__(self, datasets: List[torch.utils.data.Dataset], weights: Sequence[float], size: int):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("give one weight per dataset")
        weights = np.asarray(weights, dtype=np.float64)
        if (weights <= 0).any():
            raise ValueError(f"dataset weights must be positive, got {weights.tolist()}")
        weights = weights / weights.sum()
        self.datasets = datasets
        self.dataset_index = np.zeros(size, dtype=np.int64)
        self.sample_index = np.zeros(size, dtype=np.int64)
        drawn = np.zeros(len(datasets), dtype=np.int64)
        for i in range(size):
            choice = int(np.argmax(weights * (i + 1) - drawn))
            self.dataset_index[i] = choice
            self.sample_index[i] = drawn[choice] % len(datasets[choice])
            drawn[choice] += 1

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int):
        return self.datasets[self.dataset_index[index]][int(self.sample_index[index])]

    @property
    def layout(self) -> VocabularyLayout:
        return self.datasets[0].layout  # build_datasets checks that the parts share it

    def modality_counts(self) -> np.ndarray:
        """[samples, modalities] input tokens of each modality per blended sample."""
        parts = [dataset.modality_counts() for dataset in self.datasets]
        counts = np.zeros((len(self), parts[0].shape[1]), dtype=np.int64)
        for index, part in enumerate(parts):
            chosen = self.dataset_index == index
            counts[chosen] = part[self.sample_index[chosen]]
        return counts


def _missing_dataset_message(prefix) -> str:
    present = [s for s in (".bin", ".idx", ".vocab.json") if Path(f"{prefix}{s}").exists()]
    if present:
        return (f"the dataset at prefix {prefix!r} is incomplete: {prefix}{present[0]} is there but "
                f"{', '.join(s for s in ('.bin', '.idx', '.vocab.json') if s not in present)} is "
                "missing (an interrupted moma-preprocess?); run moma-preprocess again")
    return (f"no dataset at prefix {prefix!r}: expected {prefix}.bin, .idx and .vocab.json "
            "(write one with `moma-preprocess`)")


def parse_data_path(items: Sequence[str]) -> List[tuple]:
    """``["p"]`` or ``["w1", "p1", "w2", "p2"]`` -> [(weight, prefix), ...], Megatron style."""
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ValueError(f"--data-path takes one prefix or weight/prefix pairs, got {list(items)}")
    pairs = []
    for weight, prefix in zip(items[::2], items[1::2]):
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"--data-path weight {weight!r} (before {prefix!r}) is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--data-path weight {weight!r} (before {prefix!r}) must be a positive "
                             "finite number")
        pairs.append((value, prefix))
    return pairs


def json_key(layout: VocabularyLayout) -> str:
    return json_key_of(layout.to_json())


def json_key_of(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def build_datasets(data_path: Sequence[str], seq_length: int, valid_fraction: float = 0.05,
                   seed: int = 1234, train_samples: Optional[int] = None):
    """(train, valid) datasets from Megatron-style ``--data-path`` items; several prefixes are
    blended by weight (train: ``train_samples`` samples, default the sum of the parts)."""
    pairs = parse_data_path(data_path)
    layouts = {prefix: VocabularyLayout.load(f"{prefix}.vocab.json") for _, prefix in pairs
               if Path(f"{prefix}.vocab.json").exists()}
    if len({json_key(layout) for layout in layouts.values()}) > 1:
        raise ValueError("--data-path blends datasets of different vocabularies ("
                         + ", ".join(f"{p}: {layout.vocab_size} ids" for p, layout in layouts.items())
                         + "); preprocess them with the same tokenizers (moma-preprocess "
                         "--text-tokenizer DIR --image-tokenizer DIR)")
    tokenizers = {prefix: _tokenizer_records(prefix) for prefix in layouts}
    if len({json_key_of(t) for t in tokenizers.values() if t}) > 1:
        raise ValueError("--data-path blends datasets written with different tokenizers (the same ids "
                         "mean other text or image patches in each: " + ", ".join(tokenizers)
                         + "); preprocess them with the same tokenizers (moma-preprocess "
                         "--text-tokenizer DIR --image-tokenizer DIR)")
    checked = set()  # each prefix's files are checksummed once, not once per split

    def part(prefix, split):
        dataset = PackedSequenceDataset(prefix, seq_length, split, valid_fraction, seed,
                                        check_files=prefix not in checked)
        checked.add(prefix)
        return dataset

    splits = {}
    for split in ("train", "valid"):
        parts = [part(prefix, split) for _, prefix in pairs]
        if len(parts) == 1:
            splits[split] = parts[0]
            continue
        size = sum(len(p) for p in parts) if split == "valid" or train_samples is None else train_samples
        splits[split] = BlendedDataset(parts, [w for w, _ in pairs], size)
    return splits["train"], splits["valid"]
