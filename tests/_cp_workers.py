"""Worker bodies of tests/test_context_parallel.py, run in spawned processes (gloo on CPU).

Every check builds the full-length inputs from a seeded generator (the same on every rank), runs the
single-process op on them and the context-parallel op on this rank's piece, and compares the piece
of the output and of every gradient (parameters: summed over the ranks).
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import sys
import traceback

import torch
import torch.distributed as dist

import ssm_kernels
from ssm_kernels import distributed as cp
from ssm_kernels import testing
from ssm_kernels.nn import LongConv, Mamba, Mamba2

TIMEOUT = datetime.timedelta(seconds=60)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)  # train_context_parallel, whose workers fork from the same server


def run(rank, world, store_path, result_dir, body, args):
    """Entry point of every spawned process: init gloo, run body, write 'ok' or the traceback."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        module, _, name = body.rpartition(":")  # "module:function" runs a body of another workers file
        fn = getattr(importlib.import_module(module), name) if module else globals()[body]
        result = fn(rank, world, *args)
        text = "ok" if result is None else repr(result)
    except BaseException:  # noqa: BLE001 - reported to the parent test
        text = "FAIL\n" + traceback.format_exc()
    with open(os.path.join(result_dir, f"rank{rank}"), "w") as f:
        f.write(text)
    dist.destroy_process_group()


class Piece:
    """Where this rank's piece lies: lengths by piece position, order[p] = rank of piece p."""

    def __init__(self, lengths, order):
        self.lengths, self.order = lengths, order
        self.position = order.index(dist.get_rank())
        self.start = sum(lengths[:self.position])
        self.stop = self.start + lengths[self.position]
        self.is_first = self.position == 0
        self.is_last = self.position == len(order) - 1

    def cut(self, t, dim):
        return t.narrow(dim, self.start, self.stop - self.start)


def _randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype)


def _rand(shape, gen, lo, hi, dtype=torch.float32):
    return (lo + (hi - lo) * torch.rand(shape, generator=gen)).to(dtype)


def _dot(x, g):
    """A real scalar <x, g> (complex: Re sum x conj(g)) in float32 or wider."""
    if x.is_complex():
        return (x * g.conj()).real.sum()
    return (x.float() * g.float()).sum()


def _randn_like(t, gen):
    if t.is_complex():
        return torch.complex(torch.randn(t.shape, generator=gen), torch.randn(t.shape, generator=gen)).to(t.dtype)
    return torch.randn(t.shape, generator=gen).to(t.dtype)


def compare_op(name, piece, full_fn, cp_fn, inputs, seq_dims, dtype, first_only=(), has_state=False, gen=None,
               state_on_first=False):
    """inputs: name -> full tensor; seq_dims: name -> sequence dim (absent: same on every rank).
    The global final state is returned on the last piece's rank (the first's with state_on_first)."""
    state_here = piece.is_first if state_on_first else piece.is_last
    full = {k: v.clone().requires_grad_(v.is_floating_point() or v.is_complex()) for k, v in inputs.items()}
    res = full_fn(**full)
    out, state = res if has_state else (res, None)
    g_out = _randn_like(out, gen)
    g_state = None if state is None else _randn_like(state, gen)
    loss = _dot(out, g_out) + (0 if state is None else _dot(state, g_state))
    loss.backward()

    def cp_run():
        local = {}
        for k, v in inputs.items():
            if k in first_only and not piece.is_first:
                local[k] = None
                continue
            t = piece.cut(v, seq_dims[k]) if k in seq_dims else v
            local[k] = t.clone().requires_grad_(True)
        res = cp_fn(**local)
        o, s = res if has_state else (res, None)
        cut_g = piece.cut(g_out, seq_dims["__out__"])
        loss = _dot(o, cut_g)
        if s is not None and state_here:
            loss = loss + _dot(s, g_state)
        loss.backward()
        grads = {}
        for k, t in local.items():
            if t is None:
                continue
            grad = t.grad if t.grad is not None else torch.zeros_like(t)
            if k not in seq_dims and k not in first_only:
                grad = grad.clone()
                dist.all_reduce(grad)  # the parameter's gradient is the sum of the pieces' shares
            grads[k] = grad
        return o.detach(), None if s is None else s.detach(), grads

    o1, s1, g1 = cp_run()
    o2, s2, g2 = cp_run()
    assert torch.equal(o1, o2) and all(torch.equal(g1[k], g2[k]) for k in g1), f"{name}: not deterministic"
    testing.assert_close(o1, piece.cut(out.detach(), seq_dims["__out__"]), dtype, name=f"{name} out")
    if state is not None and state_here:
        testing.assert_close(s1, state.detach(), torch.float32 if dtype != torch.float64 else dtype,
                             name=f"{name} final state")
    for k, grad in g1.items():
        want = full[k].grad
        if k in seq_dims:
            want = piece.cut(want, seq_dims[k])
        # the computation's dtype, except for parameters of a float32/float64 computation: their
        # own (float32 parameters of a float64 computation hold float32 gradients)
        wide = grad.dtype in (torch.float64, torch.complex128)
        half = dtype in (torch.float16, torch.bfloat16)
        tol_dtype = dtype if k in seq_dims or half else (grad.dtype if wide else torch.float32)
        testing.assert_close(grad, want, tol_dtype, name=f"{name} grad {k}")


