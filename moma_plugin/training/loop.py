"""``moma-pretrain``: pretraining a MoMaGPTModel with Megatron-Core, on CPU or GPU.

What comes from megatron-core: parallel state (tensor/data-parallel groups), the model (GPTModel with
MoMa layer specs, tensor-parallel linears, vocab-parallel embedding and cross entropy) and the learning-
rate schedule (``OptimizerParamScheduler``). The data-parallel side is an engine (``engines``: torch
DDP, FSDP2 or DeepSpeed), which reduces, clips and applies the gradients; the forward/backward over
micro-batches is plain torch (``step.train_step``: megatron-core 0.16's schedules allocate on CUDA).

A run (``PretrainJob``): lock the run and checkpoint directories, build everything and check what can be
checked before the first step (data, held-out split, sampler bound, flags against a checkpoint), resume,
train, then save, evaluate and plot. SIGTERM/SIGINT, a non-finite loss and a full disk end it with a
checkpoint or a message saying why there is none (docs/TRAINING.md, "Checkpoints and resuming").
"""

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..aux_router import (
    aux_confusions,
    aux_metrics,
    has_trained_aux_routers,
    mark_aux_routers_trained,
    set_aux_router_training,
)
from ..cli import UsageError, run_tool
from ..config import model_label
from ..flops import training_flops_per_token
from ..launch import report_signal_stop
from ..metrics import collect_routing_metrics
from . import checkpointing, resume
from .arguments import args_for_checkpoint, batch_sizes, parse_args
from .engines import build_engine, engine_name
from .engines.memory import estimate_line
from .evaluation import evaluate, held_out_batches
from .initialize import (
    Parallel,
    any_rank,
    build_model,
    build_optimizer,
    build_sampler,
    build_scheduler,
    check_vocab_ranges,
    count_parameters,
    data_fingerprint,
    data_path_items,
    load_datasets,
    seed_everything,
    setup_parallel,
    token_counts,
)
from .metrics_log import Interval, MetricsWriter, format_log_line, losses_from_sums, mean_loss, routing_summary
from .step import collate, train_step
from .run_lock import lock_directories
from .signals import StopRequest

TOOL = "moma-pretrain"


@dataclass
class RunResult:
    """What ``pretrain`` returns (tests and scripts read it; the CLI prints it)."""

    status: str  # "completed", "exit-interval", "signal", "nan", "finished" (nothing left to train)
    iteration: int
    run_dir: Path
    checkpoint: Optional[Path]
    train_losses: Dict[int, float] = field(default_factory=dict)  # every iteration run here
    eval: Dict[str, float] = field(default_factory=dict)
    signal: Optional[str] = None


# -- the job ----------------------------------------------------------------------------------------
def default_run_dir(args) -> Path:
    label = model_label(args.moma_experts, args.mot).replace(" ", "-")
    return Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_directories(args):
    """(run directory, checkpoint directory or None): rank 0's choice, on every rank."""
    run_dir = Path(checkpointing.from_rank0(str(args.run_dir or default_run_dir(args))))
    save_dir = None if args.no_save else Path(args.save or run_dir / "checkpoints")
    return run_dir, save_dir


