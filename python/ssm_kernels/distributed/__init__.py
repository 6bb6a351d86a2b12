"""Context parallelism over torch.distributed: each rank of a process group holds one piece of the
sequence; the ops below return this rank's piece of the output, exactly the single-process result.

Per call the ranks exchange small summaries (scans: a decay and a state per rank; convolutions: a
halo of inputs), never whole activations (except fftconv's halo of up to K-1 steps); see
docs/context_parallel.md for the algorithms, the communication and compute costs, and API.md.
"""
import functools

from . import _ops
from ._comm import CommStats, check_pieces, comm_stats
from ._grads import all_reduce_gradients
from ._ops import causal_conv1d, fftconv, linear_scan, selective_scan, ssd_scan

__all__ = ["causal_conv1d", "fftconv", "linear_scan", "selective_scan", "ssd_scan", "all_reduce_gradients",
           "context_parallel_ops", "check_pieces", "comm_stats", "CommStats"]


def context_parallel_ops(process_group, *names: str) -> tuple:
    """The context-parallel ops ``names`` bound to ``process_group`` (shard order = rank order),
    for modules that take ``context_parallel_group=``.

    Example:
        >>> conv1d, ssd_scan = context_parallel_ops(group, "causal_conv1d", "ssd_scan")
    """
    return tuple(functools.partial(getattr(_ops, name), process_group=process_group) for name in names)
