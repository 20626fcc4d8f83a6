"""Interleaved token datasets: Megatron indexed datasets (.bin/.idx) plus the vocabulary JSON, packed
into fixed-length training sequences like Megatron's GPT dataset.

Files of a dataset with prefix P:
  P.bin, P.idx         one sequence per document (megatron.core's IndexedDataset format)
  P.vocab.json         the VocabularyLayout: which ids are text, image codes, sentinels
  P.counts.npy         [documents, modalities] tokens of each modality in each document
A token's modality follows from its id and the vocabulary, so no modality stream is stored.
"""

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from .vocab import VocabularyLayout


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
    layout.save(f"{prefix}.vocab.json")
    np.save(f"{prefix}.counts.npy", np.array(counts, dtype=np.int64).reshape(-1, len(layout.modalities)))
    return len(counts)


def dataset_exists(prefix: Union[str, Path]) -> bool:
    return all(Path(f"{prefix}{suffix}").exists() for suffix in (".bin", ".idx", ".vocab.json"))


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
    """

    def __init__(self, prefix: Union[str, Path], seq_length: int, split: str = "train",
                 valid_fraction: float = 0.05, seed: int = 1234):
        if not dataset_exists(prefix):
            raise FileNotFoundError(
                f"no dataset at prefix {prefix!r}: expected {prefix}.bin, .idx and .vocab.json "
                "(write one with `moma-preprocess`)."
            )
        self.prefix, self.seq_length, self.split = str(prefix), seq_length, split
        self.layout = VocabularyLayout.load(f"{prefix}.vocab.json")
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
        window = torch.from_numpy(self.stream(start, start + self.seq_length + 1))
        tokens, labels = window[:-1], window[1:]
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
            "modality_ids": torch.from_numpy(self.layout.modality_ids(tokens.numpy()).astype(np.int64)),
        }

    def modality_counts(self) -> np.ndarray:
        """[samples, modalities] input tokens of each modality per sample (what a balanced sampler
        needs); computed once over the whole stream."""
        stream = self.stream(0, self.num_samples * self.seq_length)
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


def parse_data_path(items: Sequence[str]) -> List[tuple]:
    """``["p"]`` or ``["w1", "p1", "w2", "p2"]`` -> [(weight, prefix), ...], Megatron style."""
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ValueError(f"--data-path takes one prefix or weight/prefix pairs, got {list(items)}")
    pairs = []
    for weight, prefix in zip(items[::2], items[1::2]):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ValueError(f"--data-path weight {weight!r} (before {prefix!r}) is not a number")
    return pairs


def build_datasets(data_path: Sequence[str], seq_length: int, valid_fraction: float = 0.05,
                   seed: int = 1234, train_samples: Optional[int] = None):
    """(train, valid) datasets from Megatron-style ``--data-path`` items; several prefixes are
    blended by weight (train: ``train_samples`` samples, default the sum of the parts)."""
    pairs = parse_data_path(data_path)
    splits = {}
    for split in ("train", "valid"):
        parts = [PackedSequenceDataset(prefix, seq_length, split, valid_fraction, seed)
                 for _, prefix in pairs]
        if len(parts) == 1:
            splits[split] = parts[0]
            continue
        size = sum(len(p) for p in parts) if split == "valid" or train_samples is None else train_samples
        splits[split] = BlendedDataset(parts, [w for w, _ in pairs], size)
    return splits["train"], splits["valid"]
