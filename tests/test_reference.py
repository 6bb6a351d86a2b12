"""The float64 references against independent math (closed forms, FFTs, other references)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssm_kernels import reference

f64 = torch.float64
c128 = torch.complex128
TOL = 1e-10


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = rel_err(a, b)
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=f64):
    return torch.randn(*shape, generator=g, dtype=dtype)


def rand(g, *shape, dtype=f64):
    return torch.rand(*shape, generator=g, dtype=dtype)


def softplus_inverse(t):
    return t + torch.log(-torch.expm1(-t))


def selective_scan_closed_form(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0):
    """h_t = sum_{s<=t} exp(A * sum_{r=s+1..t} dt_r) dt_s B_s u_s + exp(A * sum_{r<=t} dt_r) h0."""
    batch, dim, seqlen = u.shape
    is_complex = A.is_complex()
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = torch.log1p(torch.exp(dt))

    def per_step(t):  # -> [B, D, N, L]
        if t.ndim == 2:
            return t[None, :, :, None].expand(batch, dim, t.shape[1], seqlen)
        if t.ndim == 3:
            return t[:, None].expand(batch, dim, *t.shape[1:])
        return t.repeat_interleave(dim // t.shape[1], dim=1)

    Bs, Cs = per_step(B), per_step(C)
    cum = torch.cumsum(dt, dim=-1)  # [B, D, L]
    seg = cum[..., :, None] - cum[..., None, :]  # [B, D, L(t), L(s)]
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    expo = A[None, :, :, None, None] * torch.where(mask, seg, torch.zeros_like(seg))[:, :, None]
    decay = torch.exp(expo) * mask  # [B, D, N, L, L]
    drive = (dt * u)[:, :, None, :] * Bs  # [B, D, N, L]
    h = (decay * drive[:, :, :, None, :]).sum(-1)  # [B, D, N, L]
    if h0 is not None:
        h = h + torch.exp(A[None, :, :, None] * cum[:, :, None, :]) * h0[..., None]
    y = (Cs * h).sum(2)
    if is_complex:
        y = 2 * y.real
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, h[..., -1]


def make_bc(g, kind, batch, dim, dstate, seqlen, groups, is_complex):
    dtype = c128 if is_complex else f64
    if kind == "fixB":
        return randn(g, dim, dstate, dtype=dtype)
    if kind == "varB":
        return randn(g, batch, dstate, seqlen, dtype=dtype)
    return randn(g, batch, groups, dstate, seqlen, dtype=dtype)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "D-z-bias-softplus-h0"])
@pytest.mark.parametrize("c_kind", ["fixC", "varC", "grpC"])
@pytest.mark.parametrize("b_kind", ["fixB", "varB", "grpB"])
@pytest.mark.parametrize("is_complex", [False, True], ids=["realA", "complexA"])
def test_selective_scan_closed_form(is_complex, b_kind, c_kind, extras):
    g = gen(0)
    batch, dim, dstate, seqlen, groups = 2, 4, 3, 9, 2
    u = randn(g, batch, dim, seqlen)
    delta = rand(g, batch, dim, seqlen) * 0.5
    A = -rand(g, dim, dstate) - 0.1
    if is_complex:
        A = torch.complex(A, randn(g, dim, dstate) * 3)
    B = make_bc(g, b_kind, batch, dim, dstate, seqlen, groups, is_complex)
    C = make_bc(g, c_kind.replace("C", "B"), batch, dim, dstate, seqlen, groups, is_complex)
    D = z = delta_bias = h0 = None
    if extras:
        D, z, delta_bias = randn(g, dim), randn(g, batch, dim, seqlen), randn(g, dim) * 0.3
        h0 = randn(g, batch, dim, dstate, dtype=c128 if is_complex else f64)
    out, last = reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, extras, h0,
                                         return_last_state=True)
    want_out, want_last = selective_scan_closed_form(u, delta, A, B, C, D, z, delta_bias, extras,
                                                     h0)
    assert out.dtype == f64
    assert last.dtype == (c128 if is_complex else f64)
    assert_close(out, want_out)
    assert_close(last, want_last)
    assert_close(reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, extras, h0),
                 want_out)


def test_selective_scan_float32_inputs_compute_in_float64():
    g = gen(1)
    u, delta = randn(g, 1, 2, 5), rand(g, 1, 2, 5)
    A, B, C = -rand(g, 2, 3), randn(g, 2, 3), randn(g, 2, 3)
    out32 = reference.selective_scan(u.float(), delta.float(), A.float(), B.float(), C.float())
    out64 = reference.selective_scan(u.float().double(), delta.float().double(),
                                     A.float().double(), B.float().double(), C.float().double())
    assert out32.dtype == f64
    assert torch.equal(out32, out64)


def ssd_inputs(g, batch=2, seqlen=11, nheads=4, headdim=3, groups=2, dstate=5):
    x = randn(g, batch, seqlen, nheads, headdim)
    dt = rand(g, batch, seqlen, nheads) * 0.5 + 0.05
    A = -rand(g, nheads) - 0.2
    B = randn(g, batch, seqlen, groups, dstate)
    C = randn(g, batch, seqlen, groups, dstate)
    return x, dt, A, B, C


def ssd_via_selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           initial_states=None, dt_limit=None):
    """ssd_scan as a selective scan with channels = heads x headdim and A broadcast over N."""
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    dim = nheads * headdim

    def to_channels(t):  # [B, L, H, P] -> [B, H*P, L]
        return t.permute(0, 2, 3, 1).reshape(batch, dim, seqlen)

    delta = dt.permute(0, 2, 1).repeat_interleave(headdim, dim=1)  # [B, H*P, L]
    delta_bias = None if dt_bias is None else dt_bias.repeat_interleave(headdim)
    if dt_limit is not None:
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]
            delta_bias = None
        if dt_softplus:
            delta = F.softplus(delta)
            dt_softplus = False
        delta = delta.clamp(*dt_limit)
    A_ss = A.repeat_interleave(headdim)[:, None].expand(dim, dstate)
    B_ss = B.permute(0, 2, 3, 1)  # [B, G, N, L]
    C_ss = C.permute(0, 2, 3, 1)
    D_ss = None
    if D is not None:
        D_ss = D.reshape(dim) if D.ndim == 2 else D.repeat_interleave(headdim)
    h0 = None if initial_states is None else initial_states.reshape(batch, dim, dstate)
    out, last = reference.selective_scan(
        to_channels(x), delta, A_ss, B_ss, C_ss, D_ss, None if z is None else to_channels(z),
        delta_bias, dt_softplus, h0, return_last_state=True)
    out = out.reshape(batch, nheads, headdim, seqlen).permute(0, 3, 1, 2)
    return out, last.reshape(batch, nheads, headdim, dstate)


SSD_EXTRAS = {
    "plain": {},
    "D_HP": {"D": True},
    "D_H": {"D": "H"},
    "z": {"z": True},
    "bias-softplus": {"dt_bias": True, "dt_softplus": True},
    "h0": {"initial_states": True},
    "all": {"D": True, "z": True, "dt_bias": True, "dt_softplus": True, "initial_states": True},
}


@pytest.mark.parametrize("extras", list(SSD_EXTRAS.values()), ids=list(SSD_EXTRAS))
def test_ssd_scan_equals_selective_scan(extras):
    g = gen(2)
    x, dt, A, B, C = ssd_inputs(g)
    batch, seqlen, nheads, headdim = x.shape
    kwargs = {}
    if extras.get("D") is True:
        kwargs["D"] = randn(g, nheads, headdim)
    elif extras.get("D") == "H":
        kwargs["D"] = randn(g, nheads)
    if extras.get("z"):
        kwargs["z"] = randn(g, *x.shape)
    if extras.get("dt_bias"):
        kwargs["dt_bias"] = randn(g, nheads) * 0.5
    if extras.get("dt_softplus"):
        kwargs["dt_softplus"] = True
    if extras.get("initial_states"):
        kwargs["initial_states"] = randn(g, batch, nheads, headdim, B.shape[-1])
    y, final = reference.ssd_scan(x, dt, A, B, C, return_final_states=True, **kwargs)
    want_y, want_final = ssd_via_selective_scan(x, dt, A, B, C, **kwargs)
    assert y.dtype == f64 and final.dtype == f64
    assert_close(y, want_y)
    assert_close(final, want_final)
    assert_close(reference.ssd_scan(x, dt, A, B, C, **kwargs), want_y)


@pytest.mark.parametrize("softplus", [False, True], ids=["raw", "softplus"])
def test_ssd_scan_dt_limit(softplus):
    g = gen(3)
    x, dt, A, B, C = ssd_inputs(g)
    dt_bias = randn(g, x.shape[2]) * 0.5
    limit = (0.2, 0.6)
    y = reference.ssd_scan(x, dt, A, B, C, dt_bias=dt_bias, dt_softplus=softplus, dt_limit=limit)
    want, _ = ssd_via_selective_scan(x, dt, A, B, C, dt_bias=dt_bias, dt_softplus=softplus,
                                     dt_limit=limit)
    assert_close(y, want)
    unclamped = reference.ssd_scan(x, dt, A, B, C, dt_bias=dt_bias, dt_softplus=softplus)
    assert rel_err(y, unclamped) > 1e-3


def test_ssd_scan_default_dt_limit_does_not_clamp():
    g = gen(4)
    x, dt, A, B, C = ssd_inputs(g)
    dt = dt - 0.3  # some dt < 0, which a clamp to (0, inf) would change
    y = reference.ssd_scan(x, dt, A, B, C, dt_limit=(0.0, float("inf")))
    want, _ = ssd_via_selective_scan(x, dt, A, B, C)
    assert_close(y, want)


def test_ssd_scan_seq_idx_equals_separate_segments():
    g = gen(5)
    x, dt, A, B, C = ssd_inputs(g, batch=3, seqlen=12)
    batch, seqlen, nheads, headdim = x.shape
    h0 = randn(g, batch, nheads, headdim, B.shape[-1])
    D, z = randn(g, nheads), randn(g, *x.shape)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 5, 5, 5],
                            [0] * 12,
                            [3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 7]], dtype=torch.int32)
    y, final = reference.ssd_scan(x, dt, A, B, C, D=D, z=z, initial_states=h0, seq_idx=seq_idx,
                                  return_final_states=True)
    for b in range(batch):
        bounds = [0] + [t for t in range(1, seqlen) if seq_idx[b, t] != seq_idx[b, t - 1]]
        bounds.append(seqlen)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            seg = slice(start, stop)
            y_seg, final_seg = reference.ssd_scan(
                x[b:b + 1, seg], dt[b:b + 1, seg], A, B[b:b + 1, seg], C[b:b + 1, seg], D=D,
                z=z[b:b + 1, seg], initial_states=h0[b:b + 1] if start == 0 else None,
                return_final_states=True)
            assert_close(y[b:b + 1, seg], y_seg)
        assert_close(final[b:b + 1], final_seg)


def test_ssd_scan_chunk_size_independent():
    g = gen(6)
    x, dt, A, B, C = ssd_inputs(g, seqlen=40)
    y16, f16 = reference.ssd_scan(x, dt, A, B, C, chunk_size=16, return_final_states=True)
    y256, f256 = reference.ssd_scan(x, dt, A, B, C, chunk_size=256, return_final_states=True)
    assert_close(y16, y256)
    assert_close(f16, f256)


@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
def test_ssd_scan_quadratic_form(h0):
    """Mamba-2 paper (Dao & Gu 2024), eq. (16): y = (L o C B^T) X with
    L_ts = exp(sum_{r=s+1..t} dt_r A) dt_s for s <= t, plus the initial-state term
    exp(sum_{r<=t} dt_r A) H_0 C_t."""
    g = gen(7)
    x, dt, A, B, C = ssd_inputs(g, seqlen=10)
    batch, seqlen, nheads, headdim = x.shape
    groups = B.shape[2]
    D = randn(g, nheads, headdim)
    init = randn(g, batch, nheads, headdim, B.shape[-1]) if h0 else None
    y = reference.ssd_scan(x, dt, A, B, C, D=D, initial_states=init)

    Bh = B.repeat_interleave(nheads // groups, dim=2)  # [B, L, H, N]
    Ch = C.repeat_interleave(nheads // groups, dim=2)
    cum = torch.cumsum(dt * A, dim=1)  # [B, L, H]
    seg = cum[:, :, None, :] - cum[:, None, :, :]  # [B, L(t), L(s), H]
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()[None, :, :, None]
    Lmat = torch.where(mask, torch.exp(torch.where(mask, seg, torch.zeros_like(seg))),
                       torch.zeros_like(seg)) * dt[:, None, :, :]  # [B, L(t), L(s), H]
    scores = torch.einsum("bthn,bshn->btsh", Ch, Bh)
    want = torch.einsum("btsh,bshp->bthp", Lmat * scores, x) + D * x
    if h0:
        want = want + torch.exp(cum)[..., None] * torch.einsum("bhpn,bthn->bthp", init, Ch)
    assert_close(y, want)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "D-z-bias-softplus"])
def test_selective_state_update_steps_equal_selective_scan(extras):
    g = gen(8)
    batch, dim, dstate, steps = 2, 4, 3, 6
    u, delta = randn(g, batch, dim, steps), rand(g, batch, dim, steps) * 0.5
    A = -rand(g, dim, dstate) - 0.1
    B, C = randn(g, batch, dstate, steps), randn(g, batch, dstate, steps)
    h0 = randn(g, batch, dim, dstate)
    D = z = dt_bias = None
    if extras:
        D, z, dt_bias = randn(g, dim), randn(g, batch, dim, steps), randn(g, dim) * 0.3
    want, want_last = reference.selective_scan(u, delta, A, B, C, D, z, dt_bias, extras, h0,
                                               return_last_state=True)
    state = h0.clone()
    outs = [reference.selective_state_update(
        state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
        None if z is None else z[..., t], dt_bias, extras) for t in range(steps)]
    assert_close(torch.stack(outs, dim=-1), want)
    assert_close(state, want_last)


@pytest.mark.parametrize("state_dtype", [f64, torch.float32], ids=["state-f64", "state-f32"])
def test_selective_state_update_heads_equal_ssd_scan(state_dtype):
    g = gen(9)
    x, dt, A, B, C = ssd_inputs(g, batch=3, seqlen=5)
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    D, z, dt_bias = randn(g, nheads, headdim), randn(g, *x.shape), randn(g, nheads) * 0.3
    pool = randn(g, 4, nheads, headdim, dstate).to(state_dtype)
    indices = torch.tensor([2, -1, 0], dtype=torch.int32)
    state = pool.clone()
    A_hpn = A[:, None, None].expand(nheads, headdim, dstate)
    dt_bias_hp = dt_bias[:, None].expand(nheads, headdim)
    outs = []
    for t in range(seqlen):
        outs.append(reference.selective_state_update(
            state, x[:, t], dt[:, t, :, None].expand(batch, nheads, headdim), A_hpn, B[:, t],
            C[:, t], D, z[:, t], dt_bias_hp, True, state_batch_indices=indices))
    out = torch.stack(outs, dim=1)  # [B, L, H, P]
    assert out.dtype == f64
    assert state.dtype == state_dtype

    rows = torch.tensor([0, 2])
    init = pool[indices[rows].long()].to(f64)
    want, want_final = reference.ssd_scan(
        x[rows], dt[rows], A, B[rows], C[rows], D=D, z=z[rows], dt_bias=dt_bias,
        dt_softplus=True, initial_states=init, return_final_states=True)
    tol = TOL if state_dtype == f64 else 1e-5
    assert_close(out[rows], want, tol)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(state[indices[rows].long()].to(f64), want_final, tol)
    assert torch.equal(state[[1, 3]], pool[[1, 3]])


def full_causal_conv(x, weight, bias, activation, initial=None):
    """Depthwise causal conv with F.conv1d; `initial` supplies the inputs before t = 0."""
    width = weight.shape[1]
    if initial is None:
        xp = F.pad(x, (width - 1, 0))
    else:
        xp = torch.cat([initial[..., initial.shape[-1] - (width - 1):], x], dim=-1)
    out = F.conv1d(xp, weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out


@pytest.mark.parametrize("activation", [None, "silu", "swish"], ids=["noact", "silu", "swish"])
@pytest.mark.parametrize("state_len", ["S=W-1", "S=W+2"])
@pytest.mark.parametrize("width", [2, 4], ids=["W2", "W4"])
def test_causal_conv1d_update_steps_equal_full_conv(width, state_len, activation):
    g = gen(10)
    batch, dim, seqlen = 2, 5, 9
    S = width - 1 if state_len == "S=W-1" else width + 2
    x, weight, bias = randn(g, batch, dim, seqlen), randn(g, dim, width), randn(g, dim)
    for initial in (None, randn(g, batch, dim, S)):
        state = torch.zeros(batch, dim, S, dtype=f64) if initial is None else initial.clone()
        outs = [reference.causal_conv1d_update(x[..., t], state, weight, bias, activation)
                for t in range(seqlen)]
        want = full_causal_conv(x, weight, bias, activation, initial)
        assert_close(torch.stack(outs, dim=-1), want)
        history = x if initial is None else torch.cat([initial, x], dim=-1)
        history = F.pad(history, (max(0, S - history.shape[-1]), 0))
        assert_close(state, history[..., -S:])

        state = torch.zeros(batch, dim, S, dtype=f64) if initial is None else initial.clone()
        multi = reference.causal_conv1d_update(x, state, weight, None, activation)
        assert_close(multi, full_causal_conv(x, weight, None, activation, initial))
        assert_close(state, history[..., -S:])


def test_causal_conv1d_update_state_indices():
    g = gen(11)
    batch, dim, width, S = 3, 4, 4, 5
    x, weight, bias = randn(g, batch, dim, 2), randn(g, dim, width), randn(g, dim)
    pool = randn(g, 6, dim, S).float()
    indices = torch.tensor([4, -1, 1], dtype=torch.int32)
    state = pool.clone()
    out = reference.causal_conv1d_update(x, state, weight, bias, "silu", indices)
    assert out.dtype == f64 and state.dtype == torch.float32
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for i in (0, 2):
        row_state = pool[indices[i]].double()[None].clone()
        want = reference.causal_conv1d_update(x[i:i + 1], row_state, weight, bias, "silu")
        assert_close(out[i:i + 1], want)
        assert_close(state[indices[i]].double(), row_state[0].float().double())
        assert_close(out[i:i + 1], full_causal_conv(x[i:i + 1], weight, bias, "silu",
                                                    pool[indices[i]].double()[None]))
    untouched = [0, 2, 3, 5]
    assert torch.equal(state[untouched], pool[untouched])


def test_causal_conv1d_update_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        reference.causal_conv1d_update(torch.zeros(1, 2), torch.zeros(1, 2, 3), torch.zeros(2, 4),
                                       activation="relu")


def causal_fft(v, k):
    """sum_s k[s] v[t-s] by zero-padded FFT; taps past L land beyond the kept outputs."""
    seqlen, klen = v.shape[-1], k.shape[-1]
    n = 2 ** math.ceil(math.log2(seqlen + klen))
    return torch.fft.irfft(torch.fft.rfft(v, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]


def fftconv_via_fft(u, k, D, k_rev, pregate, postgate, activation):
    v = u if pregate is None else u * pregate
    c = causal_fft(v, k)
    if k_rev is not None:
        c = c + causal_fft(v.flip(-1), k_rev).flip(-1)
    if D is not None:
        c = c + D[:, None] * v
    if activation == "gelu":
        c = 0.5 * c * (1 + torch.erf(c / math.sqrt(2)))
    elif activation == "silu":
        c = c * torch.sigmoid(c)
    return c if postgate is None else c * postgate


FFTCONV_EXTRAS = {
    "plain": {},
    "D-gates-gelu": {"D": True, "pregate": True, "postgate": True, "activation": "gelu"},
    "D-postgate-silu": {"D": True, "postgate": True, "activation": "silu"},
}


@pytest.mark.parametrize("extras", list(FFTCONV_EXTRAS.values()), ids=list(FFTCONV_EXTRAS))
@pytest.mark.parametrize("direction", ["causal", "rev", "both"])
@pytest.mark.parametrize("klen", ["K1", "K<L", "K=L", "K>L"])
def test_fftconv_equals_fft(klen, direction, extras):
    g = gen(12)
    batch, dim, seqlen = 2, 3, 13
    K = {"K1": 1, "K<L": 5, "K=L": seqlen, "K>L": seqlen + 6}[klen]
    u = randn(g, batch, dim, seqlen)
    k = randn(g, dim, K)
    if direction == "rev":
        k = torch.zeros(dim, 1, dtype=f64)
    k_rev = randn(g, dim, K + 2 if K > 1 else 1) if direction != "causal" else None
    D = randn(g, dim) if extras.get("D") else None
    pregate = randn(g, *u.shape) if extras.get("pregate") else None
    postgate = randn(g, *u.shape) if extras.get("postgate") else None
    act = extras.get("activation")
    out = reference.fftconv(u, k, D, k_rev, pregate, postgate, act)
    assert out.dtype == f64
    assert_close(out, fftconv_via_fft(u, k, D, k_rev, pregate, postgate, act))


def test_fftconv_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        reference.fftconv(torch.zeros(1, 2, 3), torch.zeros(2, 3), activation="relu")


def s4d_nodes(g, *shape):
    return torch.complex(-rand(g, *shape) * 0.5 - 0.01, randn(g, *shape) * 3)


def vandermonde_by_recurrence(x, L):
    """Rows h_l with h_0 = 1, h_{l+1} = exp(x) h_l; returns [..., N, L]."""
    step = torch.exp(x)
    rows, h = [], torch.ones_like(x)
    for _ in range(L):
        rows.append(h)
        h = h * step
    return torch.stack(rows, dim=-1)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "nosym"])
def test_log_vandermonde_equals_recurrence(symmetric):
    g = gen(13)
    v, x, L = randn(g, 3, 7, dtype=c128), s4d_nodes(g, 3, 7), 20
    y = reference.log_vandermonde(v, x, L, symmetric)
    want = (v[..., None] * vandermonde_by_recurrence(x, L)).sum(-2)
    if symmetric:
        want = 2 * want.real
    assert y.dtype == (f64 if symmetric else c128)
    assert_close(y, want)


def test_log_vandermonde_broadcast():
    g = gen(14)
    v, x, L = randn(g, 2, 1, 5, dtype=c128), s4d_nodes(g, 3, 5), 6
    y = reference.log_vandermonde(v, x, L, symmetric=False)
    want = (v[..., None] * vandermonde_by_recurrence(x, L)).sum(-2)
    assert_close(y, want)


@pytest.mark.parametrize("u_dtype", [f64, c128], ids=["real-u", "complex-u"])
def test_log_vandermonde_transpose_equals_adjoint(u_dtype):
    g = gen(15)
    H, N, L = 3, 6, 17
    v, x, u = randn(g, H, N, dtype=c128), s4d_nodes(g, H, N), randn(g, 2, H, L, dtype=u_dtype)
    out = reference.log_vandermonde_transpose(u, v, x, L)
    M = vandermonde_by_recurrence(x, L)  # [H, N, L]
    want = sum(u[..., l, None] * v * M[..., l] for l in range(L))  # [2, H, N]
    assert out.dtype == c128
    assert_close(out, want)


def test_log_vandermonde_transpose_inner_product_identity():
    """sum_l u_l (V v)_l = sum_n v_n (V^T u)_n, with V_ln = exp(x_n l)."""
    g = gen(16)
    N, L = 8, 12
    v, x, u = randn(g, N, dtype=c128), s4d_nodes(g, N), randn(g, L, dtype=c128)
    lhs = (u * reference.log_vandermonde(v, x, L, symmetric=False)).sum()
    rhs = (v * reference.log_vandermonde_transpose(u, torch.ones_like(v), x, L)).sum()
    assert abs(lhs - rhs) / abs(rhs) < TOL
    also = reference.log_vandermonde_transpose(u, v, x, L).sum()
    assert abs(lhs - also) / abs(also) < TOL


@pytest.mark.parametrize("shapes", [((4, 6), (4, 6)), ((2, 1, 6), (3, 6)), ((6,), (5, 6))],
                         ids=["same", "v-bcast", "w-bcast"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "nosym"])
def test_cauchy_equals_materialised_sum(symmetric, shapes):
    g = gen(17)
    v_shape, w_shape = shapes
    L = 9
    v = randn(g, *v_shape, dtype=c128)
    w = torch.complex(-rand(g, *w_shape), randn(g, *w_shape))
    z = torch.exp(2j * math.pi * torch.arange(L, dtype=f64) / L).to(c128)
    y = reference.cauchy(v, z, w, symmetric)
    cauchy_matrix = 1 / (z[None, :] - w[..., :, None])  # [..., N, L]
    want = (v[..., :, None] * cauchy_matrix).sum(-2)
    if symmetric:
        want = want + (v.conj()[..., :, None] / (z[None, :] - w.conj()[..., :, None])).sum(-2)
    assert y.dtype == c128
    assert_close(y, want)


def linear_scan_closed_form(a, b, h0):
    """h_t = sum_{s<=t} (prod_{r=s+1..t} a_r) b_s + (prod_{r<=t} a_r) h0, via cumprod/cumsum."""
    P = torch.cumprod(a, dim=-1)  # prod_{r<=t} a_r
    h = P * torch.cumsum(b / P, dim=-1)
    if h0 is not None:
        h = h + P * h0[..., None]
    return h


@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_linear_scan_closed_form(is_complex, reverse, h0):
    g = gen(18)
    shape, L = (2, 3), 10
    a = rand(g, *shape, L) * 0.5 + 0.5
    b = randn(g, *shape, L)
    init = randn(g, *shape) if h0 else None
    if is_complex:
        a = a * torch.exp(1j * randn(g, *shape, L))
        b = torch.complex(b, randn(g, *shape, L))
        init = None if init is None else torch.complex(init, randn(g, *shape))
    h, last = reference.linear_scan(a, b, init, reverse=reverse, return_last_state=True)
    if reverse:
        want = linear_scan_closed_form(a.flip(-1), b.flip(-1), init).flip(-1)
        want_last = want[..., 0]
    else:
        want = linear_scan_closed_form(a, b, init)
        want_last = want[..., -1]
    assert h.dtype == (c128 if is_complex else f64)
    assert_close(h, want)
    assert_close(last, want_last)
    assert_close(reference.linear_scan(a, b, init, reverse=reverse), want)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("is_complex", [False, True], ids=["realA", "complexA"])
def test_selective_scan_gradcheck(is_complex):
    g = gen(19)
    dtype = c128 if is_complex else f64
    batch, dim, dstate, L = 1, 2, 2, 4
    u, delta = randn(g, batch, dim, L), rand(g, batch, dim, L)
    A = -rand(g, dim, dstate).to(dtype)
    B, C = randn(g, batch, dstate, L, dtype=dtype), randn(g, dim, dstate, dtype=dtype)
    D, z, bias = randn(g, dim), randn(g, batch, dim, L), randn(g, dim)
    h0 = randn(g, batch, dim, dstate, dtype=dtype)
    inputs = [leaf(t) for t in (u, delta, A, B, C, D, z, bias, h0)]

    def fn(u, delta, A, B, C, D, z, bias, h0):
        return reference.selective_scan(u, delta, A, B, C, D, z, bias, True, h0,
                                        return_last_state=True)

    assert torch.autograd.gradcheck(fn, inputs)


def test_ssd_scan_gradcheck():
    g = gen(20)
    x, dt, A, B, C = ssd_inputs(g, batch=1, seqlen=4, nheads=2, headdim=2, groups=1, dstate=2)
    D, z, bias = randn(g, 2), randn(g, *x.shape), randn(g, 2)
    h0 = randn(g, 1, 2, 2, 2)
    seq_idx = torch.tensor([[0, 0, 1, 1]], dtype=torch.int32)
    inputs = [leaf(t) for t in (x, dt, A, B, C, D, z, bias, h0)]

    def fn(x, dt, A, B, C, D, z, bias, h0):
        return reference.ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True,
                                  initial_states=h0, seq_idx=seq_idx, return_final_states=True)

    assert torch.autograd.gradcheck(fn, inputs)


def test_selective_state_update_gradcheck():
    g = gen(21)
    batch, dim, dstate = 2, 3, 2
    state = randn(g, batch, dim, dstate)
    inputs = [leaf(t) for t in (randn(g, batch, dim), rand(g, batch, dim), -rand(g, dim, dstate),
                                randn(g, batch, dstate), randn(g, batch, dstate), randn(g, dim),
                                randn(g, batch, dim), randn(g, dim))]

    def fn(x, dt, A, B, C, D, z, bias):
        return reference.selective_state_update(state.clone(), x, dt, A, B, C, D, z, bias, True)

    assert torch.autograd.gradcheck(fn, inputs)


def test_causal_conv1d_update_gradcheck():
    g = gen(22)
    batch, dim, width, S = 2, 2, 3, 3
    conv_state = randn(g, batch, dim, S)
    inputs = [leaf(t) for t in (randn(g, batch, dim, 3), randn(g, dim, width), randn(g, dim))]

    def fn(x, weight, bias):
        return reference.causal_conv1d_update(x, conv_state.clone(), weight, bias, "silu")

    assert torch.autograd.gradcheck(fn, inputs)


def test_fftconv_gradcheck():
    g = gen(23)
    batch, dim, L = 1, 2, 5
    inputs = [leaf(t) for t in (randn(g, batch, dim, L), randn(g, dim, 3), randn(g, dim),
                                randn(g, dim, 2), randn(g, batch, dim, L), randn(g, batch, dim, L))]

    def fn(u, k, D, k_rev, pregate, postgate):
        return reference.fftconv(u, k, D, k_rev, pregate, postgate, "gelu")

    assert torch.autograd.gradcheck(fn, inputs)


def test_cauchy_gradcheck():
    g = gen(24)
    v, w = randn(g, 2, 3, dtype=c128), torch.complex(-rand(g, 3), randn(g, 3))
    z = torch.exp(2j * math.pi * torch.arange(4, dtype=f64) / 4).to(c128)
    assert torch.autograd.gradcheck(lambda v, w: reference.cauchy(v, z, w), [leaf(v), leaf(w)])


def test_log_vandermonde_gradcheck():
    g = gen(25)
    v, x, u = randn(g, 2, 3, dtype=c128), s4d_nodes(g, 2, 3), randn(g, 2, 5)
    assert torch.autograd.gradcheck(lambda v, x: reference.log_vandermonde(v, x, 5),
                                    [leaf(v), leaf(x)])
    assert torch.autograd.gradcheck(
        lambda u, v, x: reference.log_vandermonde_transpose(u, v, x, 5),
        [leaf(u), leaf(v), leaf(x)])


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_linear_scan_gradcheck(reverse):
    g = gen(26)
    a, b, h0 = rand(g, 2, 5), randn(g, 2, 5), randn(g, 2)
    a = a * torch.exp(1j * randn(g, 2, 5))

    def fn(a, b, h0):
        return reference.linear_scan(a, b, h0, reverse=reverse, return_last_state=True)

    assert torch.autograd.gradcheck(fn, [leaf(a), leaf(b.to(c128)), leaf(h0.to(c128))])
    assert torch.autograd.gradcheck(fn, [leaf(a.abs()), leaf(b), leaf(h0)])
