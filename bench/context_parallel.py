"""Time one nn.Mamba2 layer (forward + backward) on one sequence split across N processes
(context parallelism, gloo on CPU; NCCL on GPUs) against the whole sequence in one process.

    python bench/context_parallel.py --seqlen 32768 --nprocs 1 2 --threads 2 1
    python bench/context_parallel.py --device cuda --backend nccl --seqlen 1048576 --nprocs 1 2 4 8

``--threads`` gives torch's intra-op threads per process for each entry of ``--nprocs`` (on a
2-core machine: one process x 2 threads against two processes x 1 thread). Reports the median
step time over ``--repeats`` steps after one warm-up, the tokens per second, and the bytes each
rank sent through ``ssm_kernels.distributed`` per step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def step_times(layer, x, repeats, device):
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        layer(x).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return times


def worker(rank, nprocs, store, args, threads, out_dir):
    import ssm_kernels.distributed as cp
    from ssm_kernels.nn import Mamba2

    torch.set_num_threads(threads)
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank)
    group = None
    if nprocs > 1:
        dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=nprocs)
        group = dist.group.WORLD
    torch.manual_seed(0)
    layer = Mamba2(args.d_model, d_state=args.d_state, headdim=args.headdim, chunk_size=args.chunk_size,
                   context_parallel_group=group, device=device)
    local = args.seqlen // nprocs + (1 if rank < args.seqlen % nprocs else 0)
    x = torch.randn(args.batch, local, args.d_model, device=device, requires_grad=True)
    with cp.comm_stats() as stats:
        times = step_times(layer, x, args.repeats, device)
    if nprocs > 1:
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
        times = t.tolist()
    if rank == 0:
        sent = stats.sent // (args.repeats + 1)
        torch.save({"times": times, "sent": sent}, os.path.join(out_dir, "result.pt"))
    if nprocs > 1:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="intra-op threads per process, one per --nprocs entry (default: cores / nprocs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="gloo")
    args = p.parse_args(argv)
    threads = args.threads or [max(1, (os.cpu_count() or 1) // n) for n in args.nprocs]
    print(f"nn.Mamba2 d_model={args.d_model} d_state={args.d_state} headdim={args.headdim} batch={args.batch} "
          f"seqlen={args.seqlen}, forward + backward, {args.device}/{args.backend}")
    print("| processes | threads each | step (s, median) | tokens/s | bytes sent per rank per step |")
    print("|---|---|---|---|---|")
    for n, t in zip(args.nprocs, threads):
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(worker, args=(n, os.path.join(tmp, "store"), args, t, tmp), nprocs=n,
                               start_method="spawn")
            result = torch.load(os.path.join(tmp, "result.pt"))
        med = statistics.median(result["times"])
        print(f"| {n} | {t} | {med:.3f} | {args.batch * args.seqlen / med:,.0f} | {result['sent']:,} |", flush=True)


if __name__ == "__main__":
    main()
