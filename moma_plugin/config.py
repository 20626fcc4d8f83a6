"""MoMaConfig: Megatron's TransformerConfig plus the fields of modality-aware experts.

Expert groups are written as in the MoMa paper: ``4t4i`` is four text experts and four image experts,
``8x`` is eight experts shared by every modality, ``dense`` keeps Megatron's plain MLP. A letter names the
modality whose name starts with it, so ``4t4i2s`` works once ``moma_modalities`` holds "speech".
``mot`` unties attention projections, norms and FFN per modality (Mixture-of-Transformers; with 'ffn' a
group of one expert is its modality's plain FFN), ``moma_soft_moe_slots`` makes the groups Soft MoEs.
"""

import math
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from .expert_parallel import check_expert_parallel
from .experts import EXECUTIONS

MOT_PARTS = ("ffn", "attention", "norms")
SHARED_GROUP = "shared"  # name of the one group of an ``Nx`` layout, which serves every modality
_GROUP_PATTERN = re.compile(r"(\d+)([a-z])")


@dataclass(frozen=True)
class ExpertGroup:
    """Experts that route among the tokens of ``modalities`` (one modality, or all for ``Nx``)."""

    name: str
    num_experts: int
    modalities: Tuple[int, ...]  # modality ids whose tokens this group routes
    routed: bool = True
    """False for a Mixture-of-Transformers group of one expert: its modality's untied FFN, which takes
    every token of the modality with weight 1 (no router, no aux router)."""


def parse_expert_groups(spec: str, modalities: Tuple[str, ...]) -> List[ExpertGroup]:
    """Parses ``"4t4i"`` / ``"8x"`` into expert groups ordered by modality id; ``"dense"`` gives none.

    Raises ValueError with the accepted forms when the string does not parse.
    """
    spec = spec.strip().lower()
    if spec == "dense":
        return []
    shared = re.fullmatch(r"(\d+)x", spec)
    if shared:
        count = int(shared.group(1))
        if count < 1:
            raise ValueError(f"moma_experts={spec!r}: an Nx layout needs N >= 1, e.g. '8x'.")
        return [ExpertGroup(SHARED_GROUP, count, tuple(range(len(modalities))))]

    letters = {name[0]: index for index, name in enumerate(modalities)}
    if len(letters) != len(modalities):
        raise ValueError(
            f"moma_modalities={modalities} has two names with the same first letter; "
            "rename one so that each expert-group letter names exactly one modality."
        )
    pieces = _GROUP_PATTERN.findall(spec)
    if not pieces or "".join(count + letter for count, letter in pieces) != spec:
        raise ValueError(
            f"moma_experts={spec!r} does not parse. Use counts followed by modality letters "
            f"({', '.join(f'{n[0]}={n}' for n in modalities)}), e.g. '4t4i' or '7t1i'; "
            "'8x' for experts shared by all modalities; or 'dense'."
        )
    counts: Dict[int, int] = {}
    for count, letter in pieces:
        if letter not in letters:
            raise ValueError(
                f"moma_experts={spec!r} names modality letter {letter!r}, but moma_modalities is "
                f"{modalities}. Add that modality to moma_modalities or drop it from moma_experts."
            )
        modality = letters[letter]
        if modality in counts:
            raise ValueError(f"moma_experts={spec!r} names modality {modalities[modality]!r} twice.")
        if int(count) < 1:
            raise ValueError(f"moma_experts={spec!r}: every group needs at least one expert.")
        counts[modality] = int(count)
    missing = [modalities[m] for m in range(len(modalities)) if m not in counts]
    if missing:
        raise ValueError(
            f"moma_experts={spec!r} gives no experts to {missing}; every modality in moma_modalities "
            f"{modalities} needs a group (e.g. '1{missing[0][0]}')."
        )
    return [ExpertGroup(modalities[m], counts[m], (m,)) for m in sorted(counts)]


