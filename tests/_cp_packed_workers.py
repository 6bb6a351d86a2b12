"""Worker bodies of tests/test_context_parallel_packed.py: context parallelism over packed
sequences (seq_idx / cu_seqlens), run in spawned processes (gloo on CPU) by _cp_workers.run.

Every check builds the full packed row from a seeded generator (the same on every rank), runs the
single-process packed op on it and the context-parallel op on this rank's piece, and compares the
piece of the output and of every gradient; per-sequence final states (zero on the ranks that do
not hold a sequence's end) and the gradients of parameters and per-sequence initial states are
summed over the ranks first.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import ssm_kernels
from ssm_kernels import distributed as cp
from ssm_kernels import testing
from ssm_kernels.nn import LongConv, Mamba, Mamba2
from ssm_kernels.packing import cu_seqlens_to_seq_idx

from _cp_workers import Piece, _dot, _rand, _randn, _randn_like, assert_same_error_on_every_rank


def _summed(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def compare_packed(name, piece, full_fn, cp_fn, inputs, seq_dims, dtype, gen, state=None, first_only=(),
                   state_on_first=False):
    """state: None; "end" (the state after this rank's piece, compared on the rank holding the
    global end: the last piece, the first with state_on_first); "per_seq" ([S, ...] rows of the
    sequences ending on this piece, zero elsewhere: summed over the ranks)."""
    def trainable(v):
        return v.is_floating_point() or v.is_complex()

    full = {k: v.clone().requires_grad_(trainable(v)) for k, v in inputs.items()}
    res = full_fn(**full)
    out, s_full = res if state else (res, None)
    g_out = _randn_like(out, gen)
    g_state = None if s_full is None else _randn_like(s_full, gen)
    (_dot(out, g_out) + (0 if s_full is None else _dot(s_full, g_state))).backward()
    state_here = piece.is_first if state_on_first else piece.is_last

    def cp_run():
        local = {}
        for k, v in inputs.items():
            if k in first_only and not (piece.is_first if not state_on_first else piece.is_last):
                local[k] = None
                continue
            t = piece.cut(v, seq_dims[k]) if k in seq_dims else v
            local[k] = t.clone().requires_grad_(trainable(t))
        res = cp_fn(**local)
        o, s = res if state else (res, None)
        loss = _dot(o, piece.cut(g_out, seq_dims["__out__"]))
        if s is not None and (state == "per_seq" or state_here):
            loss = loss + _dot(s, g_state)
        loss.backward()
        grads = {}
        for k, t in local.items():
            if t is None or not t.requires_grad:
                continue
            grad = t.grad if t.grad is not None else torch.zeros_like(t)
            if k not in seq_dims and k not in first_only:
                grad = _summed(grad)  # parameters and per-sequence initial states: the pieces' shares
            grads[k] = grad
        if s is not None and state == "per_seq":
            s = _summed(s.detach())
        return o.detach(), None if s is None else s.detach(), grads

    o1, s1, g1 = cp_run()
    o2, s2, g2 = cp_run()
    assert torch.equal(o1, o2) and all(torch.equal(g1[k], g2[k]) for k in g1), f"{name}: not deterministic"
    testing.assert_close(o1, piece.cut(out.detach(), seq_dims["__out__"]), dtype, name=f"{name} out")
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    if s_full is not None and (state == "per_seq" or state_here):
        testing.assert_close(s1, s_full.detach(), wide if not s_full.is_complex() else dtype,
                             name=f"{name} final state")
    for k, grad in g1.items():
        want = full[k].grad
        if k in seq_dims:
            want = piece.cut(want, seq_dims[k])
        # parameters of a float32/float64 computation: their own dtype's tolerance (float32
        # parameters of a float64 computation hold float32 gradients)
        half = dtype in (torch.float16, torch.bfloat16)
        own = grad.dtype if grad.dtype in (torch.float64, torch.complex128) else torch.float32
        tol_dtype = dtype if k in seq_dims or half else own
        testing.assert_close(grad, want, tol_dtype, name=f"{name} grad {k}")


def _rows(cu_rows, total):
    """seq_idx [len(cu_rows), total] int32 from one cu_seqlens per row."""
    return torch.cat([cu_seqlens_to_seq_idx(torch.tensor(cu, dtype=torch.int32), total) for cu in cu_rows])


def op_checks(rank, world, lengths, order, cu_seqlens, other_row, dtypes):
    """Every op, with seq_idx (two rows: cu_seqlens' boundaries and other_row's) and with
    cu_seqlens (per-sequence initial and final states), forward and backward."""
    piece = Piece(lengths, order)
    gen = torch.Generator().manual_seed(4321)
    T = sum(lengths)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    S = len(cu_seqlens) - 1
    seq_idx = _rows([cu_seqlens, other_row], T)  # [2, T]
    kw = dict(shard_order=order)
    for dtype in dtypes:
        _op_checks(piece, gen, T, cu, S, seq_idx, kw, dtype)


def _op_checks(piece, gen, T, cu, S, seq_idx, kw, dtype):
    D, N = 3, 4
    seq = {"__out__": -1, "seq_idx": 1}

    if dtype == torch.float32:
        for reverse in (False, True):
            a, b = _rand((2, D, T), gen, 0.5, 1.0), _randn((2, D, T), gen)
            compare_packed(
                f"linear_scan seq_idx reverse={reverse}", piece,
                lambda a, b, h0, seq_idx: ssm_kernels.linear_scan(a, b, h0, reverse, True, seq_idx=seq_idx),
                lambda a, b, h0, seq_idx: cp.linear_scan(a, b, h0, reverse, True, seq_idx=seq_idx, **kw),
                {"a": a, "b": b, "h0": _randn((2, D), gen), "seq_idx": seq_idx}, dict(seq, a=-1, b=-1),
                dtype, gen, state="end", first_only=("h0",), state_on_first=reverse)
            compare_packed(
                f"linear_scan cu_seqlens reverse={reverse}", piece,
                lambda a, b, h0: ssm_kernels.linear_scan(a, b, h0, reverse, True, cu_seqlens=cu),
                lambda a, b, h0: cp.linear_scan(a, b, h0, reverse, True, cu_seqlens=cu, **kw),
                {"a": a[:1], "b": b[:1], "h0": _randn((S, D), gen)}, dict(seq, a=-1, b=-1), dtype, gen,
                state="per_seq")

    u, delta = _randn((2, D, T), gen, dtype), _rand((2, D, T), gen, -1.0, 0.5, dtype)
    A = -_rand((D, N), gen, 0.5, 2.0)
    Bv, Cv, z = _randn((2, N, T), gen, dtype), _randn((2, 1, N, T), gen, dtype), _randn((2, D, T), gen, dtype)
    params = {"A": A, "D": _randn((D,), gen), "delta_bias": _randn((D,), gen)}
    compare_packed(
        "selective_scan seq_idx", piece,
        lambda u, delta, A, B, C, D, z, delta_bias, h0, seq_idx: ssm_kernels.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, True, h0, True, seq_idx=seq_idx),
        lambda u, delta, A, B, C, D, z, delta_bias, h0, seq_idx: cp.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, True, h0, True, seq_idx=seq_idx, **kw),
        {"u": u, "delta": delta, "B": Bv, "C": Cv, "z": z, **params, "h0": _randn((2, D, N), gen),
         "seq_idx": seq_idx},
        dict(seq, u=-1, delta=-1, B=-1, C=-1, z=-1), dtype, gen, state="end", first_only=("h0",))
    compare_packed(
        "selective_scan cu_seqlens", piece,
        lambda u, delta, A, B, C, D, z, delta_bias, h0: ssm_kernels.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, True, h0, True, cu_seqlens=cu),
        lambda u, delta, A, B, C, D, z, delta_bias, h0: cp.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, True, h0, True, cu_seqlens=cu, **kw),
        {"u": u[:1], "delta": delta[:1], "B": Bv[:1], "C": Cv[:1], "z": z[:1], **params,
         "h0": _randn((S, D, N), gen)},
        dict(seq, u=-1, delta=-1, B=-1, C=-1, z=-1), dtype, gen, state="per_seq")

    H, P, G = 4, 3, 2
    x, dt = _randn((2, T, H, P), gen, dtype), _rand((2, T, H), gen, -2.0, 1.0, dtype)
    Bs, Cs, zs = _randn((2, T, G, N), gen, dtype), _randn((2, T, G, N), gen, dtype), _randn((2, T, H, P), gen, dtype)
    params = {"A": -_rand((H,), gen, 0.5, 2.0), "D": _randn((H, P), gen), "dt_bias": _randn((H,), gen)}
    seq_ssd = {"__out__": 1, "x": 1, "dt": 1, "B": 1, "C": 1, "z": 1, "seq_idx": 1}
    compare_packed(
        "ssd_scan seq_idx", piece,
        lambda x, dt, A, B, C, D, z, dt_bias, h0, seq_idx: ssm_kernels.ssd_scan(
            x, dt, A, B, C, 16, D, z, dt_bias, True, (0.0, float("inf")), h0, seq_idx, True),
        lambda x, dt, A, B, C, D, z, dt_bias, h0, seq_idx: cp.ssd_scan(
            x, dt, A, B, C, 16, D, z, dt_bias, True, (0.0, float("inf")), h0, seq_idx, True, **kw),
        {"x": x, "dt": dt, "B": Bs, "C": Cs, "z": zs, **params, "h0": _randn((2, H, P, N), gen), "seq_idx": seq_idx},
        seq_ssd, dtype, gen, state="end", first_only=("h0",))
    compare_packed(
        "ssd_scan cu_seqlens", piece,
        lambda x, dt, A, B, C, D, z, dt_bias, h0: ssm_kernels.ssd_scan(
            x, dt, A, B, C, 16, D, z, dt_bias, True, (0.05, 0.6), h0, None, True, cu_seqlens=cu),
        lambda x, dt, A, B, C, D, z, dt_bias, h0: cp.ssd_scan(
            x, dt, A, B, C, 16, D, z, dt_bias, True, (0.05, 0.6), h0, None, True, cu_seqlens=cu, **kw),
        {"x": x[:1], "dt": dt[:1], "B": Bs[:1], "C": Cs[:1], "z": zs[:1], **params, "h0": _randn((S, H, P, N), gen)},
        seq_ssd, dtype, gen, state="per_seq")

    W = 4
    xc = _randn((2, D, T), gen, dtype)
    params = {"weight": _randn((D, W), gen), "bias": _randn((D,), gen)}
    compare_packed(
        "causal_conv1d seq_idx", piece,
        lambda x, weight, bias, h0, seq_idx: ssm_kernels.causal_conv1d(x, weight, bias, "silu", h0, True, seq_idx),
        lambda x, weight, bias, h0, seq_idx: cp.causal_conv1d(x, weight, bias, "silu", h0, True, seq_idx, **kw),
        {"x": xc, **params, "h0": _randn((2, D, W - 1), gen, dtype), "seq_idx": seq_idx}, dict(seq, x=-1),
        dtype, gen, state="end", first_only=("h0",))
    compare_packed(
        "causal_conv1d cu_seqlens", piece,
        lambda x, weight, bias, h0: ssm_kernels.causal_conv1d(x, weight, bias, "silu", h0, True, cu_seqlens=cu),
        lambda x, weight, bias, h0: cp.causal_conv1d(x, weight, bias, "silu", h0, True, cu_seqlens=cu, **kw),
        {"x": xc[:1], **params, "h0": _randn((S, D, W - 1), gen, dtype)}, dict(seq, x=-1), dtype, gen,
        state="per_seq")

    for K in (3, T):
        compare_packed(
            f"fftconv cu_seqlens K={K}", piece,
            lambda u, k, D, pregate, postgate: ssm_kernels.fftconv(u, k, D, None, pregate, postgate, "gelu",
                                                                   cu_seqlens=cu),
            lambda u, k, D, pregate, postgate: cp.fftconv(u, k, D, None, pregate, postgate, "gelu",
                                                          cu_seqlens=cu, **kw),
            {"u": _randn((1, D, T), gen, dtype), "k": _randn((D, K), gen) / K, "D": _randn((D,), gen),
             "pregate": _randn((1, D, T), gen, dtype), "postgate": _randn((1, D, T), gen, dtype)},
            dict(seq, u=-1, pregate=-1, postgate=-1), dtype, gen)


def module_checks(rank, world, lengths, cu_seqlens):
    """nn.Mamba2, nn.Mamba and nn.LongConv with cu_seqlens and context_parallel_group (rank order):
    output, input gradient and parameter gradients equal the single-process packed run."""
    piece = Piece(lengths, list(range(world)))
    gen = torch.Generator().manual_seed(99)
    T = sum(lengths)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    torch.manual_seed(0)
    layers = {
        "Mamba2": Mamba2(16, d_state=8, headdim=8, chunk_size=16, ngroups=2),
        "Mamba": Mamba(16, d_state=4, d_conv=4),
        "LongConv": LongConv(8, l_max=T, filter_order=8, short_filter_order=3),
    }
    for name, layer in layers.items():
        packings = [("cu_seqlens", {"cu_seqlens": cu})]
        if name != "LongConv":
            packings.append(("seq_idx", {"seq_idx": cu_seqlens_to_seq_idx(cu, T)}))
        for form, packing in packings:
            x = _randn((1, T, layer.d_model), gen)
            g = _randn((1, T, layer.d_model), gen)
            xf = x.clone().requires_grad_(True)
            layer.context_parallel_group = None
            layer.zero_grad()
            out_full = layer(xf, **packing)
            (out_full * g).sum().backward()
            want = {k: p.grad.clone() for k, p in layer.named_parameters()}
            layer.zero_grad()
            layer.context_parallel_group = dist.group.WORLD
            local = {k: piece.cut(v, 1) if k == "seq_idx" else v for k, v in packing.items()}
            xl = piece.cut(x, 1).clone().requires_grad_(True)
            out = layer(xl, **local)
            (out * piece.cut(g, 1)).sum().backward()
            label = f"{name} {form}"
            testing.assert_close(out, piece.cut(out_full, 1), torch.float32, name=f"{label} out")
            testing.assert_close(xl.grad, piece.cut(xf.grad, 1), torch.float32, name=f"{label} input grad")
            cp.all_reduce_gradients(layer, dist.group.WORLD)
            for k, p in layer.named_parameters():
                testing.assert_close(p.grad, want[k], torch.float32, name=f"{label} grad {k}")
            layer.context_parallel_group = None


def module_states_checks(rank, world, lengths, cu_seqlens):
    """nn.Mamba and nn.Mamba2 with cu_seqlens, per-sequence initial and final (conv, ssm) states,
    under context parallelism: the rows returned on each rank (each sequence's on the rank holding
    its end) sum to the single-process states, and the gradients reach the input and the initial
    states."""
    piece = Piece(lengths, list(range(world)))
    gen = torch.Generator().manual_seed(7)
    T = sum(lengths)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    torch.manual_seed(0)
    for name, layer in (("Mamba2", Mamba2(16, d_state=8, headdim=8, chunk_size=16, ngroups=2)),
                        ("Mamba", Mamba(16, d_state=4, d_conv=4))):
        _module_states_check(piece, layer, _randn((1, T, 16), gen), cu, gen, name)


def _module_states_check(piece, layer, x, cu, gen, name):
    S = cu.shape[0] - 1
    ref = layer.allocate_inference_cache(S, 1)
    conv0, ssm0 = _randn(tuple(ref[0].shape), gen), _randn(tuple(ref[1].shape), gen)
    g_out = _randn(tuple(x.shape), gen)
    g_conv, g_ssm = _randn(tuple(conv0.shape), gen), _randn(tuple(ssm0.shape), gen)

    def run(xi, c0, s0, g):
        out, conv, ssm = layer(xi, cu_seqlens=cu, conv_state=c0, ssm_state=s0, return_final_states=True)
        return out, conv, ssm, _dot(out, g) + _dot(conv, g_conv) + _dot(ssm, g_ssm)

    layer.context_parallel_group = None
    leaves = [t.clone().requires_grad_(True) for t in (x, conv0, ssm0)]
    out_full, conv_full, ssm_full, loss = run(*leaves, g_out)
    want = torch.autograd.grad(loss, leaves)
    layer.context_parallel_group = dist.group.WORLD
    local = [piece.cut(x, 1).clone().requires_grad_(True)] + [t.clone().requires_grad_(True) for t in (conv0, ssm0)]
    out, conv, ssm, loss = run(*local, piece.cut(g_out, 1))
    got = torch.autograd.grad(loss, local)
    layer.context_parallel_group = None
    label = f"{name} per-sequence states"
    testing.assert_close(out, piece.cut(out_full, 1), torch.float32, name=f"{label} out")
    testing.assert_close(_summed(conv), conv_full, torch.float32, name=f"{label} conv_state")
    testing.assert_close(_summed(ssm), ssm_full, torch.float32, name=f"{label} ssm_state")
    testing.assert_close(got[0], piece.cut(want[0], 1), torch.float32, name=f"{label} input grad")
    testing.assert_close(_summed(got[1]), want[1], torch.float32, name=f"{label} conv_state grad")
    testing.assert_close(_summed(got[2]), want[2], torch.float32, name=f"{label} ssm_state grad")


def comm_bytes_check(rank, world):
    """Packing adds nothing to the exchange of a Mamba2 layer with cu_seqlens (the same summaries
    and halos at any length and sequence layout) and one [B, 4] int64 all-gather per op with
    seq_idx."""
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, headdim=8, chunk_size=16, context_parallel_group=dist.group.WORLD)
    sent = {}
    for local_len, cu in ((8, [0, 3, 8 * world]), (40, [0, 40, 41, 41, 40 * world])):
        for form in ("none", "cu_seqlens", "seq_idx"):
            x = torch.randn(1, local_len, 16, requires_grad=True)
            packing = {}
            if form == "cu_seqlens":
                packing = {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
            elif form == "seq_idx":
                full = cu_seqlens_to_seq_idx(torch.tensor(cu), local_len * world)
                packing = {"seq_idx": full[:, rank * local_len:(rank + 1) * local_len]}
            with cp.comm_stats() as stats:
                layer(x, **packing).sum().backward()
            sent[(local_len, form)] = stats.sent
    for local_len in (8, 40):
        assert sent[(local_len, "cu_seqlens")] == sent[(local_len, "none")], sent
        assert sent[(local_len, "seq_idx")] == sent[(local_len, "none")] + 2 * 4 * 8, sent  # conv + scan
    assert sent[(8, "none")] == sent[(40, "none")], sent
    return sent[(8, "none")]


def error_checks(rank, world):
    """Bad packing raises ValueError on every rank with the same message, and the group stays usable."""
    T = 6 * world
    x, w = torch.randn(1, 4, 6), torch.randn(4, 3)
    good = torch.zeros(1, 6, dtype=torch.int32) + rank
    last = rank == world - 1
    u, delta, A = torch.randn(1, 4, 6), torch.rand(1, 4, 6), -torch.rand(4, 3)
    cases = {
        # non-monotonic across the shard order: every piece non-decreasing, the row is not
        "seq_idx": lambda: cp.causal_conv1d(x, w, seq_idx=good, shard_order=list(range(world))[::-1]),
        "seq_idx ": lambda: cp.selective_scan(u, delta, A, u[:, :3], u[:, :3], seq_idx=(
            torch.tensor([[3, 2, 2, 2, 2, 2]], dtype=torch.int32) if last else good)),
        "seq_idx  ": lambda: cp.ssd_scan(torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2), -torch.rand(2),
                                         torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8),
                                         seq_idx=good.long() if last else good),
        "cu_seqlens": lambda: cp.linear_scan(u, u, cu_seqlens=torch.tensor([0, T - rank], dtype=torch.int32)),
        "cu_seqlens ": lambda: cp.fftconv(x, w, cu_seqlens=torch.tensor([0, 3, T + 1], dtype=torch.int32)),
        "cu_seqlens  ": lambda: cp.causal_conv1d(x, w, cu_seqlens=torch.tensor([0, T]) if last else None),
        "cu_seqlens   ": lambda: cp.ssd_scan(torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2), -torch.rand(2),
                                             torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8),
                                             seq_idx=good, cu_seqlens=torch.tensor([0, T])),
        "conv_state": lambda: Mamba2(8, d_state=4, headdim=4, d_conv=8, context_parallel_group=dist.group.WORLD)(
            torch.randn(1, 6, 8), cu_seqlens=torch.tensor([0, T]), return_final_states=True),
    }
    everyone = assert_same_error_on_every_rank(cases, world)
    y = cp.causal_conv1d(x, w, seq_idx=good)  # the group is still usable
    assert y.shape == x.shape
    return sorted(everyone[0].values())
