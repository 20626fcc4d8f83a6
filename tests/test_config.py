import argparse

import pytest

import moma_plugin as mp
from moma_plugin.config import SHARED_GROUP, expert_capacity, parse_expert_groups

from .helpers import tiny_config

TI = ("text", "image")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("4t4i", [("text", 4, (0,)), ("image", 4, (1,))]),
        ("1i7t", [("text", 7, (0,)), ("image", 1, (1,))]),  # order in the string does not matter
        ("6t2i", [("text", 6, (0,)), ("image", 2, (1,))]),
        ("8x", [(SHARED_GROUP, 8, (0, 1))]),
        ("dense", []),
    ],
)
def test_parse_expert_groups(spec, expected):
    groups = parse_expert_groups(spec, TI)
    assert [(g.name, g.num_experts, g.modalities) for g in groups] == expected


def test_parse_three_modalities():
    groups = parse_expert_groups("4t4i2s", ("text", "image", "speech"))
    assert [(g.name, g.num_experts) for g in groups] == [("text", 4), ("image", 4), ("speech", 2)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("4t4", "does not parse"),
        ("four", "does not parse"),
        ("4t4i2s", "letter 's'"),
        ("4t", "gives no experts to ['image']"),
        ("4t2t4i", "twice"),
        ("0t4i", "at least one expert"),
    ],
)
def test_bad_expert_strings_say_what_to_do(spec, message):
    with pytest.raises(ValueError) as err:
        parse_expert_groups(spec, TI)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "tokens, experts, factor, expected",
    [(100, 4, 1.0, 25), (101, 4, 1.0, 26), (10, 1, 4.0, 10), (0, 4, 1.0, 0), (3, 8, 1.0, 1)],
)
def test_expert_capacity(tokens, experts, factor, expected):
    assert expert_capacity(tokens, experts, factor) == expected


def test_config_validation_messages():
    with pytest.raises(ValueError, match="not divisible by tensor_model_parallel_size"):
        tiny_config(ffn_hidden_size=63, tensor_model_parallel_size=2, moma_experts="4t4i")
    with pytest.raises(ValueError, match="moma_capacity_factor"):
        tiny_config(moma_capacity_factor=0)
    with pytest.raises(ValueError, match="moma_expert_execution"):
        tiny_config(moma_expert_execution="fast")
    with pytest.raises(ValueError, match="overlap"):
        tiny_config(moma_vocab_ranges={"image": (10, 20), "text": (15, 30)})
    with pytest.raises(ValueError, match="not in moma_modalities"):
        tiny_config(moma_vocab_ranges={"speech": (10, 20)})
    with pytest.raises(ValueError, match="does not parse"):
        tiny_config(moma_experts="4x4")
    with pytest.raises(ValueError, match=r"mod_capacity=0 must be in \(0, 1\]"):
        tiny_config(mod_interval=2, mod_capacity=0)
    with pytest.raises(ValueError, match="leaves no MoD layer"):
        tiny_config(mod_interval=2, mod_start_layer=2)  # 2 layers
    with pytest.raises(ValueError, match="moma_aux_threshold"):
        tiny_config(moma_aux_threshold=1.0)


def test_mod_layers_are_every_interval_from_the_start_layer():
    assert [tiny_config(num_layers=6, mod_interval=2).is_mod_layer(i) for i in range(6)] == [
        True, False, True, False, True, False]
    config = tiny_config(num_layers=6, mod_interval=3, mod_start_layer=1)
    assert [i for i in range(6) if config.is_mod_layer(i)] == [1, 4]
    assert config.num_mod_layers == 2 and tiny_config().num_mod_layers == 0


def test_unsupported_parallelism_is_a_clear_error():
    # Sequence parallelism builds with MoMa experts and MoD layers (tests/test_tensor_parallel.py runs it).
    assert tiny_config(sequence_parallel=True, tensor_model_parallel_size=2, mod_interval=2).sequence_parallel
    with pytest.raises(ValueError, match=r"expert_model_parallel_size=3: 3 expert-parallel ranks cannot "
                                         r"split the experts of group\(s\) text \(2\), image \(2\)"):
        tiny_config(expert_model_parallel_size=3)
    with pytest.raises(ValueError, match="a dense model has no experts to split"):
        tiny_config(moma_experts="dense", expert_model_parallel_size=2)
    assert tiny_config(expert_model_parallel_size=2).expert_model_parallel_size == 2  # Megatron's own
    with pytest.raises(NotImplementedError, match="Mixture-of-Depths.*context parallelism"):
        tiny_config(moma_experts="dense", mod_interval=2, context_parallel_size=2)


def test_config_uses_swiglu_experts():
    config = tiny_config()
    assert config.gated_linear_unit and config.activation_func.__name__ == "silu"
    assert [g.num_experts for g in config.moma_expert_groups] == [2, 2]


def test_megatron_style_args_build_the_config():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-attention-heads", type=int)
    mp.add_moma_args(parser)
    args = parser.parse_args(
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --moma-experts 7t1i "
        "--moma-capacity-factor 1.5 --moma-vocab-ranges image:100:200 --moma-post-norm".split()
    )
    config = mp.moma_config_from_args(args, use_cpu_initialization=True)
    assert (config.num_layers, config.hidden_size, config.moma_experts) == (2, 64, "7t1i")
    assert config.moma_capacity_factor == 1.5 and config.moma_post_norm
    assert config.moma_vocab_ranges == {"image": (100, 200)}
    assert [g.num_experts for g in config.moma_expert_groups] == [7, 1]


def test_bad_vocab_range_flag():
    parser = mp.add_moma_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--moma-vocab-ranges", "image:100"])
