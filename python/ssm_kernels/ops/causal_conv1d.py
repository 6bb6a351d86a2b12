"""Causal depthwise conv1d, the short conv of Mamba blocks (API.md: causal depthwise conv1d)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _op

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    seq_idx: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Causal depthwise 1D convolution with optional SiLU.

    out[b, d, t] = act(bias[d] + sum_{k<W} weight[d, k] * x[b, d, t - W + 1 + k])

    Args:
        x: [B, D, L] float32/float16/bfloat16 (float64 accepted), any strides (channel-last too).
        weight: [D, W] with 2 <= W <= 8, any float dtype (may differ from x).
        bias: [D] or None.
        activation: None, "silu" or "swish".
        initial_states: [B, D, W-1] in x's dtype: the W-1 inputs before position 0 (zeros if None).
        return_final_states: also return the last W-1 inputs, [B, D, W-1], to continue the
            sequence later (with seq_idx, entries from another sequence than the last are zero).
        seq_idx: [B, L] int32; taps never cross a change of sequence, and initial_states feed
            only the first sequence of each row.
        cu_seqlens: [num_seqs + 1] int32/int64 offsets of packed sequences in the one row
            (batch 1); taps never cross a sequence start. initial_states is then
            [num_seqs, D, W-1] (the W-1 inputs before each sequence), and final_states
            [num_seqs, D, W-1]: each sequence's last W-1 inputs, its initial state (or zeros)
            filling in for a sequence shorter than W-1. Not together with seq_idx.

    Returns:
        out [B, D, L] in x's dtype, or (out, final_states).

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape, device or width,
        and for cu_seqlens not starting at 0, decreasing, not ending at seqlen, batch > 1 with
        cu_seqlens, or both cu_seqlens and seq_idx.

    Example:
        >>> x = torch.randn(2, 64, 100)
        >>> w = torch.randn(64, 4)
        >>> y = causal_conv1d(x, w, activation="silu")
    """
    _op.check_choice("activation", activation, ACTIVATIONS)
    out, final_states = _op.call(
        "causal_conv1d_fwd", x=x, weight=weight, bias=bias, initial_states=initial_states, seq_idx=seq_idx,
        silu=activation is not None, cu_seqlens=cu_seqlens,
    )
    return (out, final_states) if return_final_states else out


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode step(s) of the causal conv; updates ``conv_state`` in place (not differentiable).

    For each of the L new inputs: shift conv_state left by one, append the input, and output
    act(bias + sum_k weight[:, k] * conv_state[..., S - W + 1 + k]).

    Args:
        x: [B, D] or [B, D, L].
        conv_state: [B_state, D, S] with S >= W-1, any float dtype (updated in place).
        weight: [D, W]; bias: [D] or None; activation: None, "silu" or "swish".
        conv_state_indices: [B] int32: row i updates conv_state[conv_state_indices[i]]; a
            negative index leaves the state alone and outputs zeros for that row. On CPU an index
            >= B_state raises ValueError; on CUDA the indices are never read on the host (that
            would synchronise), and the kernel treats an index >= B_state like a negative one:
            conv_state is neither read nor written for that row and its output is zeros.

    Returns:
        out with x's shape and dtype.

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape, device or width.

    Example:
        >>> state = torch.zeros(2, 64, 3)
        >>> y = causal_conv1d_update(torch.randn(2, 64), state, torch.randn(64, 4), activation="silu")
    """
    _op.check_choice("activation", activation, ACTIVATIONS)
    return _op.call(
        "causal_conv1d_update", x=x, conv_state=conv_state, weight=weight, bias=bias,
        conv_state_indices=conv_state_indices, silu=activation is not None,
    )


@_op.fake("causal_conv1d_fwd")
def _(x, weight, cu_seqlens):
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    states = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return x.new_empty((batch, dim, seqlen)), x.new_empty((states, dim, width - 1))


@_op.fake("causal_conv1d_update")
def _(x):
    return x.new_empty(x.shape)


_op.register("causal_conv1d_fwd", "causal_conv1d_bwd")
