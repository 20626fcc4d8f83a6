"""Causal generation from a MoMa model: aux-router routing, a MoD-aware KV cache, text and image spans.

``generate(model, prompts, rules, ...)`` decodes a batch of prompts of different lengths. With the KV
cache (default) each step feeds only the new token: every layer appends the keys/values of the tokens
it processed to its own ``KVCache`` (a Mixture-of-Depths layer only those its aux router let through)
and attends to it. Without the cache each step reruns the model's ordinary forward on the whole
sequence, which is the reference the cache is tested against. Both need the ``causal`` routing mode, in
which a token's route depends on no later token.

Image spans: after a begin-of-image token only image codes are sampled until the image is complete
(``tokens_per_image``), then end-of-image is forced; ``moma-generate`` decodes the codes to a PNG.
"""

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .attention import KVCache
from .aux_router import set_routing_mode


@dataclass
class TokenRules:
    """Which ids may be sampled where. ``text_ids``: ids allowed outside images (text, end-of-document,
    begin-of-image); ``image_range``: [start, end) of the image codes."""

    vocab_size: int
    eod_id: int
    text_ids: Tensor
    begin_image_id: Optional[int] = None
    end_image_id: Optional[int] = None
    image_range: Optional[tuple] = None
    tokens_per_image: int = 0

    @classmethod
    def from_vocabulary(cls, layout, tokens_per_image: int) -> "TokenRules":
        """From a ``moma_plugin.data.vocab.VocabularyLayout`` with an "image" modality."""
        text_ids = list(range(layout.range_of("text")[1])) + [layout.eod_id]
        rules = cls(vocab_size=layout.vocab_size, eod_id=layout.eod_id, text_ids=None)
        if "image" in layout.modality_sizes:
            rules.begin_image_id = layout.begin_id("image")
            rules.end_image_id = layout.end_id("image")
            rules.image_range = layout.range_of("image")
            rules.tokens_per_image = tokens_per_image
            text_ids.append(rules.begin_image_id)
        rules.text_ids = torch.tensor(text_ids)
        return rules


@dataclass
class GenerationResult:
    tokens: List[List[int]]  # the new tokens of each prompt
    seconds: float
    steps: int
    new_tokens: int = 0
    tokens_per_s: float = 0.0
    stopped: List[str] = field(default_factory=list)  # "eod" or "length", per prompt


class _SampleState:
    """Per-prompt state: the sequence so far and how many image codes are still due."""

    def __init__(self, prompt: Sequence[int], rules: TokenRules):
        self.sequence = list(prompt)
        self.new: List[int] = []
        self.image_left = -1  # -1: in text; n >= 0: inside an image, n codes to go (0: end it)
        self.done = False
        self.stopped = "length"
        for token in self.sequence:  # a prompt may end inside an image span
            self._track_image(token, rules)

    def _track_image(self, token: int, rules: TokenRules):
        if rules.begin_image_id is None:
            return
        if token == rules.begin_image_id:
            self.image_left = rules.tokens_per_image
        elif token == rules.end_image_id:
            self.image_left = -1
        elif self.image_left > 0:
            self.image_left -= 1

    def allowed(self, rules: TokenRules, vocab: int, device) -> Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if self.image_left > 0:
            mask[rules.image_range[0]:rules.image_range[1]] = True
        elif self.image_left == 0:
            mask[rules.end_image_id] = True
        else:
            mask[rules.text_ids.to(device)] = True
        return mask

    def push(self, token: int, rules: TokenRules):
        self.sequence.append(token)
        self.new.append(token)
        self._track_image(token, rules)
        if token == rules.eod_id:
            self.done, self.stopped = True, "eod"


def _choose(logits_BV: Tensor, allowed_BV: Tensor, temperature: float, top_k: int,
            generator: Optional[torch.Generator]) -> Tensor:
    logits_BV = logits_BV.float().masked_fill(~allowed_BV, float("-inf"))
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _right_padded(sequences: List[List[int]], device):
    length = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), length, dtype=torch.long, device=device)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for i, sequence in enumerate(sequences):
        tokens[i, :len(sequence)] = torch.tensor(sequence, device=device)
        valid[i, :len(sequence)] = True
    return tokens, valid


