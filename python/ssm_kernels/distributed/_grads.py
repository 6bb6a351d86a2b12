"""Gradient reduction over a context-parallel group."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_gradients(module: torch.nn.Module, process_group) -> None:
    """Sum the parameter gradients of ``module`` over the context-parallel group, in place.

    The ranks of a context-parallel group hold different pieces of the same sequences, so each
    computes only its pieces' share of a parameter's gradient: with each rank's loss normalised by
    the global token count, the full gradient is their sum. Call it after ``backward()`` (and
    after DDP or FSDP2 has reduced over the data-parallel group), before the optimizer step. The
    gradients are flattened into one buffer per dtype and device, so this is one all-reduce per
    dtype; every rank must hold gradients for the same parameters (as they do when every rank ran
    the same layers).
    """
    buckets: dict = {}
    for p in module.parameters():
        if p.grad is not None:
            # FSDP2 gradients are DTensors sharded over the data-parallel dimension: the ranks of a
            # context-parallel group sit at the same data-parallel coordinate, so they hold the
            # same shard and the local shards are summed.
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            buckets.setdefault((grad.dtype, grad.device), []).append(grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=process_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
