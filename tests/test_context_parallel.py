"""Context parallelism (ssm_kernels.distributed) against the single-process ops, with 2, 3 and 4
processes over gloo: unequal pieces (one shorter than the conv width), shard orders, forward and
backward, run-to-run determinism, the bytes exchanged, errors raised on every rank."""
import os
import sys
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cp_workers  # noqa: E402

JOIN_TIMEOUT_S = 120
# Workers fork from a server that imported torch and ssm_kernels once (before any OpenMP use),
# which spares each process the ~2 s import of a plain spawn.
mp.set_forkserver_preload(["torch", "torch.distributed", "ssm_kernels.nn", "_cp_workers", "train_context_parallel"])


def spawn(body, world, *args):
    """Run _cp_workers.<body>(rank, world, *args) in `world` processes; return each rank's result.

    Fails (instead of hanging) when a process has not finished after JOIN_TIMEOUT_S.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_cp_workers.run, args=(world, store, tmp, body, args), nprocs=world,
                                 join=False, start_method="forkserver")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{body} with {world} processes did not finish in {JOIN_TIMEOUT_S} s (deadlock?)")
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}")) as f:
                results.append(f.read())
    failed = [f"rank {rank}: {text}" for rank, text in enumerate(results) if text.startswith("FAIL")]
    assert not failed, "\n".join(failed)
    return results


@pytest.mark.parametrize("world,lengths,order,dtypes,modules", [
    pytest.param(2, [21, 2], [0, 1], [torch.float32, torch.bfloat16], True, id="P2-L21,2"),
    pytest.param(3, [17, 1, 20], [2, 0, 1], [torch.float32, torch.float64], True, id="P3-L17,1,20-order2,0,1"),
    pytest.param(4, [3, 1, 22, 6], [1, 3, 0, 2], [torch.float32], True, id="P4-L3,1,22,6-order1,3,0,2"),
])
def test_context_parallel_equals_single_process(world, lengths, order, dtypes, modules):
    # With 2 processes also: torch.compile (aot_eager) of a context-parallel Mamba2, bytes sent.
    results = spawn("all_checks", world, lengths, order, dtypes, modules, world == 2)
    if world == 2:
        assert results[0] == results[1]  # both ranks sent the bytes the cost model predicts


def test_context_parallel_errors_raise_on_every_rank():
    spawn("error_checks", 2)


def test_context_parallel_inside_ddp_and_fsdp2_trains_like_one_process():
    spawn("ddp_checks", 4)


def test_train_context_parallel_example_matches_one_process():
    import train_context_parallel as example  # examples/ is on sys.path through _cp_workers

    result = example.main(["--steps", "4", "--seq-len", "40", "--batch-size", "2", "--d-model", "16",
                           "--n-layer", "1", "--log-every", "0"])
    assert len(result["parallel"]) == 4
    assert result["max_rel_diff"] <= 1e-4, result  # the float32 tolerance, step for step