class PretrainJob:
    """One run of ``moma-pretrain`` (see the module docstring); ``run()`` returns its RunResult."""

    def __init__(self, args, parallel: Parallel, run_dir: Path, save_dir: Optional[Path],
                 num_micro: int, stop: StopRequest):
        self.args, self.parallel, self.stop = args, parallel, stop
        self.run_dir, self.save_dir, self.num_micro = run_dir, save_dir, num_micro
        self.iteration, self.consumed_tokens, self.flops_so_far, self.train_seconds = 0, 0, 0.0, 0.0
        self.last_saved = None  # (iteration, directory) of the newest checkpoint in --save
        self.last_loss = None
        self.loaded_from: Optional[Path] = None

    def say(self, message: str):
        if self.parallel.is_first:
            print(message, flush=True)

    # -- before the first step ----------------------------------------------------------------------
    def prepare(self):
        args, parallel = self.args, self.parallel
        self.train_set, self.valid_set = load_datasets(args, parallel)
        self.layout = layout = self.train_set.layout
        if tuple(layout.modalities) != tuple(args.moma_modalities):
            raise UsageError(f"the data holds modalities {layout.modalities} but --moma-modalities is "
                             f"{','.join(args.moma_modalities)}; make them equal")
        check_vocab_ranges(args, layout, data_path_items(args))
        self.data_fingerprint = data_fingerprint(args)
        held_out_batches(self.valid_set, args, parallel)  # too small for one step: say so now
        token_counts(self.valid_set)  # token ids outside the vocabulary: say so now, not at evaluation
        self.model, config = build_model(args, layout, parallel)
        if args.aux_router_joint:
            set_aux_router_training(self.model, True)
        self.sampler, self.shares_target, counts = build_sampler(self.train_set, args, parallel, layout,
                                                                 announce=self.say)
        data_shares = (counts.sum(0) / counts.sum()).tolist()
        self.flops_per_token = training_flops_per_token(config, args.seq_length, self.model.vocab_size,
                                                        data_shares, aux_routers=args.aux_router_joint)
        self.tokens_per_iteration = args.global_batch_size * args.seq_length
        self.num_parameters = count_parameters(self.model, parallel)
        self.rank_parameters = sum(p.numel() for p in self.model.parameters())  # this TP rank's

    def resume(self) -> bool:
        """Restores the newest checkpoint of --load (or of --save, when it holds one). False when the
        run is finished already."""
        args, parallel = self.args, self.parallel
        load_dir = Path(args.load) if args.load else self.save_dir if checkpointing.has_checkpoints(self.save_dir) else None
        if load_dir is None:
            if args.ckpt_step is not None:
                raise UsageError(f"--ckpt-step {args.ckpt_step} needs a checkpoint to resume: pass "
                                 "--load DIR, or a --save that holds one")
            self.start_engine()
            return True
        found = checkpointing.find_checkpoint(load_dir, parallel.model_parallel_rank, args.ckpt_step,
                                              parallel.tp, parallel.pp)
        for note in found.notes:
            self.say(f"note: {note}")
        same_dir = self.save_dir is not None and load_dir.resolve() == self.save_dir.resolve()
        if found.tracker_stale and same_dir and args.ckpt_step is None and parallel.is_first:
            checkpointing.write_tracker(load_dir, found.iteration)
            self.say(f"note: rewrote {load_dir / checkpointing.TRACKER}: iteration {found.iteration}")
        state = found.state
        checkpointing.check_compatible(state["args"], args)
        saved_data = state["moma"].get("data_fingerprint")
        if saved_data is not None and saved_data != self.data_fingerprint:
            raise UsageError(f"the data of --data-path {' '.join(data_path_items(args))} changed since "
                             f"{found.directory} was written (its tokens or vocabulary differ: "
                             "preprocessed again?), so the checkpoint's data position would mean other "
                             "samples; resume with the data it was trained on, or start a new --save")
        iteration = state["iteration"]
        if iteration >= args.train_iters:
            self.say(f"{TOOL}: the run in {load_dir} is finished: its checkpoint is at iteration "
                     f"{iteration} and --train-iters is {args.train_iters}; nothing to train. To train "
                     f"longer, raise --train-iters (keeping the schedule: --lr-decay-iters "
                     f"{state['opt_param_scheduler']['lr_decay_steps']}, or "
                     f"{resume.OVERRIDE}); to start afresh, give a new --save")
            self.iteration = iteration
            return False
        if engine_name(args) != "fsdp2":  # the others take whole tensors (FSDP2 reads its shards)
            state = checkpointing.full_state(state, found.directory, parallel.tp_rank)
        if not checkpointing.is_sharded(state):
            checkpointing.load_model_state(self.model, state["model"])  # before the engine wraps it
        self.start_engine()
        upcycled = state["moma"].get("upcycled")
        if upcycled:  # moma-upcycle's iteration 0: a fresh optimizer and schedule (start_engine's)
            self.start_upcycled_phase(upcycled)
        else:
            self.engine.load_checkpoint(state, found.directory)
            for note in resume.reconcile_schedule(state, args):
                self.say(f"note: {note}")
            resume.apply_optimizer_values(self.engine.optimizer, args)
            self.scheduler = build_scheduler(self.engine.optimizer, args)
            self.scheduler.load_state_dict(state["opt_param_scheduler"])
        sampler_state, failed = resume.nan_stop_sampler(self.save_dir, load_dir, iteration,
                                                        args_for_checkpoint(args))
        self.sampler.load_state_dict(sampler_state or state["moma"]["sampler"])
        if failed is not None:
            skipped = (f"skipping the batches of iterations {iteration + 1}-{failed - 1}"
                       if failed - 1 > iteration + 1 else f"skipping the batch of iteration {iteration + 1}"
                       if failed - 1 == iteration + 1 else "no batch skipped")
            self.say(f"note: the run stopped on a non-finite loss at iteration {failed}: the data "
                     f"continues from that step's batch, {skipped} (recorded in {resume.NAN_STOP}; "
                     "delete it to replay them)")
        checkpointing.set_rng_state(state["rng_state"])
        self.iteration = iteration
        self.consumed_tokens = state["moma"]["consumed_tokens"]
        self.flops_so_far = state["num_floating_point_operations_so_far"]
        self.train_seconds = state["moma"]["train_seconds"]
        self.loaded_from = load_dir
        if same_dir:
            self.last_saved = (iteration, found.directory)
            self.set_aside_newer(iteration)
        elif checkpointing.has_checkpoints(self.save_dir):
            held = checkpointing.saved_iterations(self.save_dir)
            self.say(f"note: --save {self.save_dir} already holds iteration(s) {held}; this run's saves "
                     "replace those of the same iteration (each once its replacement is complete)")
        if not upcycled:
            self.say(f"resumed from {found.directory} at iteration {iteration} "
                     f"({self.consumed_tokens:,} tokens seen)")
        return True

    def start_upcycled_phase(self, upcycled: Dict):
        """After ``moma-upcycle``: Gumbel-sigmoid router noise unless the flags say otherwise."""
        args = self.args
        if "moma_router_gumbel_noise" not in getattr(args, "explicit", {}):
            args.moma_router_gumbel_noise = True
            self.model.config.moma_router_gumbel_noise = True  # read at every forward
        self.say(f"upcycled phase: iteration {upcycled['iteration']} of {upcycled['moma_experts']} "
                 f"({upcycled['from']}) upcycled to {args.moma_experts}; a fresh optimizer and learning-rate "
                 f"schedule, Gumbel-sigmoid router noise {'on' if args.moma_router_gumbel_noise else 'off'}; the "
                 "data continues where the source run stopped")

    def start_engine(self):
        """The data-parallel engine around the model (its final weights), its optimizer, the schedule."""
        self.engine = build_engine(self.model, self.args, self.parallel, self.num_micro, build_optimizer)
        self.scheduler = build_scheduler(self.engine.optimizer, self.args)

    def set_aside_newer(self, iteration: int):
        """Checkpoints newer than the one resumed belong to another branch of the run: moved aside
        (kept), so that no save, fallback or --keep-last mixes them with this branch's."""
        moved = checkpointing.from_rank0(
            checkpointing.set_aside_newer(self.save_dir, iteration) if self.parallel.is_first else None)
        if moved:
            self.say(f"note: moved the checkpoints newer than iteration {iteration} aside, kept as "
                     f"{', '.join(moved)} in {self.save_dir}; delete them when no longer needed")

    def stopped_before_training(self) -> RunResult:
        checkpoint = self.last_saved[1] if self.last_saved else None
        self.say(f"received {self.stop.signal} before the first step: nothing new to save"
                 + (f"; the newest checkpoint is {checkpoint}" if checkpoint else ""))
        self.report_to_launcher(self.stop.signal, checkpoint)
        self.writer.close()
        return RunResult("signal", self.iteration, self.run_dir, checkpoint, signal=self.stop.signal)

    def describe(self):
        args, parallel = self.args, self.parallel
        self.name = args.name or self.run_dir.name
        self.writer = MetricsWriter(self.run_dir, Path(args.tensorboard_dir or self.run_dir / "tensorboard"),
                                    enabled=parallel.is_first)
        if not parallel.is_first:
            return
        record = {"name": self.name, "moma_experts": args.moma_experts,
                  "modalities": list(self.layout.modalities), "flops_per_token": self.flops_per_token,
                  "num_parameters": self.num_parameters, "tokens_per_iteration": self.tokens_per_iteration,
                  "args": args_for_checkpoint(args)}
        self.writer.write_file("run.json", json.dumps(record, indent=1))
        self.say(f"{TOOL} {model_label(args.moma_experts, args.mot)}: {self.num_parameters / 1e6:.2f}M parameters, "
                 f"{args.num_layers} layers, hidden {args.hidden_size}; {parallel.world} process(es) "
                 f"(TP {parallel.tp} x " + (f"PP {parallel.pp} x " if parallel.pp > 1 else "") + f"DP {parallel.dp}"
                 + (f", experts split over EP {parallel.ep} of the DP ranks" if parallel.ep > 1 else "")
                 + f") on {parallel.device.type}, engine "
                 f"{self.engine.describe()}; {len(self.train_set)} "
                 f"training / {len(self.valid_set)} held-out samples of {args.seq_length} tokens; global "
                 f"batch {args.global_batch_size} ({self.num_micro} micro-batch(es) of "
                 f"{args.micro_batch_size} per rank); {self.flops_per_token / 1e6:.2f} MFLOP per token; "
                 f"run dir {self.run_dir}")
        self.say(estimate_line(self.rank_parameters, self.engine, parallel.dp, args.bf16))

    # -- saving -------------------------------------------------------------------------------------
    def save(self, at: int) -> Optional[Path]:
        """Checkpoints iteration ``at`` into --save unless it is there already; its directory
        (None with --no-save)."""
        args = self.args
        if args.aux_router_joint and at > 0:  # the aux routers have trained alongside since step 1
            mark_aux_routers_trained(self.model)
        if self.save_dir is None:
            return None
        if self.last_saved is not None and self.last_saved[0] == at:
            return self.last_saved[1]
        state = {
            "checkpoint_version": checkpointing.CHECKPOINT_VERSION,
            "iteration": at,
            "args": args_for_checkpoint(args),
            "engine": self.engine.name,
            "model": self.engine.model_state_dict(),
            "optimizer": self.engine.optimizer_state_dict(),
            "opt_param_scheduler": self.scheduler.state_dict(),
            "rng_state": checkpointing.rng_state(),
            "num_floating_point_operations_so_far": self.flops_so_far,
            "moma": {"sampler": self.sampler.state_dict(), "consumed_tokens": self.consumed_tokens,
                     "train_seconds": self.train_seconds, "data_fingerprint": self.data_fingerprint},
        }
        norm = self.engine.parameter_norm()
        summary = {"train_loss": self.last_loss, "tokens": self.consumed_tokens,
                   "parameter_norm": norm, "parameters_finite": math.isfinite(norm)}
        path = checkpointing.save_checkpoint(str(self.save_dir), at, state, self.parallel.model_parallel_rank,
                                             writes=self.parallel.dp_rank == 0, summary=summary,
                                             keep_last=args.keep_last,
                                             engine_files=self.engine.save_engine_files)
        if self.parallel.is_first:
            resume.clear_nan_stop(self.save_dir)  # its data position is in this checkpoint now
        self.writer.flush()
        self.last_saved = (at, path)
        return path

    # -- training -----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        result = RunResult("completed", self.iteration, self.run_dir, None)
        from tqdm import tqdm

        args, parallel, layout = self.args, self.parallel, self.layout
        bar = tqdm(total=args.train_iters, initial=self.iteration, unit="it", dynamic_ncols=True,
                   disable=(not args.progress_bar) or (not parallel.is_first) or None)
        interval = Interval(len(layout.modalities))
        try:
            while self.iteration < args.train_iters:
                start = time.perf_counter()
                sampler_before = self.sampler.state_dict()
                micro_batches = [collate([self.train_set[i] for i in self.sampler.next_step()[parallel.dp_rank]])
                                 for _ in range(self.num_micro)]
                sums, grad_norm, finite = train_step(self.engine, micro_batches, layout, args, parallel)
                if not finite:
                    self.stop_on_nonfinite(sums, grad_norm, sampler_before)
                    result.status = "nan"
                    break
                self.scheduler.step(increment=1)
                elapsed = time.perf_counter() - start
                self.iteration += 1
                self.consumed_tokens += self.tokens_per_iteration
                self.flops_so_far += self.flops_per_token * self.tokens_per_iteration
                self.train_seconds += elapsed
                self.last_loss = result.train_losses[self.iteration] = mean_loss(sums)
                interval.add(sums, elapsed, micro_batches, grad_norm)
                bar.update(1)
                iteration = self.iteration
                if iteration % args.log_interval == 0 or iteration == args.train_iters:
                    self.log(interval, bar, tqdm)
                    interval = Interval(len(layout.modalities))
                last = iteration == args.train_iters
                if iteration % args.save_interval == 0 and not last:
                    result.checkpoint = self.save(iteration)
                if iteration % args.eval_interval == 0 and not last:  # after the save: see finish()
                    self.evaluate_and_log(iteration, tqdm.write)
                if any_rank(self.stop.received, parallel):
                    result.status, result.signal, result.checkpoint = "signal", self.stop.signal, \
                        self.save(iteration)
                    if parallel.is_first:
                        tqdm.write(f"received {self.stop.signal}: saved iteration {iteration} to "
                                   f"{result.checkpoint}; run the same command again (or pass --load) "
                                   "to resume")
                    break
                if args.exit_interval and iteration % args.exit_interval == 0 and not last:
                    result.status, result.checkpoint = "exit-interval", self.save(iteration)
                    if parallel.is_first:
                        tqdm.write(f"--exit-interval {args.exit_interval}: saved iteration {iteration} "
                                   f"to {result.checkpoint} and stopped")
                    break
        finally:
            bar.close()
        result.iteration = self.iteration
        if result.status == "completed":
            self.finish(result)
        self.report_to_launcher(result.signal or self.stop.signal, result.checkpoint)
        self.writer.close()
        return result

    def report_to_launcher(self, signal_name: Optional[str], checkpoint: Optional[Path]):
        """Tells moma-torchrun (one report per node) what the run ended with."""
        if os.environ.get("LOCAL_RANK", "0") == "0":
            report_signal_stop(signal_name, self.iteration, str(checkpoint) if checkpoint else None)

    def log(self, interval: Interval, bar, tqdm):
        args, layout = self.args, self.layout
        values = interval.summary(layout.modalities, self.shares_target, self.tokens_per_iteration,
                                  self.flops_per_token, self.parallel.world)
        routing = over_stages(collect_routing_metrics(self.model), self.parallel)
        values.update(routing_summary(routing, interval.micro_batches, layout.modalities))
        values.update(routing)
        if args.aux_router_joint:
            values.update(aux_metrics(over_stages(aux_confusions(self.model), self.parallel),
                                      layout.modalities))
        values.update(lr=self.engine.optimizer.param_groups[0]["lr"], tokens=self.consumed_tokens,
                      flops=self.flops_so_far, sampler_violations=self.sampler.violations)
        self.writer.write("train", self.iteration, values)
        if self.parallel.is_first:
            bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
            tqdm.write(format_log_line(self.iteration, args, values, layout.modalities))

    def evaluate_and_log(self, iteration: int, write) -> Optional[Dict[str, float]]:
        values = evaluate(self.model, self.valid_set, self.args, self.layout, self.parallel,
                          stop=self.stop, autocast=self.engine.autocast)
        if values is None:  # a stop was requested during it
            return None
        self.writer.write("eval", iteration, dict(values, tokens=self.consumed_tokens,
                                                  flops=self.flops_so_far))
        if self.parallel.is_first:
            write(f"evaluation at iteration {iteration}: " + ", ".join(
                f"{m} loss {values[f'loss_{m}']:.4f} (ppl {values[f'ppl_{m}']:.2f})"
                for m in self.layout.modalities))
        return values

    def stop_on_nonfinite(self, sums, grad_norm, sampler_state):
        """Stops without saving the current weights (they may be diverging already): names the newest
        checkpoint before the failed step and records the data position of that step, so that the
        same command with a lower --lr continues from there past the data that diverged."""
        failed = self.iteration + 1
        losses = losses_from_sums(sums, self.layout.modalities)
        what = "gradient norm" if math.isfinite(losses["loss"]) else "loss"
        if not self.parallel.is_first:
            return
        candidates = resume.rollback_candidates(self.save_dir, failed) if self.save_dir else []
        lines = [f"{TOOL}: stopping: non-finite {what} at iteration {failed} (loss {losses['loss']}, "
                 + ", ".join(f"{m} {losses[f'loss_{m}']}" for m in self.layout.modalities)
                 + f", grad norm {grad_norm}). "
                 + ("DeepSpeed applied the step (it clips and steps in one call), and "
                    if self.engine.clips_itself else "The step was not applied, and ")
                 + "the weights since the last checkpoint were not saved: they may be diverging already."]
        if candidates:
            resume.record_nan_stop(self.save_dir, failed, sampler_state, candidates[0][0],
                                   args_for_checkpoint(self.args))
            listed = ", ".join(f"iteration {i}" + (f" (weight norm {norm:.4g})" if norm is not None else "")
                               for i, norm in candidates[:4])
            lines.append(
                f"Checkpoints before it in {self.save_dir}: {listed}. Run the same command with a lower "
                f"learning rate, e.g. --lr {self.args.lr / 2:g} {resume.OVERRIDE}: it resumes from "
                f"iteration {candidates[0][0]} and continues with the data of iteration {failed} "
                f"(recorded in {self.save_dir / resume.NAN_STOP}; delete it to replay the data since "
                f"then). If that checkpoint had diverged already, add --ckpt-step N for an older one.")
        else:
            lines.append("No checkpoint was saved before it"
                         + (f" in {self.save_dir}" if self.save_dir else " (--no-save)")
                         + ": start again with a lower --lr, a longer --lr-warmup-iters or a lower "
                         "--clip-grad" + (f" (or resume from --load {self.loaded_from} again)"
                                          if self.loaded_from else "") + ".")
        print("\n".join(lines), file=sys.stderr, flush=True)

    # -- after the last step ------------------------------------------------------------------------
    def finish(self, result: RunResult):
        """Saves first, then evaluates and plots; a stop request after the save skips the rest."""
        args, parallel, layout = self.args, self.parallel, self.layout
        result.checkpoint = self.save(self.iteration)

        def stopped() -> bool:
            if not any_rank(self.stop.received, parallel):
                return False
            result.status, result.signal = "signal", self.stop.signal
            self.say(f"received {self.stop.signal} after the last iteration: the final checkpoint "
                     f"(iteration {self.iteration}) is saved to {result.checkpoint}; skipped what was "
                     "left (evaluation, plot)")
            return True

        if stopped():
            return
        values = evaluate(self.model, self.valid_set, args, layout, parallel, stop=self.stop,
                          autocast=self.engine.autocast)
        if values is None:
            stopped()
            return
        result.eval = values
        if has_trained_aux_routers(self.model):
            causal = evaluate(self.model, self.valid_set, args, layout, parallel, routing_mode="causal",
                              stop=self.stop, autocast=self.engine.autocast)
            if causal is None:
                stopped()
                return
            result.eval.update({f"causal_{key}": value for key, value in causal.items()})
        self.writer.write("eval", self.iteration, dict(result.eval, tokens=self.consumed_tokens,
                                                       flops=self.flops_so_far))
        self.writer.flush()
        if stopped() or not parallel.is_first:  # every rank asks: a collective
            return
        plot = _plot(self.run_dir)
        print(f"done: {self.iteration} iterations, {self.consumed_tokens:,} tokens, "
              f"{self.flops_so_far / 1e12:.3f} TFLOP in {self.train_seconds:.1f} s of training", flush=True)
        print("held-out loss: " + ", ".join(
            f"{m} {result.eval[f'loss_{m}']:.4f} (ppl {result.eval[f'ppl_{m}']:.2f})"
            for m in layout.modalities) + f"; overall {result.eval['loss']:.4f}", flush=True)
        if "causal_loss" in result.eval:
            print("held-out loss, causal routing (aux routers): " + ", ".join(
                f"{m} {result.eval[f'causal_loss_{m}']:.4f}" for m in layout.modalities)
                + f"; overall {result.eval['causal_loss']:.4f}", flush=True)
        print(f"checkpoint: {result.checkpoint}\nmetrics: {self.writer.path}\nTensorBoard: "
              f"{args.tensorboard_dir or self.run_dir / 'tensorboard'}\nplot: {plot}", flush=True)


