"""``moma-preprocess``: interleaved JSONL documents -> Megatron indexed dataset + vocabulary JSON.

Each input line is a document: ``{"segments": [{"text": "..."}, {"image": "path.png"}, ...]}`` (a bare
list of segments works too). Image paths are absolute or relative to the JSONL file.

    moma-preprocess --input docs.jsonl --output-prefix data/docs
    moma-preprocess --builtin --output-prefix data/builtin      # the bundled corpus

Without ``--text-tokenizer`` / ``--image-tokenizer`` directories, a byte-level BPE and a patch k-means
codebook are trained on the input and saved in ``<prefix>.tokenizers/``. A bad line (invalid JSON, a
missing or unreadable image, an empty document) stops the run with ``file:line: what is wrong``; with
``--skip-bad`` it is skipped, counted and its reason listed at the end.
"""

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from .vocab import TEXT, VocabularyLayout


class BadDocument(ValueError):
    """A document that cannot be used; the message names file and line."""


@dataclass
class Document:
    line: int
    segments: List[Tuple[str, object]]  # ("text", str) or ("image", np.ndarray uint8)


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def parse_line(text: str, line: int, source: Path) -> Document:
    """One JSONL line -> Document, loading its images; raises BadDocument naming file:line."""
    where = f"{source}:{line}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadDocument(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
    segments = record.get("segments") if isinstance(record, dict) else record
    if not isinstance(segments, list):
        raise BadDocument(f'{where}: expected {{"segments": [...]}} or a list of segments')
    parsed = []
    for number, segment in enumerate(segments, start=1):
        if isinstance(segment, dict) and isinstance(segment.get("text"), str):
            if segment["text"]:
                parsed.append((TEXT, segment["text"]))
        elif isinstance(segment, dict) and isinstance(segment.get("image"), str):
            path = Path(segment["image"])
            path = path if path.is_absolute() else source.parent / path
            try:
                parsed.append(("image", load_image(path)))
            except FileNotFoundError:
                raise BadDocument(f"{where}: segment {number}: image file {path} does not exist")
            except Exception as error:  # PIL raises several types for corrupt files
                raise BadDocument(f"{where}: segment {number}: cannot read image {path} ({error})")
        else:
            raise BadDocument(
                f'{where}: segment {number} is {json.dumps(segment)[:80]}; expected {{"text": str}} '
                'or {"image": path}'
            )
    if not parsed:
        raise BadDocument(f"{where}: empty document (no text and no images)")
    return Document(line, parsed)