def op_checks(piece, dtype, gen):
    L = sum(piece.lengths)
    Bt, D, N = 2, 5, 4
    kw = dict(process_group=None, shard_order=piece.order)
    seq = {"__out__": -1}

    a, b = _rand((Bt, D, L), gen, 0.5, 1.0), _randn((Bt, D, L), gen)
    for reverse in (False, True):
        init_name = "initial_state"  # read on the last piece's rank with reverse: every rank passes it
        compare_op(
            f"linear_scan reverse={reverse}", piece,
            lambda a, b, initial_state: ssm_kernels.linear_scan(a, b, initial_state, reverse, True),
            lambda a, b, initial_state: cp.linear_scan(a, b, initial_state, reverse, True, **kw),
            {"a": a, "b": b, init_name: _randn((Bt, D), gen)}, dict(seq, a=-1, b=-1), torch.float32,
            first_only=() if reverse else (init_name,), has_state=True, gen=gen, state_on_first=reverse)

    ac = torch.polar(_rand((Bt, D, L), gen, 0.5, 1.0), _rand((Bt, D, L), gen, -1.0, 1.0))
    bc = torch.complex(_randn((Bt, D, L), gen), _randn((Bt, D, L), gen))
    compare_op(
        "linear_scan complex", piece,
        lambda a, b, initial_state: ssm_kernels.linear_scan(a, b, initial_state, False, True),
        lambda a, b, initial_state: cp.linear_scan(a, b, initial_state, False, True, **kw),
        {"a": ac, "b": bc, "initial_state": torch.complex(_randn((Bt, D), gen), _randn((Bt, D), gen))},
        dict(seq, a=-1, b=-1), torch.complex64, first_only=("initial_state",), has_state=True, gen=gen)

    u, delta = _randn((Bt, D, L), gen, dtype), _rand((Bt, D, L), gen, -1.0, 0.5, dtype)
    A = -_rand((D, N), gen, 0.5, 2.0)
    Bv, Cv, z = _randn((Bt, N, L), gen, dtype), _randn((Bt, 1, N, L), gen, dtype), _randn((Bt, D, L), gen, dtype)
    compare_op(
        "selective_scan", piece,
        lambda u, delta, A, B, C, D, z, delta_bias, initial_state: ssm_kernels.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, True, initial_state, True),
        lambda u, delta, A, B, C, D, z, delta_bias, initial_state: cp.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, True, initial_state, True, **kw),
        {"u": u, "delta": delta, "A": A, "B": Bv, "C": Cv, "D": _randn((D,), gen), "z": z,
         "delta_bias": _randn((D,), gen), "initial_state": _randn((Bt, D, N), gen)},
        dict(seq, u=-1, delta=-1, B=-1, C=-1, z=-1), dtype, first_only=("initial_state",), has_state=True, gen=gen)
    if dtype == torch.float32:
        Ac = torch.complex(-_rand((D, N), gen, 0.5, 2.0), _randn((D, N), gen))
        compare_op(
            "selective_scan complex A", piece,
            lambda u, delta, A, B, C, initial_state: ssm_kernels.selective_scan(
                u, delta, A, B, C, None, None, None, True, initial_state, True),
            lambda u, delta, A, B, C, initial_state: cp.selective_scan(
                u, delta, A, B, C, None, None, None, True, initial_state, True, **kw),
            {"u": u, "delta": delta, "A": Ac, "B": torch.complex(_randn((Bt, N, L), gen), _randn((Bt, N, L), gen)),
             "C": torch.randn(D, N, dtype=torch.complex64, generator=gen),
             "initial_state": torch.randn(Bt, D, N, dtype=torch.complex64, generator=gen)},
            dict(seq, u=-1, delta=-1, B=-1), dtype, first_only=("initial_state",), has_state=True, gen=gen)

    H, P, G = 4, 3, 2
    x = _randn((Bt, L, H, P), gen, dtype)
    dt = _rand((Bt, L, H), gen, -2.0, 1.0, dtype)
    for dt_limit in ((0.0, float("inf")), (0.05, 0.6)):
        compare_op(
            f"ssd_scan dt_limit={dt_limit}", piece,
            lambda x, dt, A, B, C, D, z, dt_bias, initial_states: ssm_kernels.ssd_scan(
                x, dt, A, B, C, 16, D, z, dt_bias, True, dt_limit, initial_states, None, True),
            lambda x, dt, A, B, C, D, z, dt_bias, initial_states: cp.ssd_scan(
                x, dt, A, B, C, 16, D, z, dt_bias, True, dt_limit, initial_states, None, True, **kw),
            {"x": x, "dt": dt, "A": -_rand((H,), gen, 0.5, 2.0), "B": _randn((Bt, L, G, N), gen, dtype),
             "C": _randn((Bt, L, G, N), gen, dtype), "D": _randn((H, P), gen), "z": _randn((Bt, L, H, P), gen, dtype),
             "dt_bias": _randn((H,), gen), "initial_states": _randn((Bt, H, P, N), gen)},
            {"__out__": 1, "x": 1, "dt": 1, "B": 1, "C": 1, "z": 1}, dtype, first_only=("initial_states",),
            has_state=True, gen=gen)

    for width in (2, 4):
        compare_op(
            f"causal_conv1d width={width}", piece,
            lambda x, weight, bias, initial_states: ssm_kernels.causal_conv1d(
                x, weight, bias, "silu", initial_states, True),
            lambda x, weight, bias, initial_states: cp.causal_conv1d(
                x, weight, bias, "silu", initial_states, True, **kw),
            {"x": _randn((Bt, D, L), gen, dtype), "weight": _randn((D, width), gen), "bias": _randn((D,), gen),
             "initial_states": _randn((Bt, D, width - 1), gen, dtype)},
            dict(seq, x=-1), dtype, first_only=("initial_states",), has_state=True, gen=gen)

    for K in (3, L):
        compare_op(
            f"fftconv K={K}", piece,
            lambda u, k, D, pregate, postgate: ssm_kernels.fftconv(u, k, D, None, pregate, postgate, "gelu"),
            lambda u, k, D, pregate, postgate: cp.fftconv(u, k, D, None, pregate, postgate, "gelu", **kw),
            {"u": _randn((Bt, D, L), gen, dtype), "k": _randn((D, K), gen) / K, "D": _randn((D,), gen),
             "pregate": _randn((Bt, D, L), gen, dtype), "postgate": _randn((Bt, D, L), gen, dtype)},
            dict(seq, u=-1, pregate=-1, postgate=-1), dtype, gen=gen)


