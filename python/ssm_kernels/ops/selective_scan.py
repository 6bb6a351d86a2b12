"""Mamba-1 selective scan and its decode step (API.md: Mamba-1: selective scan)."""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import (
    COMPLEX_DTYPES,
    FLOAT_DTYPES,
    check_device_supported,
    check_optional,
    check_same_dtype,
    check_tensor,
)

# Steps between two saved states of the forward (csrc/selective_scan/selective_scan_math.h).
CHUNK_SIZE = 2048
MAX_DSTATE = 256
_A_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _state_dtype(u: torch.Tensor, is_complex: bool) -> torch.dtype:
    wide = u.dtype == torch.float64
    if is_complex:
        return torch.complex128 if wide else torch.complex64
    return torch.float64 if wide else torch.float32


def _check_bc(name: str, t, u: torch.Tensor, A: torch.Tensor) -> None:
    check_tensor(name, t, ndim=(2, 3, 4), device=u.device)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    if t.dim() == 2:
        if tuple(t.shape) != (dim, dstate):
            raise ValueError(f"{name}: expected fixed shape (dim={dim}, dstate={dstate}), got {tuple(t.shape)}")
        want = COMPLEX_DTYPES if A.is_complex() else FLOAT_DTYPES
        if t.dtype not in want:
            kind = "complex" if A.is_complex() else "real"
            raise TypeError(f"{name}: expected a {kind} dtype like A ({_dt(A.dtype)}), got {_dt(t.dtype)}")
        return
    if t.dim() == 3 and tuple(t.shape) != (batch, dstate, seqlen):
        raise ValueError(
            f"{name}: expected variable shape (batch={batch}, dstate={dstate}, seqlen={seqlen}), got {tuple(t.shape)}"
        )
    if t.dim() == 4:
        if t.shape[0] != batch or t.shape[2] != dstate or t.shape[3] != seqlen or t.shape[1] < 1:
            raise ValueError(
                f"{name}: expected grouped shape (batch={batch}, groups, dstate={dstate}, seqlen={seqlen}), "
                f"got {tuple(t.shape)}"
            )
        if dim % t.shape[1] != 0:
            raise ValueError(f"{name}: expected groups dividing dim={dim}, got groups={t.shape[1]}")
    if A.is_complex():
        if t.dtype != A.dtype:
            raise TypeError(f"{name}: expected dtype {_dt(A.dtype)} (variable B/C are complex like A), got {_dt(t.dtype)}")
    elif t.dtype != u.dtype:
        what = "a real dtype with real A" if t.is_complex() else f"the dtype of u ({_dt(u.dtype)})"
        raise TypeError(f"{name}: expected {what}, got {_dt(t.dtype)}")


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    check_tensor("u", u, ndim=3, dtypes=FLOAT_DTYPES)
    check_device_supported("u", u)
    batch, dim, seqlen = u.shape
    if seqlen < 1:
        raise ValueError(f"u: expected seqlen >= 1, got {seqlen}")
    check_tensor("delta", delta, shape=tuple(u.shape), device=u.device)
    check_same_dtype("delta", delta, "u", u)
    check_tensor("A", A, ndim=2, dtypes=_A_DTYPES, device=u.device)
    if A.shape[0] != dim:
        raise ValueError(f"A: expected shape (dim={dim}, dstate), got {tuple(A.shape)}")
    dstate = A.shape[1]
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"A: expected dstate in [1, {MAX_DSTATE}], got {dstate}")
    _check_bc("B", B, u, A)
    _check_bc("C", C, u, A)
    check_optional("D", D, shape=(dim,), dtypes=FLOAT_DTYPES, device=u.device)
    check_optional("delta_bias", delta_bias, shape=(dim,), dtypes=FLOAT_DTYPES, device=u.device)
    check_optional("z", z, shape=tuple(u.shape), device=u.device)
    if z is not None:
        check_same_dtype("z", z, "u", u)
    state_dtypes = COMPLEX_DTYPES if A.is_complex() else FLOAT_DTYPES
    check_optional("initial_state", initial_state, shape=(batch, dim, dstate), dtypes=state_dtypes, device=u.device)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    initial_state: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
):
    """Mamba-1 selective scan (differentiable in every tensor argument).

    Per (b, d, n): dt_t = softplus?(delta_t + delta_bias); h_t = exp(dt_t A[d, n]) h_{t-1} +
    dt_t B_t[n] u_t with h_{-1} = initial_state (zeros if None); y_t = sum_n C_t[n] h_t[n]
    (2 Re(...) for complex A); out_t = (y_t + D[d] u_t) * silu(z_t).

    Args:
        u, delta: [B, D, L] float32/float16/bfloat16 (float64 accepted), same dtype, any strides.
        A: [D, N] float32 or complex64, 1 <= N <= 256.
        B, C: each fixed [D, N] (A's dtype), variable [B, N, L] or grouped [B, G, N, L] (u's dtype;
            complex64 when A is complex) with G dividing D; channel d uses group d // (D // G).
        D, delta_bias: [D] or None.  z: [B, D, L] like u, or None.
        delta_softplus: apply softplus to delta + delta_bias.
        initial_state: [B, D, N] float32 (complex64 for complex A), or None.
        return_last_state: also return h_L, [B, D, N] float32/complex64. Its gradient is
            propagated.

    Returns:
        out [B, D, L] in u's dtype, or (out, last_state).

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape, device, groups not
        dividing dim, dstate above 256 or complex B/C with real A.

    Example:
        >>> u, delta = torch.randn(2, 64, 100), torch.rand(2, 64, 100)
        >>> A = -torch.rand(64, 16)
        >>> B, C = torch.randn(2, 16, 100), torch.randn(2, 16, 100)
        >>> out = selective_scan(u, delta, A, B, C, delta_softplus=True)
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out, last_state, _ = torch.ops.ssm_kernels.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state
    )
    return (out, last_state) if return_last_state else out


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One selective-scan decode step; updates ``state`` in place (not differentiable).

    h = exp(dt A) h + dt B x;  out = (sum_n C h + D x) * silu(z), with dt = softplus?(dt + dt_bias).

    Layouts:
        no heads: state [B_state, D, N]; x, dt, z [B, D]; A [D, N]; B, C [B, N]; D, dt_bias [D].
        heads:    state [B_state, H, P, N]; x, dt, z [B, H, P]; A [H, P, N]; B, C [B, G, N] with G
                  dividing H (head h uses group h // (H // G)); D, dt_bias [H, P].
    x, dt, z are float32/float16/bfloat16 (same dtype); state is float32 (float64 for float64 x).
    state_batch_indices: [B] int32/int64: row i updates state[state_batch_indices[i]]; a negative
    index leaves the state untouched and outputs zeros. On CPU an index >= B_state raises; on
    CUDA (where checking would need a host sync) it acts like a negative one.

    Returns:
        out, shaped like x, in x's dtype.

    Raises:
        TypeError/ValueError naming the argument for a wrong shape, dtype or device.

    Example:
        >>> state = torch.zeros(2, 64, 16)
        >>> out = selective_state_update(state, torch.randn(2, 64), torch.rand(2, 64),
        ...                              -torch.rand(64, 16), torch.randn(2, 16), torch.randn(2, 16))
    """
    check_tensor("x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_device_supported("x", x)
    heads = x.dim() == 3
    check_tensor("state", state, ndim=x.dim() + 1, device=x.device)
    want_state = torch.float64 if x.dtype == torch.float64 else torch.float32
    if state.dtype != want_state:
        raise TypeError(f"state: expected dtype {_dt(want_state)}, got {_dt(state.dtype)}")
    batch = x.shape[0]
    inner = tuple(x.shape[1:])
    dstate = state.shape[-1]
    if tuple(state.shape[1:-1]) != inner:
        raise ValueError(f"state: expected shape (batch, {', '.join(map(str, inner))}, dstate), got {tuple(state.shape)}")
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"state: expected dstate in [1, {MAX_DSTATE}], got {dstate}")
    check_tensor("dt", dt, shape=tuple(x.shape), device=x.device)
    check_same_dtype("dt", dt, "x", x)
    check_tensor("A", A, shape=inner + (dstate,), dtypes=FLOAT_DTYPES, device=x.device)
    for name, t in (("B", B), ("C", C)):
        if heads:
            check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
            if t.shape[0] != batch or t.shape[2] != dstate or x.shape[1] % t.shape[1] != 0:
                raise ValueError(
                    f"{name}: expected shape (batch={batch}, groups dividing nheads={x.shape[1]}, "
                    f"dstate={dstate}), got {tuple(t.shape)}"
                )
        else:
            check_tensor(name, t, shape=(batch, dstate), dtypes=FLOAT_DTYPES, device=x.device)
    if heads and B.shape[1] != C.shape[1]:
        raise ValueError(f"C: expected the groups of B ({B.shape[1]}), got {C.shape[1]}")
    check_optional("D", D, shape=inner, dtypes=FLOAT_DTYPES, device=x.device)
    check_optional("dt_bias", dt_bias, shape=inner, dtypes=FLOAT_DTYPES, device=x.device)
    check_optional("z", z, shape=tuple(x.shape), device=x.device)
    if z is not None:
        check_same_dtype("z", z, "x", x)
    if state_batch_indices is None:
        if state.shape[0] != batch:
            raise ValueError(f"state: expected batch {batch}, got {state.shape[0]}")
    else:
        check_tensor("state_batch_indices", state_batch_indices, shape=(batch,),
                     dtypes=(torch.int32, torch.int64), device=x.device)
        # Checked eagerly on the CPU (no sync cost); under torch.compile the C++ kernel checks.
        if state_batch_indices.device.type == "cpu" and batch > 0 and not torch.compiler.is_compiling():
            hi = int(state_batch_indices.max())
            if hi >= state.shape[0]:
                raise ValueError(f"state_batch_indices: expected values < state batch {state.shape[0]}, got {hi}")
    return torch.ops.ssm_kernels.selective_state_update(
        state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), state_batch_indices
    )


