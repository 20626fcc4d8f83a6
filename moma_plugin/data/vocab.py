"""The unified id space of an early-fusion vocabulary, saved as JSON beside a dataset.

Ids are laid out as: text tokens [0, text_size), the end-of-document token, the begin/end sentinels
of every non-text modality (all three belong to the text modality: they are predicted like text), then
each non-text modality's codes as one contiguous range. So any tool can tell a token's modality from
its id alone.

    layout = VocabularyLayout(text_size=1000, modality_sizes={"image": 256})
    layout.eod_id                 # 1000
    layout.begin_id("image")      # 1001 (<boi>), layout.end_id("image") == 1002 (<eoi>)
    layout.range_of("image")      # (1003, 1259)
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

TEXT = "text"


@dataclass
class VocabularyLayout:
    text_size: int
    modality_sizes: Dict[str, int] = field(default_factory=dict)  # non-text modality -> code count

    def __post_init__(self):
        if self.text_size < 1:
            raise ValueError(f"text_size={self.text_size} must be >= 1.")
        for name, size in self.modality_sizes.items():
            if name == TEXT or size < 1:
                raise ValueError(f"modality {name!r} with {size} codes: names other than "
                                 f"'{TEXT}', at least one code each.")

    @property
    def modalities(self) -> Tuple[str, ...]:
        """Modality names in modality-id order: text first."""
        return (TEXT, *self.modality_sizes)

    @property
    def num_sentinels(self) -> int:
        """End-of-document plus a begin/end pair per non-text modality."""
        return 1 + 2 * len(self.modality_sizes)

    @property
    def eod_id(self) -> int:
        return self.text_size

    def begin_id(self, modality: str) -> int:
        return self.text_size + 1 + 2 * list(self.modality_sizes).index(modality)

    def end_id(self, modality: str) -> int:
        return self.begin_id(modality) + 1

    def range_of(self, modality: str) -> Tuple[int, int]:
        """[start, end) of a modality's ids (text: the text tokens without sentinels)."""
        if modality == TEXT:
            return 0, self.text_size
        start = self.text_size + self.num_sentinels
        for name, size in self.modality_sizes.items():
            if name == modality:
                return start, start + size
            start += size
        raise KeyError(f"unknown modality {modality!r}; this vocabulary has {self.modalities}.")

    @property
    def vocab_size(self) -> int:
        return self.text_size + self.num_sentinels + sum(self.modality_sizes.values())

    def vocab_ranges(self) -> Dict[str, Tuple[int, int]]:
        """Non-text ranges, the form MoMaConfig.moma_vocab_ranges takes."""
        return {name: self.range_of(name) for name in self.modality_sizes}

    def modality_ids(self, token_ids: Union[np.ndarray, List[int]]) -> np.ndarray:
        """Modality id of every token (sentinels and text: 0)."""
        token_ids = np.asarray(token_ids)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.vocab_size):
            raise ValueError(f"token ids outside [0, {self.vocab_size}) for this vocabulary.")
        ids = np.zeros(token_ids.shape, dtype=np.int8)
        for index, name in enumerate(self.modalities[1:], start=1):
            start, end = self.range_of(name)
            ids[(token_ids >= start) & (token_ids < end)] = index
        return ids

    def to_json(self) -> dict:
        return {
            "text_size": self.text_size,
            "modality_sizes": self.modality_sizes,
            "modalities": list(self.modalities),
            "vocab_size": self.vocab_size,
            "ranges": {name: list(self.range_of(name)) for name in self.modalities},
            "eod_id": self.eod_id,
            "sentinels": {name: [self.begin_id(name), self.end_id(name)]
                          for name in self.modality_sizes},
        }

    def save(self, path: Union[str, Path]):
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "VocabularyLayout":
        data = json.loads(Path(path).read_text())
        return cls(text_size=data["text_size"], modality_sizes=dict(data["modality_sizes"]))
