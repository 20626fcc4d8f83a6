"""Megatron-LM's ``pretrain_gpt.py`` with MoMa, for a checkout left unpatched: copy this file beside
``pretrain_gpt.py`` and run it in its place with the same flags plus
``--spec moma_plugin moma_layer_spec`` and the MoMa flags (docs/MEGATRON_LM.md). It reuses the stock
script's data, batch and loss code and wraps its builder and forward step (``moma_plugin.megatron_lm``)
as ``patches/megatron-lm-core_v0.16.1.patch`` does inside it; it leaves out the stock script's
in-process restart wrapper and startup timestamps. Written for Megatron-LM core_v0.16.1.
"""

from functools import partial

import pretrain_gpt as stock
from megatron.core.enums import ModelType
from megatron.training import pretrain
from model_provider import model_provider

from moma_plugin import megatron_lm as moma

gpt_builder = moma.builder(stock.gpt_builder)
forward_step = moma.forward_step(stock.forward_step, stock.get_batch)
train_valid_test_datasets_provider = stock.train_valid_test_datasets_provider

if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    pretrain(
        train_valid_test_datasets_provider,
        partial(model_provider, gpt_builder),
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=moma.extra_args_provider(stock.add_modelopt_args if stock.has_nvidia_modelopt
                                                     else None),
        get_embedding_ranks=stock.get_embedding_ranks,
    )
