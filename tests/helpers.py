"""Small builders shared by the tests."""

import contextlib
from unittest import mock

import torch

import moma_plugin as mp


def tiny_config(**overrides) -> mp.MoMaConfig:
    values = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        use_cpu_initialization=True, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, moma_experts="2t2i",
    )
    values.update(overrides)
    return mp.MoMaConfig(**values)


def tiny_model(config: mp.MoMaConfig, vocab_size: int = 64, seq_length: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config, use_te=False),
                           vocab_size=vocab_size, max_sequence_length=seq_length)


def random_batch(batch: int, seq: int, vocab_size: int = 64, num_modalities: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seq), generator=g)
    modality_ids = torch.randint(0, num_modalities, (batch, seq), generator=g)
    position_ids = torch.arange(seq).expand(batch, seq)
    return tokens, position_ids, modality_ids


def moma_mlp(config: mp.MoMaConfig, seed: int = 0) -> mp.MoMaMLP:
    """A MoMaMLP built from the local spec, as a layer would build it."""
    from megatron.core.transformer.spec_utils import build_module

    torch.manual_seed(seed)
    spec = mp.get_moma_layer_spec(config, use_te=False).submodules.mlp
    return build_module(spec, config=config)


def run_mlp(mlp, hidden_SBH, modality_ids_SB):
    layout = mp.build_modality_layout(modality_ids_SB, mlp.config.num_modalities)
    with mlp.routing_layout(layout):
        out, bias = mlp(hidden_SBH)
    assert bias is None
    return out, layout


class CPURNGTracker:
    """Stands in for Megatron's CUDA RNG tracker: forks nothing (dropout draws from torch's CPU
    generator; the test models have no dropout)."""

    @contextlib.contextmanager
    def fork(self, name=None):
        yield


# The CUDA-bound calls of Megatron-Core's sequence parallelism that CPU test ranks replace (the
# package itself refuses --sequence-parallel without CUDA): its communication allocates buffers on
# torch.cuda.current_device() (tensor_parallel/mappings.py, layers.py, utils.py's global buffer), and
# the embedding's dropout forks the CUDA RNG tracker (language_model_embedding.py).
SEQUENCE_PARALLEL_STAND_INS = {"torch.cuda.current_device": lambda: "cpu",
                               "megatron.core.tensor_parallel.get_cuda_rng_tracker": CPURNGTracker}


@contextlib.contextmanager
def sequence_parallel_stand_ins():
    with contextlib.ExitStack() as stack:
        for target, stand_in in SEQUENCE_PARALLEL_STAND_INS.items():
            stack.enter_context(mock.patch(target, stand_in))
        yield
