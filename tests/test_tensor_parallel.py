"""Tensor parallelism: two gloo processes at TP=2 give the logits, loss and gradients of the TP=1 model
built from the same weights."""

import os
import pickle
import time

import pytest
import torch
import torch.multiprocessing as torch_mp

from .conftest import free_port
from .helpers import random_batch, tiny_config, tiny_model

TP = 2


def shard(full: torch.Tensor, param: torch.nn.Parameter, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a TP=1 tensor, split as Megatron splits a master weight: pieces of
    size/stride along partition_dim, rank r taking pieces r, r+world, ... (SwiGLU fc1 has stride 2)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    pieces = torch.split(full, full.shape[dim] // (world * stride), dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def _rank_main(rank: int, port: int, execution: str, payload_path: str, result_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=TP)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    with open(payload_path, "rb") as f:
        payload = pickle.load(f)
    model = tiny_model(tiny_config(tensor_model_parallel_size=TP, moma_expert_execution=execution))
    params = dict(model.named_parameters())
    model.load_state_dict(
        {name: shard(full, params[name], rank, TP) if name in params else full
         for name, full in payload["state"].items()}
    )
    tokens, position_ids, modality_ids = payload["batch"]
    logits = model(tokens, position_ids, None, modality_ids=modality_ids)  # vocab-sharded
    pieces = [torch.empty_like(logits) for _ in range(TP)]
    torch.distributed.all_gather(pieces, logits.detach().contiguous())
    loss = model(tokens, position_ids, None, labels=tokens, modality_ids=modality_ids)
    (loss * payload["loss_weights"]).sum().backward()
    result = {
        "logits": torch.cat(pieces, dim=-1),
        "loss": loss.detach(),
        "grads": {n: p.grad for n, p in params.items()},
        "shards": {n: bool(getattr(p, "tensor_model_parallel", False)) for n, p in params.items()},
    }
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("execution", ["grouped", "loop"])
def test_tp2_matches_tp1(execution, tmp_path, megatron_single_process):
    model = tiny_model(tiny_config(moma_expert_execution=execution))
    batch = random_batch(2, 16)
    tokens, position_ids, modality_ids = batch
    loss_weights = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(5))
    logits = model(tokens, position_ids, None, modality_ids=modality_ids).detach()
    loss = model(tokens, position_ids, None, labels=tokens, modality_ids=modality_ids)
    (loss * loss_weights).sum().backward()
    with open(tmp_path / "payload.pkl", "wb") as f:
        pickle.dump({"state": model.state_dict(), "batch": batch, "loss_weights": loss_weights}, f)

    context = torch_mp.spawn(
        _rank_main, args=(free_port(), execution, str(tmp_path / "payload.pkl"), str(tmp_path)),
        nprocs=TP, join=False,
    )
    # join() raises if a rank failed and returns False while any rank still runs.
    deadline = time.monotonic() + 180
    while not context.join(timeout=max(deadline - time.monotonic(), 1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("TP=2 ranks did not finish within 180 s")
    params = dict(model.named_parameters())
    for rank in range(TP):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        assert any(result["shards"].values())  # the experts and attention really were split
        for name, grad in result["grads"].items():
            expected = shard(params[name].grad, params[name], rank, TP) \
                if result["shards"][name] else params[name].grad
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5, msg=name)
