"""The model config and builder of a MoMa job in Megatron-LM core_v0.19 and later.

From core_v0.19 ``pretrain_gpt.py`` builds the model from a ``GPTModelConfig``: ``gpt_config_from_args``
makes it and ``pretrain`` builds with the class its ``builder`` class variable names.
``moma_plugin.megatron_lm.config_from_args`` makes a ``MoMaGPTModelConfig`` (holding ``MoMaConfig``)
whose builder below builds ``MoMaGPTModel``. This module imports Megatron-LM's ``megatron.training``:
it is imported inside such a job only.
"""

from typing import ClassVar, Optional

from megatron.core.pipeline_parallel.utils import (
    is_pp_first_stage,
    is_pp_last_stage,
    is_vp_first_stage,
    is_vp_last_stage,
)
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig
from megatron.training.vocab_utils import calculate_padded_vocab_size

from .model import MoMaGPTModel


class MoMaGPTModelConfig(GPTModelConfig):
    """``GPTModelConfig`` whose ``transformer`` is a ``MoMaConfig``, built by ``MoMaGPTModelBuilder``."""

    builder: ClassVar[str] = "moma_plugin.megatron_lm_builder.MoMaGPTModelBuilder"


class MoMaGPTModelBuilder(GPTModelBuilder):
    """Builds one ``MoMaGPTModel`` stage; ``GPTModelBuilder`` wraps the stages for training."""

    def build_model(self, pg_collection, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, vp_stage: Optional[int] = None) -> MoMaGPTModel:
        from megatron.training import get_args

        from .megatron_lm import build_moma_gpt

        config = self._model_config
        vp_size = config.virtual_pipeline_model_parallel_size
        if pre_process is None:
            pre_process = (is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size)
                           and is_pp_first_stage(pg_collection.pp))
        if post_process is None:
            post_process = (is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size)
                            and is_pp_last_stage(pg_collection.pp))
        vocab_size = config.vocab_size
        if config.should_pad_vocab:
            vocab_size = calculate_padded_vocab_size(vocab_size, config.make_vocab_size_divisible_by,
                                                     config.transformer.tensor_model_parallel_size)
        return build_moma_gpt(get_args(), pre_process, post_process, vp_stage, config.transformer,
                              pg_collection, vocab_size=vocab_size)
