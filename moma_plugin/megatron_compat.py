"""The Megatron internals the plugin relies on, in one place.

The plugin subclasses Megatron-Core's ``TransformerLayer``, ``TransformerBlock`` and ``GPTModel``, calls
a few of their private members, and in a Megatron-LM job wraps functions of ``pretrain_gpt.py`` whose
shapes change between releases. All of that goes through this module, one shim per dependency, each
saying which versions need it, so that a new release means one place to look.

Tested (CI, CPU): megatron-core 0.16.1 on Python 3.11 and 0.19.2 on Python 3.12, with Megatron-LM's
training side at core_v0.16.1 and core_v0.19.0. A new release line: add it to ``TESTED_LINES`` and to
setup.py's bound, run ``.ci/run``, and mend what breaks here.
"""

import importlib
import warnings
from typing import Dict, Optional, Sequence, Tuple

# The megatron-core release lines CI tests (major, minor); setup.py's range spans them.
TESTED_LINES: Tuple[Tuple[int, int], ...] = ((0, 16), (0, 19))


def megatron_core_version() -> Tuple[int, int, int]:
    """The installed megatron-core as (major, minor, patch)."""
    from megatron.core.package_info import MAJOR, MINOR, PATCH

    return int(MAJOR), int(MINOR), int(PATCH)


def warn_if_untested(version: Optional[Tuple[int, int, int]] = None) -> bool:
    """A warning (once per process) when the installed megatron-core is not a tested line; whether
    it is one."""
    version = version or megatron_core_version()
    tested = tuple(version[:2]) in TESTED_LINES
    if not tested:
        lines = ", ".join(f"{major}.{minor}" for major, minor in TESTED_LINES)
        warnings.warn(f"moma_plugin is tested with megatron-core {lines}; {'.'.join(map(str, version))} is "
                      "installed. The plugin uses Megatron internals (moma_plugin/megatron_compat.py lists "
                      "them): run the tests (README) before training with it.", stacklevel=2)
    return tested


# --- Megatron-Core: TransformerLayer (0.16, 0.19) --------------------------------------------------
# MoMaTransformerLayer runs the layer's two halves itself (Mixture-of-Depths packs the selected tokens
# between them): the private _forward_attention (input norm, self-attention, residual; returns
# (hidden, context) in 0.16 and 0.19) and _forward_mlp (pre-MLP norm, MLP, residual; 0.19 added a
# packed_seq_params argument, unused here).

def forward_attention(layer, hidden_states, rotary_pos_emb=None):
    """The attention half of Megatron's ``TransformerLayer`` on ``hidden_states`` [s, b, H]."""
    return layer._forward_attention(hidden_states, rotary_pos_emb=rotary_pos_emb)[0]


def forward_mlp(layer, hidden_states):
    """The MLP half of Megatron's ``TransformerLayer`` on ``hidden_states`` [s, b, H]."""
    return layer._forward_mlp(hidden_states)


# --- Megatron-Core: TransformerBlock (0.16, 0.19) --------------------------------------------------
# MoMaTransformerBlock replaces the block's forward (its own layer loop passes the modality layout)
# and, under sequence parallelism, its final norm: transformer_block.LayerNormImpl is the module-level
# choice of norm (TE, Apex, else torch's) and get_num_layers_to_build the stage's layer count, both
# module-level names of transformer_block in 0.16 and 0.19.

def block_default_norm():
    """The norm class Megatron's ``TransformerBlock`` builds as final norm for a layer spec."""
    from megatron.core.transformer import transformer_block

    return transformer_block.LayerNormImpl


def num_layers_to_build(config, vp_stage: Optional[int], pp_rank: Optional[int]) -> int:
    """How many layers the block of this pipeline (and virtual pipeline) stage holds."""
    from megatron.core.transformer import transformer_block

    return transformer_block.get_num_layers_to_build(config, vp_stage, pp_rank)


# TransformerBlock.forward's parameters that MoMaTransformerBlock.forward does not take: the deprecated
# inference_params and dynamic_inference_decode_only (0.16, 0.19), extract_layer_indices (0.19: returns
# intermediate layers' outputs). GPTModel passes them unset; set, they are refused rather than ignored.
# tests/test_megatron_compat.py fails when a release adds a parameter to this list's complement.
BLOCK_FORWARD_NOT_TAKEN = ("inference_params", "dynamic_inference_decode_only", "extract_layer_indices")


def refuse_unsupported_block_arguments(arguments: Dict[str, object]):
    """A NotImplementedError naming the block-forward arguments that are set but not implemented."""
    given = sorted(name for name, value in arguments.items()
                   if value is not None and value is not False and not (isinstance(value, (set, list, tuple))
                                                                        and not value))
    if given:
        raise NotImplementedError(f"MoMaTransformerBlock does not take {given} yet (megatron-core "
                                  f"{'.'.join(map(str, megatron_core_version()))}); leave them unset")


# --- Megatron-LM: pretrain_gpt.get_batch -----------------------------------------------------------
# core_v0.16.1 returns (tokens, labels, loss_mask, attention_mask, position_ids, packed_seq_params);
# core_v0.19.0 returns ten values in the order of its BATCH_KEYS (alphabetical), and forward_step builds
# the packed-sequence parameters from cu_seqlens itself.
_BATCH_V016 = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids", "packed_seq_params")
_BATCH_V019 = ("attention_mask", "cu_seqlens", "cu_seqlens_padded", "hybrid_cp_group", "labels",
               "local_cp_size", "loss_mask", "max_seqlen", "position_ids", "tokens")


def megatron_lm_batch(values: Sequence) -> Dict[str, object]:
    """``pretrain_gpt.get_batch``'s return value by name: tokens, labels, loss_mask, attention_mask,
    position_ids, and packed_seq_params (0.16) or cu_seqlens (0.19) when sequences are packed."""
    for names in (_BATCH_V016, _BATCH_V019):
        if len(values) == len(names):
            return dict(zip(names, values))
    raise ValueError(f"pretrain_gpt.get_batch returned {len(values)} values; moma_plugin knows the "
                     f"{len(_BATCH_V016)} of Megatron-LM core_v0.16 and the {len(_BATCH_V019)} of core_v0.19 "
                     "(moma_plugin/megatron_compat.py)")


# --- Megatron-LM: how pretrain_gpt.py builds the model ----------------------------------------------
# core_v0.16.1: model_provider(gpt_builder) calls gpt_builder(args, pre_process, post_process, ...).
# core_v0.19.0: gpt_config_from_args(args) gives a GPTModelConfig whose ``builder`` class variable names
# the class that builds the model (moma_plugin.megatron_lm_builder for MoMa).

def megatron_lm_builds_from_config() -> bool:
    """Whether this Megatron-LM builds models from a model config's ``builder`` (core_v0.19 on)."""
    try:
        importlib.import_module("megatron.training.models")
    except ImportError:
        return False
    return True
