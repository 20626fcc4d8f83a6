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
from typing import Dict, List, Optional, Tuple, Union

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
        """Modality id of every token (sentinels and text: 0); ValueError for ids outside the
        vocabulary."""
        token_ids = np.asarray(token_ids)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.vocab_size):
            bad = token_ids[(token_ids < 0) | (token_ids >= self.vocab_size)]
            raise ValueError(f"token id {int(bad.flat[0])} is outside [0, {self.vocab_size}) of this "
                             "vocabulary.")
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

    def save(self, path: Union[str, Path], files: Optional[Dict[str, dict]] = None):
        """Writes the layout; ``files``: size and checksum of each file of the dataset it belongs
        with (``dataset.file_records``), checked when the dataset is opened."""
        data = self.to_json()
        if files is not None:
            data["files"] = files
        Path(path).write_text(json.dumps(data, indent=2))

    @staticmethod
    def _read(path: Union[str, Path]) -> dict:
        try:
            data = json.loads(Path(path).read_text())
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not a vocabulary file (not UTF-8: {e.reason}); run "
                             "moma-preprocess again") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); it is damaged "
                             "or cut short: run moma-preprocess again") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a {type(data).__name__}, not a vocabulary object")
        return data

    @classmethod
    def load(cls, path: Union[str, Path]) -> "VocabularyLayout":
        data = cls._read(path)
        missing = [key for key in ("text_size", "modality_sizes") if key not in data]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}: not a complete moma_plugin vocabulary "
                             "file; run moma-preprocess again")
        try:
            sizes = {str(k): int(v) for k, v in dict(data["modality_sizes"]).items()}
            layout = cls(text_size=int(data["text_size"]), modality_sizes=sizes)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid vocabulary ({e}); run moma-preprocess again") from None
        if "vocab_size" in data and data["vocab_size"] != layout.vocab_size:
            raise ValueError(f"{path} says vocab_size {data['vocab_size']} but its sizes add up to "
                             f"{layout.vocab_size}; run moma-preprocess again")
        return layout

    @classmethod
    def load_files(cls, path: Union[str, Path]) -> Dict[str, dict]:
        """The ``files`` a vocabulary JSON records ({} for files written without them)."""
        files = cls._read(path).get("files", {})
        if not isinstance(files, dict) or not all(
                isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
                for r in files.values()):
            raise ValueError(f"{path}: its 'files' record is damaged (each file needs its bytes and "
                             "sha256); run moma-preprocess again")
        return files
