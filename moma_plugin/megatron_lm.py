"""What a Megatron-LM ``pretrain_gpt.py`` job needs to train a MoMa model.

``patches/megatron-lm-core_v0.16.1.patch`` and ``patches/megatron-lm-core_v0.19.0.patch`` wrap four
things of the stock script with the functions here; ``examples/megatron_lm/pretrain_moma_gpt.py`` does
the same without patching. A job opts in with Megatron-LM's own flag, ``--spec moma_plugin
moma_layer_spec``; without it every wrapped function hands over to the stock one, so the patched script
still runs plain GPT jobs. What differs between Megatron-LM releases goes through
``moma_plugin.megatron_compat``.

- ``extra_args_provider(other)``: the MoMa flags (``moma_plugin.args.add_moma_args``), chained with
  the script's own provider (ModelOpt's, where installed).
- The model: ``MoMaConfig`` from Megatron-LM's ``core_transformer_config_from_args(args,
  config_class=MoMaConfig)`` and ``MoMaGPTModel`` with the MoMa layer spec (local, or Transformer Engine
  under ``--transformer-impl transformer_engine``). core_v0.16 builds it through ``builder(gpt_builder)``,
  core_v0.19 through ``config_from_args(gpt_config_from_args)``, whose model config names
  ``moma_plugin.megatron_lm_builder``'s builder. Modality ids come from token ids:
  ``--moma-vocab-ranges``, or the ``.vocab.json`` that ``moma-preprocess`` writes beside the first
  ``--data-path`` prefix.
- ``forward_step(stock_forward_step, get_batch)``: the script's ``get_batch`` (TP broadcast, context
  parallelism), then the model with the batch's modality ids (``modality_stream`` below for pipeline
  stages without the embedding); its ``loss_func`` adds the joint
  aux-router loss (``--aux-router-joint``) and reports, through Megatron-LM's own logging, the loss of
  each modality (``text lm loss``...). The routing metrics of ``moma_plugin.metrics``
  (``moma/layer0/image/tokens_per_expert_min``...) go to Megatron-LM's TensorBoard writer directly:
  their keys vary with the tokens a micro-batch holds, and Megatron-LM all-reduces every report key
  over the data-parallel ranks, so a key one rank lacks would mismatch the collectives.

- Pipeline parallelism: the stock ``get_batch`` hands tokens to the first stage only, so the stages
  after it could not derive modality ids. ``dataset_built_on_rank(stock)`` (wrapping
  ``is_dataset_built_on_rank``) has every stage's first TP rank read the micro-batches, as the stock
  script does for packed sequences, and ``forward_step`` derives each stage's modality ids from the
  tokens it read and broadcasts them over the stage's TP group. A stage without the loss
  backpropagates its aux routers' loss itself (``--aux-router-joint``). Its routing metrics are read
  and reset there, but only the last stage's reach TensorBoard (its writer lives on the last rank).

Not yet (refused with a message): expert parallelism (Megatron-LM's DDP would need to reduce the MoMa experts over expert-DP), packed
sequences, and checkpoints in ``torch_dist`` format (the stacked experts have no
``sharded_state_dict``; use ``--ckpt-format torch``). docs/MEGATRON_LM.md has the commands.
"""

from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from .args import add_moma_args
from .aux_router import pop_aux_loss, set_aux_router_training
from .config import MoMaConfig
from .layout import modality_ids_from_tokens
from .megatron_compat import megatron_lm_batch
from .metrics import collect_routing_metrics
from .model import MoMaGPTModel
from .pipeline import stage_of
from .specs import get_moma_layer_spec

SPEC = ("moma_plugin", "moma_layer_spec")


def uses_moma(args) -> bool:
    """Whether the job asked for MoMa: ``--spec moma_plugin ...``."""
    spec = getattr(args, "spec", None)
    return bool(spec) and spec[0] == SPEC[0]