def over_stages(metrics: Dict, parallel: Parallel) -> Dict:
    """Per-layer ``metrics`` of every pipeline stage merged (a collective over the stages; layers
    are numbered over the whole model, so their keys do not collide)."""
    if parallel.pp == 1:
        return metrics
    parts = [None] * parallel.pp
    torch.distributed.all_gather_object(parts, metrics, group=parallel.pp_group)
    return {key: value for part in parts for key, value in part.items()}


def pretrain(argv: Optional[List[str]] = None, args: Optional[argparse.Namespace] = None) -> RunResult:
    """Runs the job described by ``argv`` (or parsed ``args``); see ``moma-pretrain --help``."""
    args = args or parse_args(argv)
    with ExitStack() as stack:
        # From the start: a SIGTERM during the set-up (a rendezvous, a long dataset build) stops the
        # job before its first step, with the newest checkpoint as it was.
        stop = stack.enter_context(StopRequest(TOOL, announce=os.environ.get("RANK", "0") == "0"))
        parallel = setup_parallel(args)
        num_micro = batch_sizes(args, parallel.dp)
        seed_everything(args.seed)
        run_dir, save_dir = run_directories(args)
        lock_directories(stack, [run_dir] + ([save_dir] if save_dir else []), parallel, TOOL,
                         checkpoints=save_dir)
        job = PretrainJob(args, parallel, run_dir, save_dir, num_micro, stop)
        job.prepare()
        if not job.resume():
            return RunResult("finished", job.iteration, run_dir, None)
        job.describe()
        if any_rank(stop.received, parallel):
            return job.stopped_before_training()
        result = job.run()
    result.signal = result.signal or stop.signal
    return result


def _plot(run_dir: Path) -> Optional[Path]:
    """Loss-vs-FLOPs plot of this run (``moma-compare`` draws several runs)."""
    try:
        from ..compare import load_run, plot_runs

        output = run_dir / "loss_vs_flops.png"
        plot_runs([load_run(run_dir)], output)
        return output
    except Exception as e:  # a plot must never cost the run
        warnings.warn(f"could not draw the loss plot: {e}")
        return None


def _main(argv: Optional[List[str]]):
    # Outside the run (its StopRequest replaces these meanwhile), a signal is only remembered: one that
    # comes while the process ends after its final save must not kill it with status 143.
    late = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: late.append(signal.Signals(number).name))
    try:
        result = pretrain(argv)
    except KeyboardInterrupt:
        print(f"{TOOL}: stopped by a second Ctrl-C without saving; the newest checkpoint (if any) is "
              "the last one saved before it", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if result.status == "nan":
        raise SystemExit(1)
    if result.signal == "SIGINT" or "SIGINT" in late:
        raise SystemExit(130)
    return result


def main(argv: Optional[List[str]] = None):
    run_tool(TOOL, _main, sys.argv[1:] if argv is None else argv)