def read_documents(source: Path, skip_bad: bool, skipped: List[str]) -> Iterator[Document]:
    with open(source, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield parse_line(text, line, source)
            except BadDocument as error:
                if not skip_bad:
                    raise
                skipped.append(str(error))


class DocumentEncoder:
    """Turns a Document into token ids of the unified vocabulary."""

    def __init__(self, text_tokenizer, image_tokenizer, layout: VocabularyLayout):
        self.text, self.image, self.layout = text_tokenizer, image_tokenizer, layout
        self.image_start = layout.range_of("image")[0]

    def __call__(self, document: Document) -> np.ndarray:
        ids: List[int] = []
        for kind, value in document.segments:
            if kind == TEXT:
                ids.extend(self.text.encode(value))
            else:
                codes = np.asarray(self.image.encode(value)).reshape(-1)
                ids.append(self.layout.begin_id("image"))
                ids.extend((codes + self.image_start).tolist())
                ids.append(self.layout.end_id("image"))
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> List[Tuple[str, object]]:
        """Token ids -> segments: ("text", str) and ("image", uint8 array); end-of-doc ends text."""
        segments: List[Tuple[str, object]] = []
        text_run: List[int] = []
        ids = [int(i) for i in ids]
        position = 0
        begin, end = self.layout.begin_id("image"), self.layout.end_id("image")
        while position < len(ids):
            token = ids[position]
            if token == begin:
                if text_run:
                    segments.append((TEXT, self.text.decode(text_run)))
                    text_run = []
                close = ids.index(end, position + 1)
                codes = np.asarray(ids[position + 1 : close]) - self.image_start
                segments.append(("image", self.image.decode(codes)))
                position = close + 1
                continue
            if token != self.layout.eod_id:
                text_run.append(token)
            position += 1
        if text_run:
            segments.append((TEXT, self.text.decode(text_run)))
        return segments


_worker_encoder: Optional[DocumentEncoder] = None


def _init_worker(encoder: DocumentEncoder):
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(document: Document) -> np.ndarray:
    return _worker_encoder(document)


def _build_tokenizers(args, documents: List[Document], tokenizer_dir: Path):
    from .image_tokenizer import PatchKMeansTokenizer, load_image_tokenizer
    from .text_tokenizer import BPETokenizer, ByteTokenizer, load_text_tokenizer

    if args.text_tokenizer == "bytes":
        text = ByteTokenizer()
    elif args.text_tokenizer:
        text = load_text_tokenizer(args.text_tokenizer)
    else:
        texts = [value for d in documents for kind, value in d.segments if kind == TEXT]
        text = BPETokenizer.train(texts, vocab_size=args.text_vocab_size)
        text.save(tokenizer_dir / "text")
    if args.image_tokenizer:
        image = load_image_tokenizer(args.image_tokenizer)
    else:
        images = [value for d in documents for kind, value in d.segments if kind == "image"]
        if not images:
            raise SystemExit("no images in the input: pass --image-tokenizer DIR or add images")
        image = PatchKMeansTokenizer.fit(images, image_size=args.image_size,
                                         patch_size=args.patch_size,
                                         codebook_size=args.codebook_size, seed=args.seed)
        image.save(tokenizer_dir / "image")
    return text, image


def preprocess(args) -> dict:
    from .dataset import write_indexed_dataset

    start = time.time()
    source = Path(args.input)
    skipped: List[str] = []
    try:
        documents = list(read_documents(source, args.skip_bad, skipped))
    except BadDocument as error:
        raise SystemExit(f"moma-preprocess: {error}\n(use --skip-bad to skip such documents)")
    if not documents:
        raise SystemExit(f"moma-preprocess: no usable documents in {source}")
    prefix = Path(args.output_prefix)
    tokenizer_dir = Path(f"{prefix}.tokenizers")
    text_tokenizer, image_tokenizer = _build_tokenizers(args, documents, tokenizer_dir)
    layout = VocabularyLayout(text_tokenizer.vocab_size, {"image": image_tokenizer.codebook_size})
    encoder = DocumentEncoder(text_tokenizer, image_tokenizer, layout)
    encode_start = time.time()
    progress = _progress(len(documents), args.quiet)
    if args.workers > 1:
        context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        with context.Pool(args.workers, initializer=_init_worker, initargs=(encoder,)) as pool:
            encoded = list(progress(pool.imap(_encode_in_worker, documents, chunksize=16)))
    else:
        encoded = list(progress(map(encoder, documents)))
    encode_seconds = time.time() - encode_start
    count = write_indexed_dataset(prefix, encoded, layout)
    counts = np.load(f"{prefix}.counts.npy").sum(0)
    summary = {
        "documents": count,
        "skipped": len(skipped),
        "skipped_reasons": skipped,
        "tokens": {name: int(n) for name, n in zip(layout.modalities, counts)},
        "vocab_size": layout.vocab_size,
        "vocab_ranges": layout.vocab_ranges(),
        "seconds": round(time.time() - start, 2),
        "documents_per_second": round(count / max(encode_seconds, 1e-9), 1),
        "output_prefix": str(prefix),
    }
    Path(f"{prefix}.summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _progress(total: int, quiet: bool):
    if quiet:
        return lambda iterable: iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda iterable: iterable
    return lambda iterable: tqdm(iterable, total=total, desc="tokenizing", unit="doc")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moma-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="JSONL file of documents")
    source.add_argument("--builtin", action="store_true", help="the bundled corpus (built on first use)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.vocab.json/...")
    parser.add_argument("--text-tokenizer", help="saved text tokenizer directory, or 'bytes'")
    parser.add_argument("--image-tokenizer", help="saved image tokenizer directory")
    parser.add_argument("--text-vocab-size", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=16, help="images are resized to this square")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad documents")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.builtin:
        from .corpus import build_builtin_corpus

        args.input = str(build_builtin_corpus())
    summary = preprocess(args)
    for reason in summary["skipped_reasons"]:
        print(f"skipped: {reason}", file=sys.stderr)
    shown = {k: v for k, v in summary.items() if k != "skipped_reasons"}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