def extra_args_provider(other: Optional[Callable] = None) -> Callable:
    """A provider adding the MoMa flags, then ``other``'s (the script's own provider, if any)."""
    def provider(parser):
        parser = add_moma_args(parser)
        return other(parser) if other is not None else parser
    return provider


def vocab_ranges(args) -> Dict[str, Tuple[int, int]]:
    """{modality: (first id, end)} from ``--moma-vocab-ranges``, else from the vocabulary file of the
    first ``--data-path`` prefix (``moma-preprocess`` output)."""
    if args.moma_vocab_ranges:
        return dict(args.moma_vocab_ranges)
    prefixes = [item for item in (getattr(args, "data_path", None) or []) if not _is_number(item)]
    vocab = Path(f"{prefixes[0]}.vocab.json") if prefixes else None
    if vocab is None or not vocab.exists():
        raise ValueError("MoMa needs the token-id range of each modality: give --moma-vocab-ranges "
                         "image:START:END, or a --data-path prefix written by moma-preprocess "
                         f"(it reads PREFIX.vocab.json{'; ' + str(vocab) + ' is missing' if vocab else ''})")
    from .data.vocab import VocabularyLayout

    return VocabularyLayout.load(vocab).vocab_ranges()


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def moma_config(args) -> MoMaConfig:
    """``MoMaConfig`` from Megatron-LM's arguments (its own translation, MoMa fields by name)."""
    from megatron.training.arguments import core_transformer_config_from_args

    check_args(args)
    args.moma_vocab_ranges = vocab_ranges(args)
    return core_transformer_config_from_args(args, config_class=MoMaConfig)


def check_args(args):
    """What MoMa cannot run yet in a Megatron-LM job: a ValueError saying what to pass instead."""
    if args.save and getattr(args, "ckpt_format", "torch") != "torch":
        raise ValueError(f"MoMa under Megatron-LM saves with --ckpt-format torch only (the stacked experts have "
                         f"no sharded_state_dict for {args.ckpt_format} yet): add --ckpt-format torch")
    if args.pipeline_model_parallel_size > 1 and getattr(args, "context_parallel_size", 1) > 1:
        raise ValueError("MoMa under Megatron-LM with --pipeline-model-parallel-size > 1 and "
                         "--context-parallel-size > 1 is not supported (the later stages' modality ids "
                         "are not split over context-parallel ranks); use one of the two")
    if args.pipeline_model_parallel_size > 1 and args.aux_router_joint and args.calculate_per_token_loss:
        raise ValueError("MoMa under Megatron-LM: --aux-router-joint with --pipeline-model-parallel-size > 1 "
                         "and --calculate-per-token-loss is not supported (the stages without the loss "
                         "cannot weight their aux-router loss by the tokens); drop one of them")
    if getattr(args, "expert_model_parallel_size", 1) > 1:
        raise ValueError("MoMa under Megatron-LM with --expert-model-parallel-size > 1 is not supported yet "
                         "(Megatron-LM's DDP must reduce the MoMa experts over the expert-data-parallel "
                         "group; not tested): use EP 1 here, or moma-pretrain for expert parallelism")


def build_moma_gpt(args, pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None, vocab_size: Optional[int] = None) -> MoMaGPTModel:
    """``MoMaGPTModel`` as ``gpt_builder`` builds ``GPTModel``: the same arguments, MoMa's config and
    layer spec; ``vocab_size`` (padded) defaults to ``args.padded_vocab_size``."""
    config = config if isinstance(config, MoMaConfig) else moma_config(args)
    if tuple(args.spec) == SPEC:
        spec = get_moma_layer_spec(config, use_te=args.transformer_impl == "transformer_engine")
    else:
        from megatron.core.transformer.spec_utils import import_module

        spec = import_module(args.spec)
    model = MoMaGPTModel(
        config, spec, vocab_size=vocab_size or args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, vp_stage=vp_stage,
        pg_collection=pg_collection)
    # --aux-router-joint: their BCE loss joins the step's and their weights train (before Megatron-LM
    # builds its optimizer); otherwise they are frozen, for moma-train-aux-routers after pretraining.
    set_aux_router_training(model, bool(args.aux_router_joint))
    return model