def module_checks(piece, gen):
    """nn.Mamba, nn.Mamba2 and nn.LongConv with context_parallel_group: output and every gradient."""
    L = sum(piece.lengths)
    torch.manual_seed(0)
    layers = {
        "Mamba": Mamba(16, d_state=4, d_conv=4),
        "Mamba2": Mamba2(16, d_state=8, headdim=8, chunk_size=16, ngroups=2),
        "LongConv": LongConv(8, l_max=64, filter_order=8, short_filter_order=3),
    }
    for name, layer in layers.items():
        x = _randn((2, L, layer.d_model), gen)
        g = _randn((2, L, layer.d_model), gen)
        xf = x.clone().requires_grad_(True)
        layer.context_parallel_group = None
        layer.zero_grad()
        out_full = layer(xf)
        (out_full * g).sum().backward()
        want = {k: p.grad.clone() for k, p in layer.named_parameters()}
        layer.zero_grad()
        layer.context_parallel_group = dist.group.WORLD
        assert piece.order == list(range(len(piece.order))), "modules use rank order"
        xl = piece.cut(x, 1).clone().requires_grad_(True)
        out = layer(xl)
        (out * piece.cut(g, 1)).sum().backward()
        testing.assert_close(out, piece.cut(out_full, 1), torch.float32, name=f"{name} out")
        with torch.no_grad():
            assert torch.equal(layer(xl), out), f"{name}: no_grad forward differs"
        testing.assert_close(xl.grad, piece.cut(xf.grad, 1), torch.float32, name=f"{name} input grad")
        cp.all_reduce_gradients(layer, dist.group.WORLD)
        for k, p in layer.named_parameters():
            testing.assert_close(p.grad, want[k], torch.float32, name=f"{name} grad {k}")
        layer.context_parallel_group = None


