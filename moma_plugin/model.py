"""MoMaGPTModel: Megatron's GPTModel whose forward also takes per-token modality ids."""

from typing import Optional, Union

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from torch import Tensor

from .block import MoMaTransformerBlock
from .config import MoMaConfig
from .layout import ModalityLayout, build_modality_layout, modality_ids_from_tokens


class MoMaGPTModel(GPTModel):
    """A GPTModel built of MoMa layers.

    ``forward(input_ids, position_ids, attention_mask, ..., modality_ids=None)``: ``modality_ids`` is
    [b, s] like ``input_ids``; without it the ids are derived from token ids through
    ``config.moma_vocab_ranges``. The modality layout is computed once per forward and handed to
    every layer. Pipeline stages after the first have no input ids and need ``modality_ids``.
    All other arguments are GPTModel's.
    """

    def __init__(
        self,
        config: MoMaConfig,
        transformer_layer_spec: Union[ModuleSpec, TransformerBlockSubmodules],
        vocab_size: int,
        max_sequence_length: int,
        **kwargs,
    ):
        if not isinstance(config, MoMaConfig):
            raise TypeError(f"MoMaGPTModel needs a MoMaConfig, got {type(config).__name__}.")
        for name, (start, end) in (config.moma_vocab_ranges or {}).items():
            if end > vocab_size:
                raise ValueError(f"moma_vocab_ranges[{name!r}]=({start}, {end}) reaches beyond "
                                 f"vocab_size={vocab_size}; the ranges must lie inside the vocabulary.")
        # GPTModel always builds a plain TransformerBlock; give it no layers, then put ours in its
        # place (same attribute, so parameter names and order are those of a GPTModel).
        super().__init__(
            config, TransformerBlockSubmodules(layer_specs=[], layer_norm=None),
            vocab_size, max_sequence_length, **kwargs,
        )
        self.decoder = MoMaTransformerBlock(
            config=self.config,
            spec=transformer_layer_spec,
            pre_process=self.pre_process,
            post_process=self.post_process,
            pg_collection=self.pg_collection,
            vp_stage=self.vp_stage,
        )

    def modality_layout(
        self, input_ids: Optional[Tensor], modality_ids: Optional[Tensor]
    ) -> Optional[ModalityLayout]:
        """The layout of a [b, s] micro-batch, tokens in the [s, b] order of the hidden states."""
        if not self.config.needs_modality_layout:
            return None
        if modality_ids is None:
            if self.config.moma_vocab_ranges is None or input_ids is None:
                raise ValueError(
                    "MoMaGPTModel.forward needs modality_ids [b, s], or config.moma_vocab_ranges "
                    "(with input_ids) to derive them from token ids."
                )
            modality_ids = modality_ids_from_tokens(
                input_ids, self.config.moma_vocab_ranges, self.config.moma_modalities
            )
        device = next(self.parameters()).device  # the data loader may hand ids over on the CPU
        return build_modality_layout(modality_ids.t().to(device), self.config.num_modalities)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor],
        decoder_input: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        *,
        modality_ids: Optional[Tensor] = None,
        extra_block_kwargs: Optional[dict] = None,
        **kwargs,
    ) -> Tensor:
        layout = self.modality_layout(input_ids, modality_ids)
        extra_block_kwargs = {**(extra_block_kwargs or {}), "modality_layout": layout}
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input, labels,
            extra_block_kwargs=extra_block_kwargs, **kwargs,
        )
