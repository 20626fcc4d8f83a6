"""The bundled corpus: real images that ship inside scikit-learn, with captions from their labels,
arranged as interleaved documents, and text-only documents from Python's own documentation. Built on
first use into a cache folder; no network.

Two datasets with one vocabulary (see docs/DATA.md for sizes and licenses):
- ``bundled:interleaved``: the 1,797 handwritten digits of ``sklearn.datasets.load_digits`` (8x8, 17
  grey levels), in documents of 1-4 digits (caption before image, image before caption, or a caption
  per image), and 64 crops of the two photos of ``sklearn.datasets.load_sample_images`` (a temple in
  China, a flower), captioned with the photo's subject and where the crop lies. 48% image tokens.
- ``bundled:text``: the help topics of the Python documentation that ship with every Python
  (``pydoc_data.topics``), one document per topic, tokenized with the interleaved dataset's tokenizers.
  Blending the two (``--data-path 0.26 bundled:interleaved 0.74 bundled:text``) gives any text:image
  ratio down to 48% image tokens, so every paper layout (``7t1i``, ``6t2i``) can be served.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Union

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHOTO_SUBJECTS = {"china.jpg": "a temple in China", "flower.jpg": "a flower in close-up"}
CORPUS_VERSION = 3
# --data-path names of the bundled datasets -> the suffix of their prefix.
BUNDLED = {"bundled:interleaved": "", "bundled:text": "_text"}


def digit_fact(digit: int) -> str:
    """A true sentence about a digit, so captions carry more text than a label."""
    word = DIGIT_WORDS[digit]
    parity = "even" if digit % 2 == 0 else "odd"
    if digit == 0:
        return f"{word.capitalize()} is {parity}, and it is one less than one."
    if digit == 9:
        return f"{word.capitalize()} is {parity}, the largest digit, one more than eight."
    return (f"{word.capitalize()} is {parity}, one more than {DIGIT_WORDS[digit - 1]} and one less "
            f"than {DIGIT_WORDS[digit + 1]}.")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOMA_CACHE", Path.home() / ".cache" / "moma_plugin"))


def _save_png(array: np.ndarray, path: Path):
    from PIL import Image

    Image.fromarray(array).save(path)


def _digit_documents(rng: np.random.Generator, image_dir: Path) -> List[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for index, image in enumerate(digits.images):
        path = image_dir / f"digit_{index:04d}.png"
        _save_png((image * (255 / 16)).round().astype(np.uint8), path)
        paths.append(path.relative_to(image_dir.parent).as_posix())
    order = rng.permutation(len(paths))
    documents, position = [], 0
    while position < len(order):
        count = int(rng.integers(1, 5))
        chosen = order[position : position + count]
        position += count
        labels = [int(digits.target[i]) for i in chosen]
        words = [DIGIT_WORDS[label] for label in labels]
        facts = " ".join(digit_fact(label) for label in labels)
        style = int(rng.integers(0, 3))
        if len(chosen) == 1 and style == 0:
            segments = [{"text": f"Here is a handwritten {words[0]}. {facts}"},
                        {"image": paths[chosen[0]]}]
        elif len(chosen) == 1:
            segments = [{"image": paths[chosen[0]]},
                        {"text": f"That was the digit {words[0]}, written by hand. {facts}"}]
        elif style == 0:
            segments = [{"text": f"A row of handwritten digits: {', '.join(words)}."}]
            segments += [{"image": paths[i]} for i in chosen]
            segments.append({"text": f"Together they add up to {sum(labels)}."})
        else:
            segments = []
            for ordinal, (i, label) in enumerate(zip(chosen, labels)):
                lead = "First" if ordinal == 0 else "Then"
                segments += [{"text": f"{lead} a {DIGIT_WORDS[label]}:"}, {"image": paths[i]},
                             {"text": digit_fact(label)}]
        documents.append({"segments": segments})
    return documents


def _photo_documents(rng: np.random.Generator, image_dir: Path) -> List[dict]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    documents = []
    for photo, filename in zip(photos.images, photos.filenames):
        name = Path(filename).name
        height, width = photo.shape[:2]
        for crop in range(32):
            size = int(rng.integers(96, 192))
            top, left = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
            path = image_dir / f"{Path(name).stem}_{crop:02d}.png"
            _save_png(np.ascontiguousarray(photo[top : top + size, left : left + size]), path)
            vertical = "top" if top + size / 2 < height / 2 else "bottom"
            horizontal = "left" if left + size / 2 < width / 2 else "right"
            caption = (f"A crop from a photo of {PHOTO_SUBJECTS.get(name, name)}, taken from the "
                       f"{vertical} {horizontal} of the picture.")
            image = {"image": path.relative_to(image_dir.parent).as_posix()}
            segments = [{"text": caption}, image] if crop % 2 == 0 else [image, {"text": caption}]
            documents.append({"segments": segments})
    return documents


def build_builtin_corpus(directory: Union[str, Path, None] = None, seed: int = 1234) -> Path:
    """Writes ``documents.jsonl`` and ``images/`` under ``directory`` (default: the cache) once and
    returns the JSONL path; later calls reuse it."""
    directory = Path(directory or default_cache_dir() / f"builtin_corpus_v{CORPUS_VERSION}")
    jsonl = directory / "documents.jsonl"
    if jsonl.exists():
        return jsonl
    image_dir = directory / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    documents = _digit_documents(rng, image_dir) + _photo_documents(rng, image_dir)
    documents = [documents[i] for i in rng.permutation(len(documents))]
    _write_jsonl(jsonl, documents)
    return jsonl


def build_text_corpus(directory: Union[str, Path, None] = None) -> Path:
    """Writes ``text_documents.jsonl``: one text-only document per help topic of Python's own
    documentation (``pydoc_data.topics``, shipped with Python), in topic-name order."""
    directory = Path(directory or default_cache_dir() / f"builtin_corpus_v{CORPUS_VERSION}")
    jsonl = directory / "text_documents.jsonl"
    if jsonl.exists():
        return jsonl
    from pydoc_data.topics import topics

    directory.mkdir(parents=True, exist_ok=True)
    documents = [{"segments": [{"text": topics[name].strip()}]} for name in sorted(topics)
                 if topics[name].strip()]
    _write_jsonl(jsonl, documents)
    return jsonl


def _write_jsonl(path: Path, documents: List[dict]):
    partial = path.with_suffix(".partial")
    with open(partial, "w") as f:
        for document in documents:
            f.write(json.dumps(document) + "\n")
    partial.rename(path)  # a crash mid-write never leaves a truncated corpus behind


def build_builtin_datasets(prefix: Union[str, Path], quiet: bool = True) -> List[Dict]:
    """Preprocesses the bundled corpus into ``prefix`` (interleaved) and ``prefix_text`` (text only,
    with the interleaved dataset's tokenizers, so that the two share one vocabulary and blend).
    Returns both summaries."""
    from .preprocess import build_parser, preprocess

    common = ["--quiet"] if quiet else []
    interleaved = build_parser().parse_args(
        ["--input", str(build_builtin_corpus()), "--output-prefix", str(prefix), *common])
    text = build_parser().parse_args(
        ["--input", str(build_text_corpus()), "--output-prefix", f"{prefix}_text", *common,
         "--text-tokenizer", f"{prefix}.tokenizers/text", "--image-tokenizer",
         f"{prefix}.tokenizers/image"])
    return [preprocess(interleaved), preprocess(text)]


def bundled_dataset_prefix(name: str = "bundled:interleaved", quiet: bool = True) -> str:
    """Indexed-dataset prefix of a bundled dataset (``bundled:interleaved`` or ``bundled:text``),
    both preprocessed into the cache on first use (a few seconds). In a multi-process job, call it on
    one rank first and barrier before the others read."""
    from .dataset import dataset_exists

    if name not in BUNDLED:
        raise ValueError(f"{name!r} is not a bundled dataset; use one of {', '.join(BUNDLED)}")
    prefix = default_cache_dir() / f"builtin_dataset_v{CORPUS_VERSION}" / "builtin"
    if not all(dataset_exists(f"{prefix}{suffix}") for suffix in BUNDLED.values()):
        print(f"building the bundled datasets at {prefix} ...", flush=True)
        build_builtin_datasets(prefix, quiet=quiet)
    return f"{prefix}{BUNDLED[name]}"


def resolve_data_path(items) -> List[str]:
    """``--data-path`` items with the bundled names replaced by their prefixes (built if needed)."""
    return [bundled_dataset_prefix(item) if item in BUNDLED else item for item in items]