def builder(stock_builder: Callable) -> Callable:
    """core_v0.16: ``gpt_builder``'s replacement: MoMa under ``--spec moma_plugin ...``, else
    ``stock_builder``."""
    def build(args, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        if not uses_moma(args):
            return stock_builder(args, pre_process, post_process, vp_stage, config=config,
                                 pg_collection=pg_collection)
        return build_moma_gpt(args, pre_process, post_process, vp_stage, config, pg_collection)
    return build


def config_from_args(stock_config_from_args: Callable) -> Callable:
    """core_v0.19: ``gpt_config_from_args``'s replacement: under ``--spec moma_plugin ...`` a
    ``MoMaGPTModelConfig`` holding ``MoMaConfig`` (its builder builds ``MoMaGPTModel``), else the stock
    config."""
    def make(args, config=None, **kwargs):
        if not uses_moma(args):
            return stock_config_from_args(args, config, **kwargs)
        if kwargs.get("model_config_cls") is not None:
            raise ValueError(f"MoMa under Megatron-LM does not combine with {kwargs['model_config_cls'].__name__} "
                             "(ModelOpt): leave ModelOpt off for a MoMa job")
        from .megatron_lm_builder import MoMaGPTModelConfig

        config = config if isinstance(config, MoMaConfig) else moma_config(args)
        return stock_config_from_args(args, config, model_config_cls=MoMaGPTModelConfig)
    return make


def dataset_built_on_rank(stock_is_dataset_built_on_rank: Callable) -> Callable:
    """``is_dataset_built_on_rank``'s replacement: under MoMa with pipeline parallelism the first TP
    rank of every stage reads the data (each stage derives its modality ids from the tokens), else the
    stock answer."""
    def built(vp_stage=None, **kwargs):
        from megatron.core import parallel_state
        from megatron.training import get_args

        args = get_args()
        if uses_moma(args) and args.pipeline_model_parallel_size > 1:
            return parallel_state.get_tensor_model_parallel_rank() == 0
        return stock_is_dataset_built_on_rank(vp_stage, **kwargs)
    return built


class _Recorded:
    """An iterator that keeps the tokens of the last item it handed out (the stock ``get_batch`` of the
    last stage reads them, then drops them: core_v0.19 sets them to None in the item itself)."""

    def __init__(self, iterator):
        self.iterator, self.tokens = iterator, None

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.tokens = item["tokens"]
        return item


def modality_stream(recorded: Optional[_Recorded], config: MoMaConfig, args) -> torch.Tensor:
    """[b, s] modality ids of the micro-batch on a stage without the embedding: its first TP rank
    derives them from the tokens the stock ``get_batch`` read (the last stage), or reads the
    micro-batch itself (a middle stage, where ``get_batch`` reads nothing); then they are broadcast over
    the stage's TP group."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_rank() == 0:
        if recorded is None:
            raise ValueError("MoMa under Megatron-LM with pipeline parallelism: this stage has no data "
                             "iterator, so it cannot derive its modality ids; is_dataset_built_on_rank must be "
                             "wrapped with moma_plugin.megatron_lm.dataset_built_on_rank (the patches do it)")
        if recorded.tokens is None:  # a middle stage: the stock get_batch read nothing
            next(recorded)
        tokens = recorded.tokens.to(torch.cuda.current_device())
        ids = modality_ids_from_tokens(tokens, config.moma_vocab_ranges, config.moma_modalities).long()
    else:
        ids = torch.empty(args.micro_batch_size, args.seq_length, dtype=torch.long,
                          device=torch.cuda.current_device())
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(ids, parallel_state.get_tensor_model_parallel_src_rank(),
                                    group=parallel_state.get_tensor_model_parallel_group())
    return ids


def forward_step(stock_forward_step: Callable, get_batch: Callable) -> Callable:
    """The script's ``forward_step`` under MoMa: its ``get_batch``, the batch's modality ids (from
    token ids; ``modality_stream`` on a stage without the embedding) passed to the model, and
    ``loss_func`` below on the last stage."""
    def step(data_iterator, model, return_schedule_plan: bool = False):
        from megatron.training import get_args

        args = get_args()
        if not uses_moma(args):
            return stock_forward_step(data_iterator, model, return_schedule_plan)
        if return_schedule_plan:
            raise ValueError("MoMa does not build schedule plans (--overlap-moe-expert-parallel-comm)")
        moma = stage_of(model)
        config = moma.config
        recorded = None if moma.pre_process or data_iterator is None else _Recorded(data_iterator)
        batch = megatron_lm_batch(get_batch(recorded or data_iterator, getattr(moma, "vp_stage", None)))
        if batch.get("packed_seq_params") is not None or batch.get("cu_seqlens") is not None:
            raise ValueError("MoMa under Megatron-LM does not take packed sequences yet (--sft, "
                             "--dataloader-inter-document-masking): leave them off")
        tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        if moma.pre_process:
            modality_ids = modality_ids_from_tokens(tokens, config.moma_vocab_ranges, config.moma_modalities)
        else:  # the stock batch of a later stage holds no tokens (TP rank 0 of the last stage aside)
            tokens, modality_ids = None, modality_stream(recorded, config, args)
        output = model(tokens, batch["position_ids"], batch["attention_mask"], labels=labels,
                       loss_mask=loss_mask, modality_ids=modality_ids)
        if moma.post_process:
            label_modality = modality_ids_from_tokens(labels, config.moma_vocab_ranges, config.moma_modalities)
            return output, partial(loss_func, loss_mask, label_modality, moma)
        aux = pop_aux_loss(moma)  # a stage without the loss: its aux routers learn here
        if aux is not None and aux.requires_grad:
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            (aux.float() / get_num_microbatches()).backward()  # as the schedule divides the loss
        log_routing_metrics(moma)
        return output, None
    return step


def loss_func(loss_mask: torch.Tensor, label_modality: torch.Tensor, model: MoMaGPTModel,
              output_tensor: torch.Tensor):
    """Megatron-LM's GPT loss (sum over unmasked tokens, their number, a report of [sum, count]
    pairs it averages over the global batch), plus the joint aux-router loss (counted per micro-batch
    as Megatron divides the sum by the tokens) and per-modality losses in the report (a modality
    absent from the whole global batch reads NaN: no tokens). Unlike moma-pretrain, Megatron-LM's
    --clip-grad takes the aux routers' gradients into the model's norm."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}
    modality = label_modality.view(-1).to(losses.device)
    for index, name in enumerate(model.config.moma_modalities):
        chosen = mask * (modality == index)
        report[f"{name} lm loss"] = torch.stack([(losses * chosen).sum().detach(), chosen.sum()])
    aux = pop_aux_loss(model)
    if aux is not None:
        loss = loss + aux.float() * num_tokens
        report["aux router loss"] = torch.stack([aux.detach().float(), torch.ones_like(aux.float())])
    log_routing_metrics(model)
    return loss, num_tokens, report


def log_routing_metrics(model: MoMaGPTModel):
    """This micro-batch's routing metrics, to Megatron-LM's TensorBoard writer (on the rank that has
    one) at the current iteration; read (and reset) on every rank."""
    from megatron.training import get_args
    from megatron.training.global_vars import get_tensorboard_writer

    metrics = collect_routing_metrics(model)
    writer = get_tensorboard_writer()
    if writer is not None:
        iteration = getattr(get_args(), "curr_iteration", 0)
        for key, value in metrics.items():
            writer.add_scalar(key, value, iteration)
