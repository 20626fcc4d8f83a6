"""Megatron-LM's ``pretrain_gpt.py`` with MoMa, for a checkout left unpatched: copy this file beside
``pretrain_gpt.py`` and run it in its place with the same flags plus
``--spec moma_plugin moma_layer_spec`` and the MoMa flags (docs/MEGATRON_LM.md). It reuses the stock
script's data, batch and loss code and wraps its model building and forward step
(``moma_plugin.megatron_lm``) as the patches in ``patches/`` do inside it; it leaves out the stock
script's in-process restart wrapper and startup timestamps. For Megatron-LM core_v0.16.1 and core_v0.19.0.
"""

from functools import partial

import pretrain_gpt as stock
from megatron.core.enums import ModelType
from megatron.training import pretrain

from moma_plugin import megatron_lm as moma
from moma_plugin.megatron_compat import megatron_lm_builds_from_config

forward_step = moma.forward_step(stock.forward_step, stock.get_batch)
# The stock dataset provider asks this (a module global) which ranks read data: every pipeline stage
# under MoMa.
stock.is_dataset_built_on_rank = moma.dataset_built_on_rank(stock.is_dataset_built_on_rank)
train_valid_test_datasets_provider = stock.train_valid_test_datasets_provider
extra_args_provider = moma.extra_args_provider(stock.add_modelopt_args if stock.has_nvidia_modelopt else None)
if megatron_lm_builds_from_config():  # core_v0.19 on: the model config names its builder
    gpt_config_from_args = moma.config_from_args(stock.gpt_config_from_args)
else:  # core_v0.16: model_provider calls the builder
    gpt_builder = moma.builder(stock.gpt_builder)


def main():
    train_valid_test_datasets_provider.is_distributed = True
    if not megatron_lm_builds_from_config():
        from model_provider import model_provider

        pretrain(train_valid_test_datasets_provider, partial(model_provider, gpt_builder),
                 ModelType.encoder_or_decoder, forward_step, args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
                 extra_args_provider=extra_args_provider, get_embedding_ranks=stock.get_embedding_ranks)
        return
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider,
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    config = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    pretrain(config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step,
             get_embedding_ranks=stock.get_embedding_ranks)


if __name__ == "__main__":
    main()