@contextlib.contextmanager
def _counting_collectives():
    """Wrap torch.distributed's collectives: bytes of each call's local input, by collective."""
    counts = {}
    names = ["all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv"]
    saved = {name: getattr(dist, name) for name in names}

    def wrapper(name, fn):
        def call(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            if isinstance(tensor, torch.Tensor):
                counts[name] = counts.get(name, 0) + tensor.numel() * tensor.element_size()
            return fn(*args, **kwargs)
        return call

    for name, fn in saved.items():
        setattr(dist, name, wrapper(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def comm_bytes_check(world):
    """A Mamba2 layer's forward + backward sends the same bytes at two lengths: only metadata,
    the conv halo and the (decay, state) summaries, never activations."""
    torch.manual_seed(0)
    d_model, d_state, headdim, d_conv, batch = 16, 8, 8, 4, 2
    layer = Mamba2(d_model, d_state=d_state, headdim=headdim, d_conv=d_conv, chunk_size=16,
                   context_parallel_group=dist.group.WORLD)
    sent = []
    for local_len in (8, 64):
        x = torch.randn(batch, local_len, d_model, requires_grad=True)
        with cp.comm_stats() as stats, _counting_collectives() as wire:
            layer(x).sum().backward()
        assert wire == {"all_gather": stats.sent}, (wire, stats.sent)  # torch.distributed saw the same
        sent.append(stats.sent)
        labels = sorted({label for label, _ in stats.log})
        assert labels == ["Mamba2:meta", "causal_conv1d:bwd", "causal_conv1d:fwd", "causal_conv1d:meta",
                          "ssd_scan:bwd", "ssd_scan:fwd", "ssd_scan:meta"], labels
    assert sent[0] == sent[1], f"bytes sent depend on the length: {sent}"
    nheads, conv_dim = 2 * d_model // headdim, 2 * d_model + 2 * d_state
    halo = batch * conv_dim * (d_conv - 1) * 4  # float32 conv inputs
    state = batch * nheads * headdim * d_state * 4  # [B, H, P, N] float32
    decay = batch * nheads * 4  # [B, H]
    meta_conv = (3 + world + 6 * 12 + 2) * 8
    meta_ssd = (3 + world + 11 * 12 + 4) * 8
    meta_module = (3 + world + 3 * 12) * 8
    # forward: metadata, halo, (decay, state); backward: the halo's and the state's gradients
    want = meta_module + meta_conv + 2 * halo + meta_ssd + decay + 2 * state
    assert sent[0] == want, f"sent {sent[0]} bytes, cost model says {want}"
    return sent[0]


def all_checks(rank, world, lengths, order, dtypes, with_modules, with_bytes):
    piece = Piece(lengths, order)
    gen = torch.Generator().manual_seed(1234)
    for dtype in dtypes:
        op_checks(piece, dtype, gen)
    if with_modules:
        module_checks(Piece(lengths, list(range(world))), gen)
    if with_bytes:
        compile_checks(rank, world)
        return comm_bytes_check(world)
    return None


def error_checks(rank, world):
    """Each bad call raises ValueError on every rank, with the same message naming the argument."""
    x = torch.randn(2, 4, 6)
    w = torch.randn(4, 3)
    u, delta, A = torch.randn(2, 4, 6), torch.rand(2, 4, 6), -torch.rand(4, 3)
    Bv = torch.randn(2, 3, 6)
    xs, dts, As, Bs = torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2), -torch.rand(2), torch.randn(1, 6, 1, 8)
    other = rank == world - 1
    cases = {
        "x": lambda: cp.causal_conv1d(torch.randn(2, 5, 6) if other else x, w),
        "x ": lambda: cp.causal_conv1d(x.bfloat16() if other else x, w),
        "weight": lambda: cp.causal_conv1d(x, torch.randn(4, 4) if other else w),
        "shard_order": lambda: cp.causal_conv1d(x, w, shard_order=[0] * world),
        "shard_order  ": lambda: cp.causal_conv1d(x, w, shard_order=["a"] * world if other else None),
        "process_group": lambda: cp.linear_scan(u, u, shard_order=list(range(world + 1))),
        "shard_order ": lambda: cp.linear_scan(u, u, shard_order=list(range(world))[::(-1 if other else 1)]),
        "chunk_size": lambda: cp.ssd_scan(xs, dts, As, Bs, Bs, chunk_size=32 if other else 16),
        "initial_states": lambda: cp.ssd_scan(xs, dts, As, Bs, Bs, initial_states=torch.zeros(1, 2, 4, 7)
                                              if rank == 0 else None),
        "initial_state ": lambda: cp.linear_scan(u, u, torch.zeros(2, 5) if other else None, reverse=True),
        "initial_state": lambda: cp.selective_scan(u, delta, A, Bv, Bv, initial_state=torch.zeros(2, 4, 3, 1)
                                                   if rank == 0 else None),
        "u": lambda: cp.selective_scan(u[..., :0] if other else u, delta[..., :0] if other else delta, A,
                                       Bv[..., :0] if other else Bv, Bv[..., :0] if other else Bv),
        "z": lambda: cp.selective_scan(u, delta, A, Bv, Bv, z=torch.randn(2, 4, 5) if other else None),
        "seq_idx": lambda: cp.causal_conv1d(x, w, seq_idx=torch.full((2, 6), world - 1 - rank, dtype=torch.int32)),
        "k_rev": lambda: cp.fftconv(x, w, k_rev=w),
        "u  ": lambda: Mamba2(8, d_state=4, headdim=4, context_parallel_group=dist.group.WORLD)(
            torch.randn(1, 5, 8, dtype=torch.float64 if other else torch.float32)),
    }
    everyone = assert_same_error_on_every_rank(cases, world)
    if os.environ.get("CP_PRINT_ERRORS"):
        return sorted(everyone[0].values())
    # The group is still usable after all these errors: nothing was left half-exchanged.
    y = cp.causal_conv1d(x, w)
    assert y.shape == x.shape
    initial_state_only_grad(rank, world)
    return None


def assert_same_error_on_every_rank(cases: dict, world: int) -> list:
    """Runs each call; every rank must raise a ValueError with the same message, which starts with
    the case's name (stripped: names padded with spaces stand for the same argument). Returns the
    messages of every rank."""
    messages = {}
    for name, call in cases.items():
        try:
            call()
        except ValueError as e:
            messages[name] = str(e)
        else:
            messages[name] = None
    everyone = [None] * world
    dist.all_gather_object(everyone, messages)
    for name in cases:
        got = [m[name] for m in everyone]
        assert got[0] is not None, f"{name.strip()}: no error raised"
        assert all(g == got[0] for g in got), f"{name.strip()}: messages differ between ranks: {got}"
        assert got[0].startswith(name.strip() + ":"), f"{name.strip()}: message does not name it: {got[0]}"
    return everyone


class TinyMamba2LM(torch.nn.Module):
    """Embedding -> residual Mamba2 blocks -> tied head, small enough for a CI step."""

    def __init__(self, vocab=11, d_model=16, n_layer=2, group=None):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, d_model)
        self.mixers = torch.nn.ModuleList(
            Mamba2(d_model, d_state=8, headdim=8, chunk_size=16, context_parallel_group=group) for _ in range(n_layer))
        self.head = torch.nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids):
        x = self.embedding(ids)
        for mixer in self.mixers:
            x = x + mixer(x)
        return self.head(x)


