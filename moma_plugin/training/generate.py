"""``moma-generate``: causal generation from a ``moma-pretrain`` checkpoint, text and images.

Routing is causal (auxiliary routers decide, so the checkpoint needs trained aux routers: run
``moma-train-aux-routers`` or pretrain with ``--aux-router-joint``); decoding uses a KV cache unless
``--no-kv-cache``. A prompt ending in ``<image>`` starts an image: image codes are sampled until the image
is complete, then end-of-image; every finished image is decoded with the dataset's image tokenizer and
saved as a PNG. Several ``--prompt``s are decoded as one batch.

    moma-generate --load runs/x/checkpoints-aux --prompt "Here is a handwritten seven." \\
        --prompt "First a three:<image>" --max-new-tokens 40
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..cli import HelpFormatter, UsageError, run_tool
from ..generation import TokenRules, generate
from .from_checkpoint import (
    args_from_checkpoint,
    build_from_checkpoint,
    checkpoint_args,
    data_prefix,
    load_state,
)
from .initialize import seed_everything, setup_parallel

TOOL = "moma-generate"
IMAGE_MARKER = "<image>"
DEFAULT_PROMPTS = ["Here is a handwritten seven.", "First a three:" + IMAGE_MARKER]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=TOOL, formatter_class=HelpFormatter,
        description="Generate text and images from a MoMa checkpoint with causal routing.")
    parser.add_argument("--load", required=True, help="checkpoint directory with trained aux routers")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"a prompt (repeat for a batch); end it with {IMAGE_MARKER} to start an "
                             f"image (default: {DEFAULT_PROMPTS})")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampling")
    parser.add_argument("--aux-threshold", type=float, default=None,
                        help="causal routing threshold on aux scores (default: the checkpoint's)")
    parser.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                        help="recompute the whole sequence every step (the reference; slow)")
    parser.add_argument("--compare-kv-cache", action="store_true",
                        help="run with and without the KV cache; report both speeds and whether the "
                             "tokens agree")
    parser.add_argument("--output-dir", default="generations",
                        help="each run writes its PNGs and generations.json into a new subdirectory "
                             "<output-dir>/<date-time> of it")
    parser.add_argument("--png-size", type=int, default=256,
                        help="generated images are enlarged to this many pixels a side (nearest "
                             "neighbour: each code's pixels stay visible)")
    parser.add_argument("--data-path", nargs="*", default=None,
                        help="dataset whose tokenizers to use (default: the checkpoint's)")
    return parser


def load_tokenizers(prefix: str, layout):
    from ..data.image_tokenizer import load_image_tokenizer
    from ..data.text_tokenizer import ByteTokenizer, load_text_tokenizer

    directory = Path(f"{prefix}.tokenizers")
    text_dir = directory / "text"
    text = load_text_tokenizer(text_dir) if text_dir.exists() else ByteTokenizer()
    image_dir = directory / "image"
    if not image_dir.exists():
        raise UsageError(f"no image tokenizer at {image_dir}; pass --data-path to the dataset the "
                         "checkpoint was trained on")
    return text, load_image_tokenizer(image_dir)


def encode_prompt(prompt: str, text_tokenizer, layout) -> List[int]:
    text, marker, rest = prompt.partition(IMAGE_MARKER)
    if rest.strip() or prompt.count(IMAGE_MARKER) > 1:
        raise UsageError(f"prompt {prompt!r}: {IMAGE_MARKER} may only end a prompt (generation then "
                         "starts the image)")
    ids = list(text_tokenizer.encode(text)) if text else []
    if marker:
        ids.append(layout.begin_id("image"))
    if not ids:
        raise UsageError(f"prompt {prompt!r} encodes to no tokens")
    return ids


def save_png(pixels: np.ndarray, path: Path, size: int):
    """Writes an [h, w, 3] uint8 image enlarged by nearest neighbour to about ``size`` pixels a side."""
    from PIL import Image

    scale = max(1, size // max(pixels.shape[:2]))
    Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale),
                                   Image.NEAREST).save(path)


def render(sequence: List[int], text_tokenizer, image_tokenizer, layout, stem: Path,
           png_size: int = 256) -> Dict:
    """Text with ``[image N: path]`` placeholders; finished images saved as ``<stem>_N.png``."""
    begin, end, eod = layout.begin_id("image"), layout.end_id("image"), layout.eod_id
    start = layout.range_of("image")[0]
    pieces, images, text_run, position = [], [], [], 0
    while position < len(sequence):
        token = sequence[position]
        if token == begin:
            if text_run:
                pieces.append(text_tokenizer.decode(text_run))
                text_run = []
            try:
                close = sequence.index(end, position + 1)
            except ValueError:
                pieces.append(f"[unfinished image: {len(sequence) - position - 1} codes]")
                break
            codes = np.asarray(sequence[position + 1:close]) - start
            if len(codes) == image_tokenizer.tokens_per_image():
                path = stem.parent / f"{stem.name}_{len(images)}.png"
                save_png(image_tokenizer.decode(codes), path, png_size)
                images.append(str(path))
                pieces.append(f"[image {len(images) - 1}: {path}]")
            else:
                pieces.append(f"[malformed image: {len(codes)} codes]")
            position = close + 1
            continue
        if token == eod:
            if text_run:
                pieces.append(text_tokenizer.decode(text_run))
            pieces.append("<eod>")
            text_run = []
        else:
            text_run.append(token)
        position += 1
    if text_run:
        pieces.append(text_tokenizer.decode(text_run))
    return {"text": " ".join(p.strip() for p in pieces if p.strip()), "images": images}


def _check(options, parser):
    if options.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not (math.isfinite(options.temperature) and options.temperature >= 0):
        parser.error(f"--temperature must be a finite number >= 0 (0: greedy), got {options.temperature}")
    if options.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0: all tokens), got {options.top_k}")
    if options.aux_threshold is not None and not 0 < options.aux_threshold < 1:
        parser.error(f"--aux-threshold must lie in (0, 1), got {options.aux_threshold}")
    if not 0 <= options.seed < 2 ** 32:
        parser.error(f"--seed must lie in [0, 2**32), got {options.seed}")
    if not 1 <= options.png_size <= 4096:
        parser.error(f"--png-size must lie in [1, 4096], got {options.png_size}")


def new_output_dir(root: Path) -> Path:
    """A fresh ``<root>/<date-time>[-N]`` directory: nothing of an earlier run is overwritten."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = root / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            if root.exists() and not root.is_dir():
                break
            continue
        except OSError as e:
            raise UsageError(f"--output-dir {root}: cannot create {path} ({e.strerror})") from None
    raise UsageError(f"--output-dir {root}: cannot create a new output directory there (is it a file?)")