def parse_mot_parts(parts) -> Tuple[str, ...]:
    """``"ffn,attention"`` / ``"all"`` / ``("ffn",)`` / ``""`` -> the untied parts, in ``MOT_PARTS`` order."""
    if isinstance(parts, str):
        parts = [p for p in re.split(r"[,\s]+", parts.strip().lower()) if p]
    parts = set(parts)
    if parts & {"all"}:
        parts = (parts - {"all"}) | set(MOT_PARTS)
    unknown = sorted(parts - set(MOT_PARTS))
    if unknown:
        raise ValueError(f"mot={sorted(parts)}: {unknown} is not a part; untie any of {', '.join(MOT_PARTS)} "
                         "(comma-separated), or 'all'.")
    return tuple(p for p in MOT_PARTS if p in parts)


def model_label(moma_experts: str, mot) -> str:
    """How runs are named and tabled: '4t4i', 'dense', or with Mixture-of-Transformers parts untied
    'mot 4t1i'."""
    return f"mot {moma_experts}" if mot else moma_experts


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert of a group takes: ``k_e = ceil(b^M * factor / |E^M|)``, at most ``b^M``."""
    return min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts))


@dataclass
class MoMaConfig(TransformerConfig):
    """TransformerConfig with modality-aware expert-choice MoE fields (see README, "Configuration")."""

    moma_experts: str = "4t4i"
    """Expert groups: '4t4i', '7t1i', '4t4i2s', '8x' (shared by all modalities) or 'dense'."""

    moma_modalities: Tuple[str, ...] = ("text", "image")
    """Modality names; a token's modality id indexes this tuple."""

    moma_capacity_factor: float = 1.0
    """Expert j of group M takes ceil(b^M * factor / |E^M|) tokens of the micro-batch (paper: 1)."""

    moma_router_fp32: bool = True
    """Compute router logits and sigmoid scores in float32 even under bf16/fp16."""

    moma_router_gumbel_noise: bool = False
    """Gumbel-sigmoid noise sigmoid(logit + G' - G'') on router logits while training (upcycling)."""

    moma_force_balanced_routing: bool = False
    """Debug/benchmark switch: expert j takes its group's tokens j, j+E, j+2E, ... regardless of
    scores, so every expert gets the same load. The sigmoid scores still weight the outputs."""

    moma_vocab_ranges: Optional[Dict[str, Tuple[int, int]]] = None
    """Token-id ranges [start, end) per modality, e.g. {'image': (8192, 16384)}; tokens outside every
    range belong to the first modality. Lets MoMaGPTModel derive modality ids from token ids."""

    moma_post_norm: bool = False
    """Chameleon-style res-post-norm: h = x + Norm(f(x)) instead of Megatron's pre-norm."""

    moma_expert_execution: str = "auto"
    """'auto' (by device, dtype and shape: moma_plugin.experts.choose_execution), 'loop' (expert by
    expert under autograd; the reference), 'chunked' (expert by expert with a hand-written backward;
    CPU), 'grouped' (torch._grouped_mm; padded where it cannot run) or 'padded' (bmm over a padded
    [E, C_max, H] batch)."""

    mod_interval: int = 0
    """Mixture-of-Depths on every ``mod_interval``-th layer from ``mod_start_layer`` (0: no MoD;
    paper: 2)."""

    mod_capacity: float = 0.25
    """Share of a micro-batch's tokens a MoD layer processes: k_d = ceil(tokens * capacity)."""

    mod_start_layer: int = 0
    """0-based index of the first MoD layer (paper: 0)."""

    moma_aux_threshold: float = 0.5
    """Causal routing: a token goes to an expert / through a MoD layer iff its aux score > this."""

    mot: Tuple[str, ...] = ()
    """Mixture-of-Transformers (docs/MOT.md): the parts untied per modality, any of 'ffn', 'attention'
    (Q/K/V and output projections), 'norms'; 'all' for the three. With 'ffn' each modality's group of
    ``moma_experts`` is its FFN: one expert is a plain untied FFN, several an expert-choice MoE."""

    moma_soft_moe_slots: int = 0
    """Soft MoE (docs/MOT.md): slots per expert; > 0 makes every expert group a Soft MoE over its
    modality's tokens of each sequence. Needs ``moma_bidirectional`` (a slot mixes a whole sequence)."""

    moma_bidirectional: bool = False
    """The stack attends both ways (an encoder): attention without a causal mask. Soft MoE needs it."""

    def __post_init__(self):
        if self.ffn_hidden_size is None and self.hidden_size:
            self.ffn_hidden_size = 4 * self.hidden_size
        # Experts are SwiGLU FFNs of the dense FFN's size (paper section 2); the dense baseline uses
        # the same FFN so that FLOPs-matched comparisons compare like with like.
        self.gated_linear_unit = True
        self.activation_func = F.silu
        # Expert parallelism is the plugin's (moma_plugin.expert_parallel), not Megatron's MoE layer,
        # whose check (num_moe_experts must be set) it hides from.
        ep, self.expert_model_parallel_size = self.expert_model_parallel_size, 1
        super().__post_init__()
        self.expert_model_parallel_size = ep
        self.moma_modalities = tuple(self.moma_modalities)
        if not self.moma_modalities or len(set(self.moma_modalities)) != len(self.moma_modalities):
            raise ValueError(
                f"moma_modalities={self.moma_modalities} must be a non-empty tuple of distinct names."
            )
        self.moma_expert_groups = parse_expert_groups(self.moma_experts, self.moma_modalities)
        self._check_mot()
        if ep > 1:
            if self.is_dense:
                raise ValueError(f"expert_model_parallel_size={ep} with moma_experts='dense': a dense "
                                 "model has no experts to split; use expert_model_parallel_size=1.")
            try:
                check_expert_parallel(self.moma_expert_groups, ep)
            except ValueError as e:
                raise ValueError(f"expert_model_parallel_size={ep}: {e}.") from None
        if not (math.isfinite(self.moma_capacity_factor) and self.moma_capacity_factor > 0):
            raise ValueError(
                f"moma_capacity_factor={self.moma_capacity_factor} must be a finite number > 0 "
                "(paper: 1.0)."
            )
        if self.moma_expert_execution not in EXECUTIONS:
            raise ValueError(
                f"moma_expert_execution={self.moma_expert_execution!r}: use 'auto', 'loop', "
                "'chunked', 'grouped' or 'padded'."
            )
        tp = self.tensor_model_parallel_size
        if self.ffn_hidden_size % tp:
            raise ValueError(
                f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by "
                f"tensor_model_parallel_size={tp}; each expert's FFN is split across TP ranks. "
                "Choose an ffn_hidden_size that is a multiple of the TP size."
            )
        if self.num_attention_heads and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick sizes with hidden_size % heads == 0."
            )
        if self.mtp_num_layers:
            raise ValueError("multi-token prediction (mtp_num_layers) is not supported with MoMa yet.")
        self._check_vocab_ranges()
        self._check_mod()

    def _check_mot(self):
        self.mot = parse_mot_parts(self.mot)
        if "ffn" in self.mot:
            shared = [g for g in self.moma_expert_groups if len(g.modalities) > 1]
            if not self.moma_expert_groups or shared:
                raise ValueError(
                    f"mot={','.join(self.mot)} unties the FFN per modality, but moma_experts="
                    f"{self.moma_experts!r} has no group per modality. Give each modality its FFN group: "
                    f"'1{self.moma_modalities[0][0]}1{self.moma_modalities[-1][0]}'-style, one expert each "
                    "(plain untied FFNs), or more for an expert-choice MoE in that modality (e.g. '4t1i').")
            self.moma_expert_groups = [replace(g, routed=g.num_experts > 1) for g in self.moma_expert_groups]
        slots = self.moma_soft_moe_slots
        if slots < 0:
            raise ValueError(f"moma_soft_moe_slots={slots} must be >= 0 (0: expert choice, no Soft MoE).")
        if not slots:
            return
        if not self.moma_bidirectional:
            raise ValueError(
                f"moma_soft_moe_slots={slots}: Soft MoE mixes every token of a sequence into each slot, so "
                "a token's output would depend on later tokens; a causal decoder cannot use it. For an "
                "encoder (bidirectional) stack set moma_bidirectional=True; for a decoder use expert choice "
                "(moma_soft_moe_slots=0).")
        refusals = [(not self.moma_expert_groups, "moma_experts='dense' (Soft MoE needs expert groups)"),
                    ("ffn" in self.mot, "mot with 'ffn' (a Soft MoE group already is its modality's FFN)"),
                    (self.mod_interval > 0, "Mixture-of-Depths (mod_interval > 0: it drops whole tokens)"),
                    (self.expert_model_parallel_size > 1, "expert_model_parallel_size > 1")]
        for refused, what in refusals:
            if refused:
                raise ValueError(f"moma_soft_moe_slots={slots} does not combine with {what}.")

    def _check_mod(self):
        if self.mod_interval < 0 or self.mod_start_layer < 0:
            raise ValueError(
                f"mod_interval={self.mod_interval} and mod_start_layer={self.mod_start_layer} must be "
                ">= 0 (mod_interval 0 turns Mixture-of-Depths off; paper: interval 2, start 0)."
            )
        if self.mod_interval and not 0 < self.mod_capacity <= 1:
            raise ValueError(
                f"mod_capacity={self.mod_capacity} must be in (0, 1]: the share of tokens a MoD layer "
                "processes (paper: 0.25)."
            )
        if self.mod_interval and self.mod_start_layer >= self.num_layers:
            raise ValueError(
                f"mod_start_layer={self.mod_start_layer} leaves no MoD layer among num_layers="
                f"{self.num_layers}; lower it or set mod_interval=0."
            )
        if self.mod_interval and self.context_parallel_size > 1:
            raise NotImplementedError(
                "Mixture-of-Depths layers choose tokens over the whole micro-batch and pack each "
                "sample's sequence, so they do not support context parallelism yet; use "
                "context_parallel_size=1 or set mod_interval=0."
            )
        if not 0 < self.moma_aux_threshold < 1:
            raise ValueError(f"moma_aux_threshold={self.moma_aux_threshold} must be in (0, 1).")

    def is_mod_layer(self, layer_index: int) -> bool:
        """Whether the layer of 0-based global index ``layer_index`` is a Mixture-of-Depths layer."""
        return bool(self.mod_interval) and layer_index >= self.mod_start_layer and (
            (layer_index - self.mod_start_layer) % self.mod_interval == 0)

    @property
    def num_mod_layers(self) -> int:
        return sum(self.is_mod_layer(i) for i in range(self.num_layers))

    def _check_vocab_ranges(self):
        if self.moma_vocab_ranges is None:
            return
        self.moma_vocab_ranges = {k: tuple(v) for k, v in dict(self.moma_vocab_ranges).items()}
        spans = []
        for name, (start, end) in self.moma_vocab_ranges.items():
            if name not in self.moma_modalities:
                raise ValueError(
                    f"moma_vocab_ranges names {name!r}, which is not in moma_modalities "
                    f"{self.moma_modalities}."
                )
            if not 0 <= start < end:
                raise ValueError(f"moma_vocab_ranges[{name!r}]=({start}, {end}) needs 0 <= start < end.")
            spans.append((start, end, name))
        spans.sort()
        for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(f"moma_vocab_ranges of {n0!r} and {n1!r} overlap; make them disjoint.")

    @property
    def num_modalities(self) -> int:
        return len(self.moma_modalities)

    @property
    def is_dense(self) -> bool:
        return not self.moma_expert_groups

    @property
    def needs_modality_layout(self) -> bool:
        """Whether any layer reads the tokens' modalities (experts, MoD, untied MoT parts)."""
        return not self.is_dense or bool(self.mod_interval) or bool(self.mot)