def ddp_checks(rank, world, steps=3):
    """2 data-parallel x 2 context-parallel ranks, data parallelism by DDP and then by FSDP2, a
    context-parallel group inside each replica: losses and parameters follow single-process
    training on the whole batch step for step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))

    def ddp(model):
        return DDP(model, process_group=mesh.get_group("dp"))

    def fsdp2(model):
        for mixer in model.mixers:
            fully_shard(mixer, mesh=mesh["dp"])
        return fully_shard(model, mesh=mesh["dp"])

    for wrap in (ddp, fsdp2):
        _train_dp_cp(mesh, wrap, steps)


def _train_dp_cp(mesh, wrap, steps):
    cp_group = mesh.get_group("cp")
    replica, piece = mesh.get_local_rank("dp"), mesh.get_local_rank("cp")
    gen = torch.Generator().manual_seed(7)
    batch, seqlen, split = 2, 24, 10  # each replica gets `batch` rows; pieces [0, split), [split, seqlen)
    ids = torch.randint(0, 11, (2 * batch, seqlen + 1), generator=gen)
    torch.manual_seed(0)
    ref = TinyMamba2LM()
    torch.manual_seed(0)
    model = wrap(TinyMamba2LM(group=cp_group))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lo, hi = (0, split) if piece == 0 else (split, seqlen)
    rows = slice(replica * batch, (replica + 1) * batch)
    for _ in range(steps):
        logits = ref(ids[:, :-1])
        loss_ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()

        logits = model(ids[rows, lo:hi])
        # this piece's share of the replica's mean loss; DDP / FSDP2 average the replicas
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[rows, lo + 1:hi + 1].flatten(),
                                                 reduction="sum") / (batch * seqlen)
        opt.zero_grad()
        loss.backward()
        cp.all_reduce_gradients(model, cp_group)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        testing.assert_close(total / 2, loss_ref.detach(), torch.float32, name=f"{wrap.__name__} loss")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        testing.assert_close(p.detach(), q.detach(), torch.float32,
                             name=f"{wrap.__name__}: parameter {name} after {steps} steps")


def compile_checks(rank, world):
    """torch.compile (aot_eager: Dynamo + AOTAutograd) of a context-parallel Mamba2 equals eager."""
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, headdim=8, chunk_size=16, context_parallel_group=dist.group.WORLD)
    x = torch.randn(2, 7 + 5 * rank, 16, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    gx, gw = x.grad.clone(), layer.in_proj.weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    y2 = torch.compile(layer, backend="aot_eager")(x)
    y2.square().sum().backward()
    assert torch.equal(y, y2) and torch.equal(gx, x.grad) and torch.equal(gw, layer.in_proj.weight.grad)


def initial_state_only_grad(rank, world):
    """Only the first rank's initial state needs a gradient: every rank's output still requires
    grad (so every rank's backward reaches the exchange) and the gradient is exact."""
    gen = torch.Generator().manual_seed(3)
    a, b = _rand((2, 3, 4 * world), gen, 0.5, 1.0), _randn((2, 3, 4 * world), gen)
    init = _randn((2, 3), gen).requires_grad_(True)
    ssm_kernels.linear_scan(a, b, init).sum().backward()
    local_init = init.detach().clone().requires_grad_(True) if rank == 0 else None
    h = cp.linear_scan(a[..., 4 * rank:4 * rank + 4], b[..., 4 * rank:4 * rank + 4], local_init)
    assert h.requires_grad
    h.sum().backward()
    if rank == 0:
        testing.assert_close(local_init.grad, init.grad, torch.float32, name="initial_state grad")
