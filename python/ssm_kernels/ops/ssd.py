"""Mamba-2 chunked SSD scan (API.md: Mamba-2: chunked SSD)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._checks import (
    FLOAT_DTYPES,
    check_device_supported,
    check_int,
    check_optional,
    check_same_dtype,
    check_tensor,
)

MIN_CHUNK, MAX_CHUNK = 16, 256
MAX_DSTATE, MAX_HEADDIM = 256, 256


def _check_dt_limit(dt_limit) -> tuple[float, float]:
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise TypeError(f"dt_limit: expected a (lo, hi) pair of floats, got {dt_limit!r}")
    lo, hi = dt_limit
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"dt_limit: expected a (lo, hi) pair of floats, got {dt_limit!r}")
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"dt_limit: expected lo <= hi, got ({lo}, {hi})")
    return lo, hi


def _check_seq_idx(seq_idx: torch.Tensor) -> None:
    # A data check: it reads the values (a host sync on CUDA), so it is skipped while tracing.
    if torch.compiler.is_compiling() or seq_idx.device.type == "meta" or seq_idx.shape[1] < 2:
        return
    if bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        bad = (seq_idx[:, 1:] < seq_idx[:, :-1]).nonzero()[0].tolist()
        raise ValueError(
            f"seq_idx: expected values non-decreasing along seqlen, got seq_idx[{bad[0]}, {bad[1]}] = "
            f"{int(seq_idx[bad[0], bad[1]])} > seq_idx[{bad[0]}, {bad[1] + 1}] = {int(seq_idx[bad[0], bad[1] + 1])}"
        )


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] = (0.0, float("inf")),
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
):
    """Mamba-2 SSD scan, computed chunk by chunk (the state-space-duality algorithm).

    Per (batch b, head h): dt_t = dt_t + dt_bias[h], softplus if dt_softplus, clamped to dt_limit
    (when it is not (0, inf));  H_t = exp(dt_t A[h]) H_{t-1} + dt_t outer(x_t, B_t)  (headdim x
    dstate);  y_t = H_t C_t + D x_t;  y_t *= silu(z_t) if z is given.  H_0 = initial_states (or 0);
    the state is reset to zero where seq_idx changes. The result depends on chunk_size only by
    rounding. Same semantics as mamba_ssm's mamba_chunk_scan_combined.

    Args:
        x: [B, L, H, P] float32/float16/bfloat16 (float64 accepted), any strides; P <= 256.
        dt: [B, L, H], x's dtype.
        A: [H] float (usually negative).
        B, C: [B, L, G, N], x's dtype; H % G == 0, head h uses group h // (H // G); N <= 256.
        chunk_size: a power of two in [16, 256].
        D: [H, P] or [H], float; z: [B, L, H, P] in x's dtype; dt_bias: [H] float.
        dt_softplus: apply softplus to dt (after dt_bias).
        dt_limit: (lo, hi) with lo <= hi.
        initial_states: [B, H, P, N] float32 (float64 with float64 inputs); differentiable.
        seq_idx: [B, L] int32, non-decreasing along L (packed variable-length sequences).
        return_final_states: also return H_L, [B, H, P, N] float32; gradients through it flow.

    Returns:
        y [B, L, H, P] in x's dtype, or (y, final_states).

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape, device or value
        (chunk_size not a power of two in range, groups not dividing nheads, dt_limit lo > hi,
        seq_idx decreasing). On CUDA the seq_idx order check reads the values (one host sync).

    Example:
        >>> x = torch.randn(1, 100, 4, 16); dt = torch.rand(1, 100, 4); A = -torch.rand(4)
        >>> B = torch.randn(1, 100, 1, 32); C = torch.randn(1, 100, 1, 32)
        >>> y = ssd_scan(x, dt, A, B, C, chunk_size=64, D=torch.ones(4))
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_device_supported("x", x)
    batch, seqlen, nheads, headdim = x.shape
    if seqlen < 1:
        raise ValueError(f"x: expected seqlen >= 1, got {seqlen}")
    if nheads < 1:
        raise ValueError(f"x: expected nheads >= 1, got {nheads}")
    if not 1 <= headdim <= MAX_HEADDIM:
        raise ValueError(f"x: expected 1 <= headdim <= {MAX_HEADDIM}, got {headdim}")
    check_tensor("dt", dt, shape=(batch, seqlen, nheads), device=x.device)
    check_same_dtype("dt", dt, "x", x)
    check_tensor("A", A, shape=(nheads,), dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("B", B, ndim=4, device=x.device)
    if B.shape[0] != batch or B.shape[1] != seqlen:
        raise ValueError(f"B: expected shape (batch={batch}, seqlen={seqlen}, groups, dstate), got {tuple(B.shape)}")
    groups, dstate = B.shape[2], B.shape[3]
    if groups < 1 or nheads % groups != 0:
        raise ValueError(f"B: expected groups dividing nheads={nheads}, got groups={groups}")
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"B: expected 1 <= dstate <= {MAX_DSTATE}, got {dstate}")
    check_same_dtype("B", B, "x", x)
    check_tensor("C", C, shape=(batch, seqlen, groups, dstate), device=x.device)
    check_same_dtype("C", C, "x", x)
    check_int("chunk_size", chunk_size, low=MIN_CHUNK, high=MAX_CHUNK)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], got {chunk_size}")
    if D is not None:
        check_tensor("D", D, ndim=(1, 2), dtypes=FLOAT_DTYPES, device=x.device)
        if tuple(D.shape) not in ((nheads,), (nheads, headdim)):
            raise ValueError(
                f"D: expected shape ({nheads},) or ({nheads}, {headdim}), got {tuple(D.shape)}"
            )
    check_optional("z", z, shape=(batch, seqlen, nheads, headdim), device=x.device)
    if z is not None:
        check_same_dtype("z", z, "x", x)
    check_optional("dt_bias", dt_bias, shape=(nheads,), dtypes=FLOAT_DTYPES, device=x.device)
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus: expected a bool, got {type(dt_softplus).__name__}")
    lo, hi = _check_dt_limit(dt_limit)
    check_optional("initial_states", initial_states, shape=(batch, nheads, headdim, dstate),
                   dtypes=FLOAT_DTYPES, device=x.device)
    check_optional("seq_idx", seq_idx, shape=(batch, seqlen), dtypes=(torch.int32,), device=x.device)
    if seq_idx is not None:
        _check_seq_idx(seq_idx)
    out, final_states = torch.ops.ssm_kernels.ssd_scan_fwd(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, lo, hi, initial_states, seq_idx
    )
    return (out, final_states) if return_final_states else out


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("ssm_kernels::ssd_scan_fwd")
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx):
    batch, seqlen, nheads, headdim = x.shape
    return x.new_empty(x.shape), x.new_empty((batch, nheads, headdim, B.shape[3]), dtype=_acc_dtype(x))


