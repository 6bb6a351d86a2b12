"""Causal depthwise conv1d, the short conv of Mamba blocks (API.md: causal depthwise conv1d)."""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_device_supported,
    check_optional,
    check_same_dtype,
    check_tensor,
)

ACTIVATIONS = (None, "silu", "swish")
MIN_WIDTH, MAX_WIDTH = 2, 8


def _check_weight(weight, dim, device):
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if weight.shape[0] != dim:
        raise ValueError(f"weight: expected shape (dim={dim}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if not MIN_WIDTH <= width <= MAX_WIDTH:
        raise ValueError(f"weight: expected width in [{MIN_WIDTH}, {MAX_WIDTH}], got {width}")
    return width


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    seq_idx: Optional[torch.Tensor] = None,
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

    Returns:
        out [B, D, L] in x's dtype, or (out, final_states).

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape, device or width.

    Example:
        >>> x = torch.randn(2, 64, 100)
        >>> w = torch.randn(64, 4)
        >>> y = causal_conv1d(x, w, activation="silu")
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_device_supported("x", x)
    batch, dim, seqlen = x.shape
    if seqlen < 1:
        raise ValueError(f"x: expected seqlen >= 1, got {seqlen}")
    width = _check_weight(weight, dim, x.device)
    check_optional("bias", bias, shape=(dim,), dtypes=FLOAT_DTYPES, device=x.device)
    check_choice("activation", activation, ACTIVATIONS)
    check_optional("initial_states", initial_states, shape=(batch, dim, width - 1), device=x.device)
    if initial_states is not None:
        check_same_dtype("initial_states", initial_states, "x", x)
    check_optional("seq_idx", seq_idx, shape=(batch, seqlen), dtypes=(torch.int32,), device=x.device)
    out, final_states = torch.ops.ssm_kernels.causal_conv1d_fwd(
        x, weight, bias, initial_states, seq_idx, activation is not None
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
            >= B_state raises; on CUDA (where checking would need a host sync) it acts like -1.

    Returns:
        out with x's shape and dtype.

    Example:
        >>> state = torch.zeros(2, 64, 3)
        >>> y = causal_conv1d_update(torch.randn(2, 64), state, torch.randn(64, 4), activation="silu")
    """
    check_tensor("x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_device_supported("x", x)
    batch, dim = x.shape[0], x.shape[1]
    width = _check_weight(weight, dim, x.device)
    check_tensor("conv_state", conv_state, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
    if conv_state.shape[1] != dim or conv_state.shape[2] < width - 1:
        raise ValueError(
            f"conv_state: expected shape (batch, dim={dim}, state_len >= {width - 1}), got {tuple(conv_state.shape)}"
        )
    check_optional("bias", bias, shape=(dim,), dtypes=FLOAT_DTYPES, device=x.device)
    check_choice("activation", activation, ACTIVATIONS)
    if conv_state_indices is None:
        if conv_state.shape[0] != batch:
            raise ValueError(f"conv_state: expected batch {batch}, got {conv_state.shape[0]}")
    else:
        check_tensor("conv_state_indices", conv_state_indices, shape=(batch,), dtypes=(torch.int32,), device=x.device)
        if conv_state_indices.device.type == "cpu" and batch > 0:
            hi = int(conv_state_indices.max())
            if hi >= conv_state.shape[0]:
                raise ValueError(
                    f"conv_state_indices: expected values < conv_state batch {conv_state.shape[0]}, got {hi}"
                )
    return torch.ops.ssm_kernels.causal_conv1d_update(
        x, conv_state, weight, bias, conv_state_indices, activation is not None
    )


@torch.library.register_fake("ssm_kernels::causal_conv1d_fwd")
def _(x, weight, bias, initial_states, seq_idx, silu):
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    return x.new_empty((batch, dim, seqlen)), x.new_empty((batch, dim, width - 1))


@torch.library.register_fake("ssm_kernels::causal_conv1d_bwd")
def _(x, weight, bias, initial_states, seq_idx, dout, dfinal_states, silu):
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (
        x.new_empty((batch, dim, seqlen)),
        weight.new_empty((dim, width)),
        weight.new_empty((dim,), dtype=bias_dtype),
        x.new_empty((batch, dim, width - 1)),
    )


@torch.library.register_fake("ssm_kernels::causal_conv1d_update")
def _(x, conv_state, weight, bias, conv_state_indices, silu):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_states, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
    ctx.silu = silu


def _backward(ctx, dout, dfinal_states):
    x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
    dx, dweight, dbias, dinit = torch.ops.ssm_kernels.causal_conv1d_bwd(
        x, weight, bias, initial_states, seq_idx, dout, dfinal_states, ctx.silu
    )
    return (
        dx,
        dweight,
        dbias if bias is not None else None,
        dinit if initial_states is not None else None,
        None,
        None,
    )


torch.library.register_autograd("ssm_kernels::causal_conv1d_fwd", _backward, setup_context=_setup_context)
