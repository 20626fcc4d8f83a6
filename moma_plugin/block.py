"""MoMaTransformerBlock: Megatron's TransformerBlock whose forward takes the modality layout and hands
it to every layer as an argument.

The layout is passed explicitly, also into activation checkpointing (each checkpointed chunk closes
over the layout of its own micro-batch), so recomputation in backward, several micro-batches in flight
under pipeline parallelism and re-entrant checkpointing all see the right layout. Megatron's block
forward has no place for it, so this block has its own forward: the same stages (pipeline input, FP8
context, full recompute by 'uniform' or 'block', final norm) without CUDA graphs and CPU offloading.
"""

from contextlib import nullcontext
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import Fp8Recipe
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from megatron.core.utils import get_pg_rank, make_viewless_tensor
from torch import Tensor

from .layout import ModalityLayout
from .megatron_compat import block_default_norm, num_layers_to_build, refuse_unsupported_block_arguments
from .specs import SequenceParallelTorchNorm


def _quantization_contexts(config):
    """(outer context for the whole block, per-layer context factory or None), as Megatron's block."""
    if not config.fp8:
        return nullcontext(), None
    from megatron.core.fp8_utils import get_fp8_context

    if config.fp8_recipe == Fp8Recipe.delayed:
        return get_fp8_context(config), None
    return nullcontext(), lambda layer: get_fp8_context(config, layer.layer_number - 1)


class MoMaTransformerBlock(TransformerBlock):
    """Transformer block of ``MoMaTransformerLayer``s; ``forward(..., modality_layout=...)``."""

    def __init__(self, config, spec, *args, pg_collection=None, vp_stage=None, **kwargs):
        if (config.sequence_parallel and isinstance(spec, ModuleSpec)
                and issubclass(spec.module, BaseTransformerLayer)
                and block_default_norm() is WrappedTorchNorm):
            # For a layer spec Megatron's block builds torch's norm as the final norm, which
            # refuses sequence parallelism: the local spec's own norm takes it.
            pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
            pp_rank = get_pg_rank(getattr(pg_collection, "pp", None))
            spec = TransformerBlockSubmodules(
                layer_specs=[spec] * num_layers_to_build(config, vp_stage, pp_rank),
                layer_norm=SequenceParallelTorchNorm)
        super().__init__(config, spec, *args, pg_collection=pg_collection, vp_stage=vp_stage, **kwargs)
        unsupported = [
            flag for flag in ("fp4", "cpu_offloading", "fine_grained_activation_offloading")
            if getattr(self.config, flag, False)
        ]
        if unsupported or self.config.cuda_graph_impl != "none":
            raise NotImplementedError(
                f"MoMaTransformerBlock does not support {unsupported or ['cuda graphs']} yet; "
                "turn these options off."
            )

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        modality_layout: Optional[ModalityLayout] = None,
        **unused,
    ) -> Tensor:
        """hidden_states [s, b, H] -> [s, b, H]; ``modality_layout`` covers the s*b tokens."""
        refuse_unsupported_block_arguments(unused)
        if not self.pre_process:
            hidden_states = self.input_tensor  # set by the pipeline schedule (set_input_tensor)
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        layer_kwargs = dict(
            attention_mask=attention_mask, context=context, context_mask=context_mask,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias, inference_context=inference_context,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
            padding_mask=padding_mask, modality_layout=modality_layout,
        )
        outer_context, layer_context = _quantization_contexts(self.config)
        with outer_context:
            if self.config.recompute_granularity == "full" and self.training:
                hidden_states = self._recomputed_layers(hidden_states, layer_kwargs, layer_context)
            else:
                hidden_states, _ = self._run_layers(
                    0, len(self.layers), hidden_states, layer_kwargs, layer_context
                )
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        if not self.pre_process and len(self.layers) == 0 and not self.final_layernorm:
            hidden_states = hidden_states.clone()  # keep input and output distinct graph nodes
        # Not a view (a MoD layer's output may be one): the pipeline schedules free a stage's output
        # once sent (deallocate_pipeline_outputs), which they refuse for a view.
        return make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)

    def _run_layers(self, start, end, hidden_states, layer_kwargs, layer_context, context=None):
        context = layer_kwargs["context"] if context is None else context
        for layer in self.layers[start:end]:
            with layer_context(layer) if layer_context else nullcontext():
                hidden_states, context = layer(
                    hidden_states=hidden_states, **{**layer_kwargs, "context": context}
                )
        return hidden_states, context

    def _recomputed_layers(self, hidden_states, layer_kwargs, layer_context):
        """Full activation recompute, by chunks ('uniform') or the first N layers ('block')."""
        num_layers, chunk = len(self.layers), self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            plan = [(start, min(start + chunk, num_layers), True) for start in range(0, num_layers, chunk)]
        elif self.config.recompute_method == "block":
            plan = [(i, i + 1, i < chunk) for i in range(num_layers)]
        else:
            raise ValueError(
                f"recompute_method={self.config.recompute_method!r}: use 'uniform' or 'block' with "
                "recompute_granularity='full'."
            )
        context = layer_kwargs["context"]
        for start, end, recompute in plan:
            if not recompute:
                hidden_states, context = self._run_layers(
                    start, end, hidden_states, layer_kwargs, layer_context, context
                )
                continue

            def run(hidden, ctx, start=start, end=end):
                # The layer arguments, the modality layout among them, are closed over: each
                # checkpointed chunk keeps those of its own micro-batch for the recompute.
                return self._run_layers(start, end, hidden, layer_kwargs, layer_context, ctx)

            hidden_states, context = self._checkpoint(run, hidden_states, context)
        return hidden_states

    def _checkpoint(self, function, hidden_states, context):
        if hidden_states.is_cuda:
            # Megatron's checkpoint also restores its tensor-parallel RNG tracker (dropout).
            if self.config.fp8:
                from megatron.core.extensions.transformer_engine import te_checkpoint

                return te_checkpoint(function, self.config.distribute_saved_activations,
                                     tensor_parallel.random.get_cuda_rng_tracker,
                                     self.pg_collection.tp, hidden_states, context)
            return tensor_parallel.checkpoint(
                function, self.config.distribute_saved_activations, hidden_states, context
            )
        # Megatron's checkpoint reads the CUDA RNG state; on CPU torch's own does the same job.
        return torch.utils.checkpoint.checkpoint(function, hidden_states, context, use_reentrant=False)