@torch.library.register_fake("ssm_kernels::ssd_scan_bwd")
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx,
      dout, dfinal_states):
    acc = _acc_dtype(x)
    return (
        x.new_empty(x.shape),
        x.new_empty(dt.shape, dtype=dt.dtype),
        x.new_empty(A.shape, dtype=A.dtype),
        x.new_empty(B.shape, dtype=B.dtype),
        x.new_empty(C.shape, dtype=C.dtype),
        x.new_empty(D.shape, dtype=D.dtype) if D is not None else x.new_empty((0,), dtype=acc),
        x.new_empty(x.shape) if z is not None else x.new_empty((0,)),
        x.new_empty(dt_bias.shape, dtype=dt_bias.dtype) if dt_bias is not None else x.new_empty((0,), dtype=acc),
        x.new_empty(initial_states.shape, dtype=initial_states.dtype)
        if initial_states is not None
        else x.new_empty((0,), dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    (x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx) = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    ctx.config = (chunk_size, dt_softplus, dt_min, dt_max)


def _backward(ctx, dout, dfinal_states):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max = ctx.config
    if dout is None:
        dout = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = torch.ops.ssm_kernels.ssd_scan_bwd(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx,
        dout, dfinal_states,
    )
    return (
        dx,
        ddt,
        dA,
        dB,
        dC,
        None,
        dD if D is not None else None,
        dz if z is not None else None,
        ddt_bias if dt_bias is not None else None,
        None,
        None,
        None,
        dinit if initial_states is not None else None,
        None,
    )


torch.library.register_autograd("ssm_kernels::ssd_scan_fwd", _backward, setup_context=_setup_context)
