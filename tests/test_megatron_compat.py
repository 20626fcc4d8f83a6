"""moma_plugin/megatron_compat.py: the installed megatron-core is a tested line, and the Megatron
signatures the plugin overrides or calls still have the shape its shims expect (so that a new release
fails here, in one place, rather than somewhere inside a training run)."""

import inspect
import warnings

import pytest
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from moma_plugin import megatron_compat
from moma_plugin.block import MoMaTransformerBlock


def test_the_installed_megatron_core_is_a_tested_line_and_another_one_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert megatron_compat.warn_if_untested()
    with pytest.warns(UserWarning, match=r"tested with megatron-core 0\.16, 0\.19; 0\.99\.0 is installed"):
        assert not megatron_compat.warn_if_untested((0, 99, 0))


def test_megatron_block_forward_takes_nothing_the_moma_block_silently_drops():
    """Every parameter of Megatron's TransformerBlock.forward is one of MoMaTransformerBlock.forward's
    or one it refuses when set (BLOCK_FORWARD_NOT_TAKEN)."""
    theirs = set(inspect.signature(TransformerBlock.forward).parameters)
    ours = set(inspect.signature(MoMaTransformerBlock.forward).parameters)
    assert theirs - ours <= set(megatron_compat.BLOCK_FORWARD_NOT_TAKEN), theirs - ours
    megatron_compat.refuse_unsupported_block_arguments({"inference_params": None, "extract_layer_indices": set(),
                                                        "dynamic_inference_decode_only": False})
    with pytest.raises(NotImplementedError, match=r"\['extract_layer_indices'\]"):
        megatron_compat.refuse_unsupported_block_arguments({"extract_layer_indices": {1}})


def test_the_private_layer_halves_take_what_the_shims_pass():
    attention = inspect.signature(TransformerLayer._forward_attention).parameters
    assert list(attention)[:2] == ["self", "hidden_states"] and "rotary_pos_emb" in attention
    mlp = inspect.signature(TransformerLayer._forward_mlp).parameters
    assert list(mlp)[:2] == ["self", "hidden_states"]
    assert all(p.default is not inspect.Parameter.empty for p in list(mlp.values())[2:])
    from megatron.core.transformer import transformer_block

    assert inspect.isclass(megatron_compat.block_default_norm())
    assert list(inspect.signature(transformer_block.get_num_layers_to_build).parameters) == [
        "config", "vp_stage", "pp_rank"]
