"""Text tokenizers. Anything with ``vocab_size``, ``encode(str) -> list[int]`` and
``decode(ids) -> str`` can be used (a SentencePiece or tiktoken model you have on disk, say); the two
here need no download: UTF-8 bytes, and a byte-level BPE trained offline on your corpus."""

import json
from pathlib import Path
from typing import Iterable, List, Sequence, Union

META = "moma_text_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes: vocabulary 256, exact round trip for any string."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: Union[str, Path]):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META).write_text(json.dumps({"kind": self.kind}))


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` library: any string round-trips exactly."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is unknown
        )
        tokenizer.train_from_iterator(list(texts), trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: Union[str, Path]):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / "tokenizer.json"))
        (directory / META).write_text(json.dumps({"kind": self.kind}))


def load_text_tokenizer(directory: Union[str, Path]):
    """Restores a tokenizer saved by ``save`` (either kind)."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: not a saved moma_plugin text tokenizer.")
    kind = json.loads(meta_path.read_text())["kind"]
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind == BPETokenizer.kind:
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")))
    raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r}")