def run(argv: Optional[List[str]] = None) -> Dict:
    parser = build_parser()
    options = parser.parse_args(argv)
    _check(options, parser)
    _, saved_args = checkpoint_args(options.load)
    if saved_args.get("tensor_model_parallel_size", 1) != 1:
        raise UsageError(f"the checkpoint is split for tensor parallelism "
                         f"{saved_args['tensor_model_parallel_size']}; generation needs a TP-1 model")
    args = args_from_checkpoint(saved_args, data_path=options.data_path,
                                moma_aux_threshold=options.aux_threshold, tensor_model_parallel_size=1,
                                # one process holds every expert and the whole sequence
                                expert_model_parallel_size=1, sequence_parallel=False)
    parallel = setup_parallel(args)
    if parallel.world != 1:
        raise UsageError("generation runs in one process (TP 1); launch it without torchrun")
    output = new_output_dir(Path(options.output_dir))  # before the work: a bad --output-dir fails fast
    state = load_state(options.load, parallel).state
    seed_everything(options.seed)
    model, config, layout = build_from_checkpoint(state, args, parallel)
    text_tokenizer, image_tokenizer = load_tokenizers(data_prefix(args), layout)
    rules = TokenRules.from_vocabulary(layout, image_tokenizer.tokens_per_image())
    prompts = options.prompt or DEFAULT_PROMPTS
    prompt_ids = [encode_prompt(p, text_tokenizer, layout) for p in prompts]

    def once(use_cache: bool):
        try:
            return generate(model, prompt_ids, rules, options.max_new_tokens, options.temperature,
                            options.top_k, use_kv_cache=use_cache, seed=options.seed,
                            aux_threshold=options.aux_threshold)
        except (RuntimeError, ValueError) as e:
            raise UsageError(f"{e}") from None

    result = once(options.kv_cache)
    speeds = {("kv_cache" if options.kv_cache else "recompute"): result.tokens_per_s}
    agree = None
    if options.compare_kv_cache:
        other = once(not options.kv_cache)
        speeds["recompute" if options.kv_cache else "kv_cache"] = other.tokens_per_s
        agree = other.tokens == result.tokens
    outputs = []
    for index, (prompt, ids, new) in enumerate(zip(prompts, prompt_ids, result.tokens)):
        rendered = render(ids + new, text_tokenizer, image_tokenizer, layout, output / f"sample{index}",
                          options.png_size)
        outputs.append(dict(prompt=prompt, new_tokens=new, stopped=result.stopped[index],
                            output_dir=str(output), **rendered))
        print(f"--- prompt {index}: {prompt!r} ({len(new)} new tokens, stopped by {result.stopped[index]})"
              f"\n{rendered['text']}", flush=True)
    summary = {"checkpoint": options.load, "iteration": state["iteration"], "outputs": outputs,
               "tokens_per_s": speeds, "new_tokens": result.new_tokens, "seconds": result.seconds,
               "kv_cache_matches_recompute": agree, "temperature": options.temperature}
    (output / "generations.json").write_text(json.dumps(summary, indent=1))
    print(", ".join(f"{name} {value:,.1f} tokens/s" for name, value in speeds.items())
          + (f"; KV-cache tokens {'match' if agree else 'DIFFER from'} recompute" if agree is not None
             else "") + f"; written to {output / 'generations.json'}", flush=True)
    return summary


def _main(argv):
    summary = run(argv)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


def main(argv: Optional[List[str]] = None):
    run_tool(TOOL, _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