@torch.no_grad()
def full_sequence_logits(model, sequences: List[List[int]]) -> Tensor:
    """Logits [b, V] of the next token after each sequence, from the model's ordinary forward over the
    right-padded batch (causal routing makes the padding after a sequence irrelevant to it)."""
    device = _device(model)
    tokens, valid = _right_padded(sequences, device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    logits_BSV = model(tokens, positions, None)
    last = valid.sum(1) - 1
    return logits_BSV[torch.arange(len(sequences), device=device), last]


@torch.no_grad()
def decode_logits(model, tokens_BN: Tensor, valid_BN: Tensor, positions_BN: Tensor,
                  caches: List[KVCache]) -> Tensor:
    """One KV-cache step: new tokens [b, n] (``valid_BN`` marks real ones) at ``positions_BN`` ->
    logits [b, n, V]. Each layer appends what it processed to its cache."""
    hidden = model.embedding(input_ids=tokens_BN, position_ids=positions_BN)
    rotary = None
    if model.position_embedding_type == "rope":
        rotary = model.rotary_pos_emb(caches[0].capacity)
    layout = model.modality_layout(tokens_BN, None)
    valid_T = valid_BN.t().reshape(-1)
    positions_T = positions_BN.t().reshape(-1)
    for layer, cache in zip(model.decoder.layers, caches):
        hidden = layer.decode(hidden, valid_T, positions_T, layout, cache, rotary)
    hidden = model.decoder.final_layernorm(hidden)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return logits.transpose(0, 1)


@torch.no_grad()
def generate(model, prompts: List[List[int]], rules: TokenRules, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, use_kv_cache: bool = True,
             seed: Optional[int] = 0, aux_threshold: Optional[float] = None) -> GenerationResult:
    """Continues every prompt by up to ``max_new_tokens`` (stopping at end-of-document).

    ``temperature`` 0 is greedy. Puts the model in eval mode and causal routing (which raises if its
    aux routers were never trained). Raises ValueError when prompts are empty or too long for the
    model's position embeddings.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start a prompt with text).")
    max_positions = model.max_sequence_length
    longest = max(len(p) for p in prompts) + max_new_tokens
    if model.position_embedding_type != "rope" and longest > max_positions:
        raise ValueError(
            f"prompt + max_new_tokens = {longest} tokens exceeds the model's {max_positions} learned "
            "positions; shorten the prompt or lower --max-new-tokens.")
    model.eval()
    set_routing_mode(model, "causal", aux_threshold)
    device = _device(model)
    vocab = model.vocab_size
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    states = [_SampleState(p, rules) for p in prompts]
    batch = len(prompts)
    caches = None
    start, steps = time.perf_counter(), 0
    if use_kv_cache:
        caches = [KVCache(batch, longest, device) for _ in model.decoder.layers]
        tokens, valid = _right_padded(prompts, device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        logits_BNV = decode_logits(model, tokens, valid, positions, caches)
        logits_BV = logits_BNV[torch.arange(batch, device=device), valid.sum(1) - 1]
    else:
        logits_BV = full_sequence_logits(model, [s.sequence for s in states])
    for _ in range(max_new_tokens):
        allowed = torch.stack([s.allowed(rules, vocab, device) for s in states])
        chosen = _choose(logits_BV[:, :vocab], allowed, temperature, top_k, generator).tolist()
        for state, token in zip(states, chosen):
            if not state.done:
                state.push(int(token), rules)
        steps += 1
        if all(s.done for s in states) or steps == max_new_tokens:
            break
        if use_kv_cache:
            tokens = torch.tensor([[s.sequence[-1]] for s in states], device=device)
            valid = torch.tensor([[not s.done] for s in states], device=device)
            positions = torch.tensor([[len(s.sequence) - 1] for s in states], device=device)
            logits_BV = decode_logits(model, tokens, valid, positions, caches)[:, 0]
        else:
            logits_BV = full_sequence_logits(model, [s.sequence for s in states])
    seconds = time.perf_counter() - start
    new_tokens = sum(len(s.new) for s in states)
    return GenerationResult([s.new for s in states], seconds, steps, new_tokens,
                            new_tokens / max(seconds, 1e-9), [s.stopped for s in states])
