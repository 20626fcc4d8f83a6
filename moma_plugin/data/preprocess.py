"""``moma-preprocess``: interleaved JSONL documents -> Megatron indexed dataset + vocabulary JSON.

Each input line is a document: ``{"segments": [{"text": "..."}, {"image": "path.png"}, ...]}`` (a bare
list of segments works too). Image paths are absolute or relative to the JSONL file.

    moma-preprocess --input docs.jsonl --output-prefix data/docs
    moma-preprocess --builtin --output-prefix data/builtin      # the bundled corpus

Without ``--text-tokenizer`` / ``--image-tokenizer`` directories, a byte-level BPE and a patch k-means
codebook are trained on the input and saved in ``<prefix>.tokenizers/``. A bad line (invalid JSON,
not UTF-8, a missing or unreadable image, an empty document) stops the run with ``file:line: what is
wrong``; with ``--skip-bad`` it is skipped, counted and its reason listed at the end. Images are read as
8-bit RGB: 16-bit greyscale is scaled down, transparency and frames after the first are dropped, and the
run says how many images each of these concerned.

The outputs are written under a temporary prefix and published together, the vocabulary JSON (with the
size and SHA-256 of every file it belongs with) last: a killed run leaves the previous dataset or no
dataset at the prefix, never old and new files mixed, and a mismatched set is refused when opened.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from .. import storage
from ..cli import HelpFormatter, UsageError
from .vocab import TEXT, VocabularyLayout


class BadDocument(ValueError):
    """A document that cannot be used; the message names file and line."""


@dataclass
class Document:
    line: int
    segments: List[Tuple[str, object]]  # ("text", str) or ("image", np.ndarray uint8)


# What loading an image had to change, counted and reported once per run (``ImageNotes``).
ALPHA_DROPPED = "had transparency (an alpha channel or a transparent palette colour): dropped, colours kept"
FRAMES_DROPPED = "were animated or multi-page: only the first frame was used"
DEEP_CONVERTED = "had more than 8 bits per channel: scaled to 8 bits"


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """8-bit values of a 16-bit or 32-bit greyscale image (PIL modes I;16*, I, F)."""
    if mode == "F":
        peak = 1.0 if array.max(initial=0) <= 1.0 else 65535.0 if array.max() > 255 else 255.0
        return (np.clip(array / peak, 0, 1) * 255).round().astype(np.uint8)
    array = array.astype(np.int64)
    if mode.startswith("I;16") or array.max(initial=0) > 255:
        return (np.clip(array, 0, 65535) * 255 / 65535).round().astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def load_image(path: Path, notes: Optional[Counter] = None) -> np.ndarray:
    """An image file as an [H, W, 3] uint8 array. 16-bit greyscale is scaled to 8 bits (PIL's own
    conversion would clip it to white); transparency and frames after the first are dropped. Each
    change is counted in ``notes``."""
    from PIL import Image

    notes = Counter() if notes is None else notes
    with Image.open(path) as image:
        if getattr(image, "n_frames", 1) > 1:
            notes[FRAMES_DROPPED] += 1
            image.seek(0)
        mode = image.mode
        if mode in ("I", "F") or mode.startswith("I;16"):
            array = _to_uint8(np.asarray(image), mode)
            if mode != "I" or array.max(initial=0) > 255:
                notes[DEEP_CONVERTED] += 1
            return np.repeat(array[:, :, None], 3, axis=2)
        if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
            notes[ALPHA_DROPPED] += 1
        return np.asarray(image.convert("RGBA").convert("RGB") if mode == "P" else image.convert("RGB"))


def _check_text(text: str, where: str, number: int):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadDocument(f"{where}: segment {number}: text holds a lone surrogate "
                          f"{text[e.start]!r} at character {e.start} (an escape like \\ud800 without "
                          "its pair): not valid Unicode text") from None


def parse_line(text: str, line: int, source: Path, notes: Optional[Counter] = None) -> Document:
    """One JSONL line -> Document, loading its images; raises BadDocument naming file:line."""
    where = f"{source}:{line}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadDocument(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
    except RecursionError:
        raise BadDocument(f"{where}: JSON nested too deeply to read") from None
    except ValueError as error:  # e.g. an integer of thousands of digits
        raise BadDocument(f"{where}: not valid JSON ({error})") from None
    segments = record.get("segments") if isinstance(record, dict) else record
    if not isinstance(segments, list):
        raise BadDocument(f'{where}: expected {{"segments": [...]}} or a list of segments')
    parsed = []
    for number, segment in enumerate(segments, start=1):
        if isinstance(segment, dict) and "text" in segment and "image" in segment:
            raise BadDocument(f"{where}: segment {number} has both text and image; give each its own "
                              "segment")
        if isinstance(segment, dict) and isinstance(segment.get("text"), str):
            _check_text(segment["text"], where, number)
            if segment["text"]:
                parsed.append((TEXT, segment["text"]))
        elif isinstance(segment, dict) and isinstance(segment.get("image"), str):
            path = Path(segment["image"])
            path = path if path.is_absolute() else source.parent / path
            try:
                parsed.append(("image", load_image(path, notes)))
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


def read_documents(source: Path, skip_bad: bool, skipped: List[str],
                   notes: Optional[Counter] = None) -> Iterator[Document]:
    """The documents of a JSONL file. Lines are decoded one by one, so a line that is not UTF-8
    (latin-1, say) is a bad document like any other, named by file:line."""
    with open(source, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadDocument(f"{source}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                      f"column {e.start + 1}); write the file as UTF-8") from None
                if not text.strip():
                    continue
                yield parse_line(text, line, source, notes)
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
    """The text and image tokenizers (loaded, or trained on ``documents``), saved in ``tokenizer_dir``
    either way: every dataset carries the tokenizers that wrote it."""
    from .image_tokenizer import PatchKMeansTokenizer, load_image_tokenizer
    from .text_tokenizer import BPETokenizer, ByteTokenizer, load_text_tokenizer

    try:
        if args.text_tokenizer == "bytes":
            text = ByteTokenizer()
        elif args.text_tokenizer:
            text = load_text_tokenizer(args.text_tokenizer)
        else:
            texts = [value for d in documents for kind, value in d.segments if kind == TEXT]
            text = BPETokenizer.train(texts, vocab_size=args.text_vocab_size)
        image = load_image_tokenizer(args.image_tokenizer) if args.image_tokenizer else None
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{e}") from None
    if image is None:
        images = [value for d in documents for kind, value in d.segments if kind == "image"]
        if not images:
            raise UsageError("no images in the input to fit an image tokenizer on: pass "
                             "--image-tokenizer DIR (a saved one) or add images")
        try:
            image = PatchKMeansTokenizer.fit(images, image_size=args.image_size,
                                             patch_size=args.patch_size,
                                             codebook_size=args.codebook_size, seed=args.seed)
        except ValueError as e:
            raise UsageError(f"{e} (--codebook-size {args.codebook_size}; or pass a saved "
                             "--image-tokenizer DIR)") from None
    try:
        text.save(tokenizer_dir / "text")
        image.save(tokenizer_dir / "image")
    except Exception as e:  # the tokenizers library reports a full disk as a bare Exception
        if storage.is_disk_full(e) or "No space left" in str(e) or \
                shutil.disk_usage(tokenizer_dir.parent).free < 1 << 20:
            raise OSError(28, "No space left on device", str(tokenizer_dir)) from None
        raise
    return text, image


def preprocess(args) -> dict:
    """Tokenizes ``args.input`` into the dataset ``args.output_prefix``. Everything is written under a
    temporary prefix beside it and published together (``publish_dataset``), so a killed run leaves
    the previous dataset, or none, never a mixture of old and new files."""
    from .dataset import write_indexed_dataset

    start = time.time()
    source = Path(args.input)
    skipped: List[str] = []
    notes: Counter = Counter()
    try:
        documents = list(read_documents(source, args.skip_bad, skipped, notes))
    except BadDocument as error:
        raise UsageError(f"{error}\n(use --skip-bad to skip such documents)") from None
    except FileNotFoundError:
        raise UsageError(f"--input {source}: no such file") from None
    if not documents:
        raise UsageError(f"no usable documents in {source}")
    prefix = Path(args.output_prefix)
    staging = _staging_prefix(prefix)
    try:
        text_tokenizer, image_tokenizer = _build_tokenizers(args, documents, Path(f"{staging}.tokenizers"))
        layout = VocabularyLayout(text_tokenizer.vocab_size, {"image": image_tokenizer.codebook_size})
        encoder = DocumentEncoder(text_tokenizer, image_tokenizer, layout)
        encode_start = time.time()
        progress = _progress(len(documents), args.quiet)
        workers = min(args.workers, len(documents), os.cpu_count() or 1)
        if workers > 1:
            # Spawned, not forked: this process has threads by now (the tokenizers' training,
            # OpenMP, torch), and a fork can copy a lock one of them holds; a forked worker then
            # waits on it for ever. Spawning costs each worker an interpreter start.
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers, initializer=_init_worker, initargs=(encoder,)) as pool:
                encoded = list(progress(pool.imap(_encode_in_worker, documents, chunksize=16)))
        else:
            encoded = list(progress(map(encoder, documents)))
        encode_seconds = time.time() - encode_start
        count = write_indexed_dataset(staging, encoded, layout)
        counts = np.load(f"{staging}.counts.npy").sum(0)
        summary = {
            "documents": count,
            "skipped": len(skipped),
            "skipped_reasons": skipped,
            "image_notes": dict(notes),
            "tokens": {name: int(n) for name, n in zip(layout.modalities, counts)},
            "vocab_size": layout.vocab_size,
            "vocab_ranges": layout.vocab_ranges(),
            "seconds": round(time.time() - start, 2),
            "documents_per_second": round(count / max(encode_seconds, 1e-9), 1),
            "output_prefix": str(prefix),
        }
        Path(f"{staging}.summary.json").write_text(json.dumps(summary, indent=2))
        publish_dataset(staging, prefix)
    except BaseException as error:
        _remove_prefix(staging)
        if isinstance(error, OSError) and storage.is_disk_full(error):
            raise UsageError(f"{storage.disk_full_message(prefix.parent)} while writing {prefix}; the "
                             "previous dataset at that prefix (if any) is untouched") from None
        raise
    return summary


# Files of a dataset, in the order they are published; the vocabulary JSON comes last: it is what
# makes the others a dataset (``dataset_exists``), and it records their checksums.
_DATA_SUFFIXES = (".bin", ".idx", ".counts.npy", ".summary.json")


def _staging_prefix(prefix: Path) -> Path:
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-prefix {prefix}: cannot create {prefix.parent} ({e.strerror})") from None
    for old in prefix.parent.glob(f".{prefix.name}.partial-*"):  # left by killed runs
        pid = old.name.split(".partial-")[-1].split(".")[0]
        if pid.isdigit() and not storage.pid_alive(int(pid)):
            _remove_path(old)
    return prefix.parent / f".{prefix.name}.partial-{os.getpid()}"


def _remove_path(path: Path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_prefix(prefix: Path):
    for suffix in (*_DATA_SUFFIXES, ".vocab.json", ".tokenizers"):
        _remove_path(Path(f"{prefix}{suffix}"))


def publish_dataset(staging: Path, prefix: Path):
    """Moves a dataset written under ``staging`` to ``prefix``. Everything is flushed to disk first;
    then the old vocabulary JSON goes (until the new one is in, no dataset is at ``prefix``:
    ``dataset_exists`` is False), the data files and tokenizers move in, and the new vocabulary JSON
    comes last."""
    staged = [Path(f"{staging}{suffix}") for suffix in (*_DATA_SUFFIXES, ".vocab.json")]
    for path in staged:
        if path.exists():
            storage.fsync_path(path)
    tokenizers = Path(f"{staging}.tokenizers")
    if tokenizers.exists():
        storage.fsync_tree(tokenizers)
    try:
        old_vocab = Path(f"{prefix}.vocab.json")
        old_vocab.unlink(missing_ok=True)
        storage.fsync_path(prefix.parent)
        for suffix in _DATA_SUFFIXES:
            source = Path(f"{staging}{suffix}")
            if source.exists():
                os.replace(source, f"{prefix}{suffix}")
        if tokenizers.exists():
            storage.replace_dir(tokenizers, Path(f"{prefix}.tokenizers"))
        os.replace(f"{staging}.vocab.json", old_vocab)
        storage.fsync_path(prefix.parent)
    except OSError as e:
        what = storage.disk_full_message(prefix.parent) if storage.is_disk_full(e) else str(e)
        raise UsageError(f"{what} while replacing the dataset at {prefix}: it is incomplete now (no "
                         f"{prefix}.vocab.json, so nothing uses it); run moma-preprocess again") from None


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
                                     formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="JSONL file of documents")
    source.add_argument("--builtin", action="store_true",
                        help="the bundled corpus: writes PREFIX (interleaved text and images) and "
                             "PREFIX_text (text only, same vocabulary)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.vocab.json/...")
    parser.add_argument("--text-tokenizer",
                        help="saved text tokenizer directory, or 'bytes'; default: train a BPE")
    parser.add_argument("--image-tokenizer",
                        help="saved image tokenizer directory; default: fit a k-means codebook")
    parser.add_argument("--text-vocab-size", type=int, default=2048, help="BPE vocabulary to train")
    parser.add_argument("--image-size", type=int, default=16, help="images are resized to this square")
    parser.add_argument("--patch-size", type=int, default=4, help="pixels per side of an image code")
    parser.add_argument("--codebook-size", type=int, default=256, help="image codes to fit")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad documents")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the codebook fit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


MAX_IMAGE_SIZE = 1024  # pixels a side; an image becomes (image_size / patch_size)**2 tokens


def _check(args, parser):
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        parser.error(f"--image-size must lie in [1, {MAX_IMAGE_SIZE}], got {args.image_size}")
    if not (1 <= args.patch_size <= args.image_size and args.image_size % args.patch_size == 0):
        parser.error(f"--patch-size must divide --image-size {args.image_size}, got {args.patch_size}")
    if not 1 <= args.codebook_size <= 65536:
        parser.error(f"--codebook-size must lie in [1, 65536], got {args.codebook_size}")
    if not 1 <= args.text_vocab_size <= 1 << 20:
        parser.error(f"--text-vocab-size must lie in [1, {1 << 20}], got {args.text_vocab_size}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must lie in [0, 2**32), got {args.seed}")
    prefix = Path(args.output_prefix)
    if not prefix.name or args.output_prefix.endswith(("/", os.sep)):
        parser.error(f"--output-prefix {args.output_prefix!r} names no file prefix; give e.g. data/docs")


def run(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    if args.builtin:
        from .corpus import build_builtin_datasets

        summaries = build_builtin_datasets(args.output_prefix, quiet=args.quiet)
    else:
        summaries = [preprocess(args)]
    for summary in summaries:
        for reason in summary["skipped_reasons"]:
            print(f"skipped: {reason}", file=sys.stderr)
        for note, count in summary["image_notes"].items():
            print(f"note: {count} image(s) {note}", file=sys.stderr)
        print(json.dumps({k: v for k, v in summary.items() if k != "skipped_reasons"}, indent=2))
    return summaries[0]


def main(argv=None):
    from ..cli import run_tool

    run_tool("moma-preprocess", run, argv)


if __name__ == "__main__":
    main()