@torch.library.register_fake("ssm_kernels::selective_scan_fwd")
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_chunks = (seqlen + CHUNK_SIZE - 1) // CHUNK_SIZE
    sd = _state_dtype(u, A.is_complex())
    return (
        u.new_empty((batch, dim, seqlen)),
        u.new_empty((batch, dim, dstate), dtype=sd),
        u.new_empty((batch, dim, n_chunks, dstate), dtype=sd),
    )


@torch.library.register_fake("ssm_kernels::selective_scan_bwd")
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, checkpoints, dout, dlast_state):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    init_dtype = initial_state.dtype if initial_state is not None else _state_dtype(u, A.is_complex())
    return (
        u.new_empty(u.shape),
        u.new_empty(u.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        u.new_empty((dim,), dtype=D.dtype if D is not None else acc),
        u.new_empty(u.shape) if z is not None else u.new_empty((0,)),
        u.new_empty((dim,), dtype=delta_bias.dtype if delta_bias is not None else acc),
        u.new_empty((batch, dim, dstate), dtype=init_dtype),
    )


@torch.library.register_fake("ssm_kernels::selective_state_update")
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state = inputs
    checkpoints = output[2]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast_state, dcheckpoints):
    u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = torch.ops.ssm_kernels.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, checkpoints, dout, dlast_state
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        ddelta_bias if delta_bias is not None else None,
        None,
        dinit if initial_state is not None else None,
    )


torch.library.register_autograd("ssm_kernels::selective_scan_fwd", _backward, setup_context=_setup_context)
