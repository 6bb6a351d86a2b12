"""Context parallelism over packed sequences (seq_idx / cu_seqlens) against the single-process
packed ops, with 2 and 3 gloo processes: sequence boundaries inside pieces, a piece starting
exactly at a boundary, a sequence over three pieces, empty sequences, per-sequence initial and
final states, forward and backward, determinism, the modules, the bytes exchanged, and errors
raised on every rank."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_context_parallel import spawn  # noqa: E402


@pytest.mark.parametrize("world,lengths,order,cu_seqlens,other_row,dtypes", [
    # boundaries at 4 (with an empty sequence) and at 9 = the second piece's start (another empty
    # one there), inside the second piece at 16, an empty sequence at the end of the row; the
    # other row has a sequence over both pieces and two boundaries inside the second
    pytest.param(2, [9, 11], [0, 1], [0, 4, 4, 9, 9, 16, 20, 20], [0, 7, 11, 13, 20],
                 [torch.float32, torch.bfloat16], id="P2"),
    # sequence 1 covers pieces 0, 1 (shorter than the conv window, no boundary) and 2; the other
    # row starts a sequence exactly at piece 1, so piece 2's conv halo must stop inside piece 1
    pytest.param(3, [5, 2, 9], [2, 0, 1], [0, 2, 12, 12, 16], [0, 5, 8, 16], [torch.float32, torch.float64],
                 id="P3"),
])
def test_context_parallel_packed_equals_single_process(world, lengths, order, cu_seqlens, other_row, dtypes):
    spawn("_cp_packed_workers:op_checks", world, lengths, order, cu_seqlens, other_row, dtypes)


def test_context_parallel_packed_modules():
    spawn("_cp_packed_workers:module_checks", 2, [9, 11], [0, 4, 4, 9, 15, 20])
    spawn("_cp_packed_workers:comm_bytes_check", 2)
    # a sequence over three pieces, the middle one shorter than the conv window; an empty sequence
    spawn("_cp_packed_workers:module_states_checks", 3, [5, 2, 9], [0, 3, 12, 12, 16])


def test_context_parallel_packed_errors_raise_on_every_rank():
    results = spawn("_cp_packed_workers:error_checks", 2)
    assert results[0] == results[1]
