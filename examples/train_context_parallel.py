"""Train a tiny Mamba-2 language model with context parallelism: each of N CPU processes (gloo)
holds one piece of every sequence, and the loss curve equals a single-process run step for step.

    python examples/train_context_parallel.py                 # 2 processes, 60 steps, loss 2.77 -> ~0.5
    python examples/train_context_parallel.py --nprocs 4 --seq-len 256

The task: each sequence repeats a random motif of --period tokens, so after the first period every
next token is the token --period steps back; near a piece's start that token lies in the previous
rank's piece (the conv halo and the SSM state carry it across). Every rank builds the same batch from a seed and
keeps its piece; a rank's loss is its share of the mean over all tokens, and the parameter
gradients are summed over the group (ssm_kernels.distributed.all_reduce_gradients).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from ssm_kernels import distributed as cp
from ssm_kernels.nn import Mamba2


class TinyLM(nn.Module):
    """Embedding -> n_layer pre-norm residual Mamba2 blocks -> RMSNorm -> tied head."""

    def __init__(self, vocab: int, d_model: int, n_layer: int, group=None):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layer))
        self.mixers = nn.ModuleList(
            Mamba2(d_model, d_state=16, headdim=16, chunk_size=32, context_parallel_group=group)
            for _ in range(n_layer))
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)  # [B, L, D]
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.head(self.norm_f(x))  # [B, L, V]


def batch(step: int, args) -> torch.Tensor:
    """[B, seq_len + 1] tokens: a random motif of `period` tokens repeated (same on every rank)."""
    gen = torch.Generator().manual_seed(1000 + step)
    motif = torch.randint(0, args.vocab, (args.batch_size, args.period), generator=gen)
    reps = -(-(args.seq_len + 1) // args.period)
    return motif.repeat(1, reps)[:, :args.seq_len + 1]


def pieces(seq_len: int, nprocs: int) -> list[int]:
    """Start of each rank's piece (unequal when seq_len does not divide) and the end."""
    return [seq_len * r // nprocs for r in range(nprocs + 1)]


def train(args, group=None, rank: int = 0, nprocs: int = 1) -> list[float]:
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.d_model, args.n_layer, group)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    bounds = pieces(args.seq_len, nprocs)
    lo, hi = bounds[rank], bounds[rank + 1]
    losses = []
    for step in range(args.steps):
        ids = batch(step, args)
        logits = model(ids[:, lo:hi])
        # this piece's share of the mean next-token loss over the whole sequence
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, lo + 1:hi + 1].flatten(), reduction="sum")
        loss = loss / (args.batch_size * args.seq_len)
        opt.zero_grad()
        loss.backward()
        total = loss.detach().clone()
        if group is not None:
            cp.all_reduce_gradients(model, group)
            dist.all_reduce(total, group=group)
        opt.step()
        losses.append(total.item())
        if rank == 0 and args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"{'cp' if group is not None else 'single'} step {step:3d}  loss {total.item():.4f}", flush=True)
    return losses


def worker(rank: int, nprocs: int, store: str, args, out_dir: str) -> None:
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=nprocs)
    losses = train(args, dist.group.WORLD, rank, nprocs)
    if rank == 0:
        torch.save(losses, os.path.join(out_dir, "losses.pt"))
    dist.destroy_process_group()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--period", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(max(1, args.threads))
    single = train(args)
    with tempfile.TemporaryDirectory() as tmp:
        # forkserver: the processes fork from one server that imported torch, not from this
        # (possibly multi-threaded) process, and skip a fresh interpreter's imports.
        mp.set_forkserver_preload(["torch", "ssm_kernels.nn"])
        mp.start_processes(worker, args=(args.nprocs, os.path.join(tmp, "store"), args, tmp),
                           nprocs=args.nprocs, start_method="forkserver")
        parallel = torch.load(os.path.join(tmp, "losses.pt"))
    diff = max(abs(a - b) / abs(b) for a, b in zip(parallel, single))
    print(f"{args.nprocs} processes vs 1: max relative loss difference over {args.steps} steps {diff:.2e}; "
          f"loss {single[0]:.3f} -> {single[-1]:.3f}")
    return {"single": single, "parallel": parallel, "max_rel_diff": diff}


if __name__ == "__main__":
    main()
