import pytest
import torch
import torch.nn.functional as F

import ssm_kernels
from ssm_kernels import reference, testing

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTHS = [2, 3, 4, 5, 6, 7, 8]
# Lengths of the issue plus the kernels' chunk boundaries (512) +-1 and a long sequence.
LENGTHS = [1, 2, 3, 127, 128, 129, 511, 512, 513, 4096]


def make_case(batch, dim, seqlen, width, dtype, device, *, bias=True, init=False, seq=False, layout="contiguous",
              weight_dtype=torch.float32):
    if layout == "channel-last":
        x = testing.make_channel_last(testing.make_tensor((batch, dim, seqlen), dtype, device))
    else:
        x = testing.make_tensor((batch, dim, seqlen), dtype, device, strided=(layout == "strided"))
    case = {
        "x": x,
        "weight": testing.make_tensor((dim, width), weight_dtype, device, scale=width**-0.5),
        "bias": testing.make_tensor((dim,), weight_dtype, device) if bias else None,
        "initial_states": testing.make_tensor((batch, dim, width - 1), dtype, device) if init else None,
        "seq_idx": None,
    }
    if seq:
        # non-decreasing segment ids with a few boundaries per row
        cuts = torch.randint(0, 4, (batch, seqlen), device=device)
        case["seq_idx"] = (torch.cumsum((cuts == 0).int(), dim=1) // 2).to(torch.int32)
    return case


def compare(case, activation, return_final_states, dtype, backward=True):
    names = ["x", "weight", "bias", "initial_states"]
    ours_in = {k: (testing.clone_leaf(v) if k in names else v) for k, v in case.items()}
    ref_in = {k: (testing.clone_leaf(v, torch.float64) if k in names else v) for k, v in case.items()}
    ours = ssm_kernels.causal_conv1d(**ours_in, activation=activation, return_final_states=return_final_states)
    ref = reference.causal_conv1d(**ref_in, activation=activation, return_final_states=return_final_states)
    ours = ours if isinstance(ours, tuple) else (ours,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == case["x"].dtype
        testing.assert_close(a, b, dtype, name=f"output {i}")
    if not backward:
        return
    g_out = [torch.randn_like(r) for r in ref]
    g_ours = testing.grads(ours, [ours_in[n] for n in names], [g.to(o.dtype) for g, o in zip(g_out, ours)])
    g_ref = testing.grads(ref, [ref_in[n] for n in names], g_out)
    for name, a, b in zip(names, g_ours, g_ref):
        if b is not None:
            assert a is not None and a.dtype == case[name].dtype, name
            # a gradient stored in a lower precision than the computation is held to its own dtype
            tol_dtype = a.dtype if testing.tolerance(a.dtype) > testing.tolerance(dtype) else dtype
            testing.assert_close(a, b, tol_dtype, name=f"d{name}")


@pytest.mark.parametrize("mode", ["plain", "full"])
@pytest.mark.parametrize("seqlen", LENGTHS, ids=lambda v: f"L{v}")
@pytest.mark.parametrize("width", WIDTHS, ids=lambda v: f"W{v}")
@pytest.mark.parametrize("dtype", DTYPES, ids=testing.dtype_id)
def test_causal_conv1d_matches_reference(device, dtype, width, seqlen, mode):
    if mode == "plain":
        case = make_case(2, 5, seqlen, width, dtype, device, bias=False)
        compare(case, None, False, dtype)
    else:
        case = make_case(2, 5, seqlen, width, dtype, device, init=True, seq=True, layout="strided")
        compare(case, "silu", True, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "channel-last"])
@pytest.mark.parametrize("options", ["bias-silu", "init-final", "seq-init-final"])
@pytest.mark.parametrize("dtype", DTYPES, ids=testing.dtype_id)
def test_causal_conv1d_layouts_and_options(device, dtype, options, layout):
    case = make_case(3, 67, 1100, 4, dtype, device, bias=True, init="init" in options, seq="seq" in options,
                     layout=layout)
    compare(case, "silu" if options == "bias-silu" else None, "final" in options, dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float16)], ids=["bf16-w32", "f32-wbf16", "f16-w16"])
def test_causal_conv1d_weight_dtype_may_differ(device, x_dtype, w_dtype):
    case = make_case(2, 9, 300, 4, x_dtype, device, weight_dtype=w_dtype, init=True)
    compare(case, "silu", True, x_dtype)


def test_causal_conv1d_long_sequence(device):
    case = make_case(1, 3, 100_003, 4, torch.float32, device, init=True, seq=True)
    compare(case, "silu", True, torch.float32)


def test_causal_conv1d_equals_f_conv1d(device):
    x = testing.make_tensor((2, 16, 77), torch.float32, device)
    w = testing.make_tensor((16, 4), torch.float32, device)
    b = testing.make_tensor((16,), torch.float32, device)
    expected = F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=3, groups=16)[..., :77])
    testing.assert_close(ssm_kernels.causal_conv1d(x, w, b, activation="swish"), expected, torch.float32)


def test_causal_conv1d_seq_idx_equals_separate_sequences(device):
    lengths = [5, 1, 130, 64]
    x = testing.make_tensor((1, 8, sum(lengths)), torch.float32, device)
    w = testing.make_tensor((8, 4), torch.float32, device)
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)]).to(device)[None]
    packed = ssm_kernels.causal_conv1d(x, w, activation="silu", seq_idx=seq_idx)
    pieces = [ssm_kernels.causal_conv1d(part, w, activation="silu") for part in x.split(lengths, dim=-1)]
    testing.assert_close(packed, torch.cat(pieces, dim=-1), torch.float32)


@pytest.mark.parametrize("split", [1, 2, 200, 511])
def test_causal_conv1d_continues_from_final_states(device, split):
    x = testing.make_tensor((2, 6, 512), torch.float32, device)
    w = testing.make_tensor((6, 4), torch.float32, device)
    full = ssm_kernels.causal_conv1d(x, w, activation="silu")
    first, state = ssm_kernels.causal_conv1d(x[..., :split], w, activation="silu", return_final_states=True)
    second = ssm_kernels.causal_conv1d(x[..., split:], w, activation="silu", initial_states=state)
    testing.assert_close(torch.cat([first, second], dim=-1), full, torch.float32)


def test_causal_conv1d_gradients_bitwise_reproducible(device):
    case = make_case(4, 33, 1500, 4, torch.float32, device, init=True, seq=True)

    def run():
        inp = {k: testing.clone_leaf(v) if k != "seq_idx" else v for k, v in case.items()}
        out, fin = ssm_kernels.causal_conv1d(**inp, activation="silu", return_final_states=True)
        (out.sum() + fin.sum()).backward()
        return [inp[k].grad.clone() for k in ("x", "weight", "bias", "initial_states")]

    testing.assert_deterministic(run)


def test_causal_conv1d_gradcheck(device):
    case = make_case(2, 3, 9, 3, torch.float64, device, init=True, seq=True, weight_dtype=torch.float64)
    seq_idx = case["seq_idx"]

    def fn(x, w, b, init):
        out, fin = ssm_kernels.causal_conv1d(x, w, b, "silu", init, True, seq_idx)
        return out, fin

    testing.check_gradcheck(fn, [testing.clone_leaf(case[k]) for k in ("x", "weight", "bias", "initial_states")])


def test_causal_conv1d_opcheck(device):
    case = make_case(2, 5, 70, 4, torch.float32, device, init=True, seq=True)
    args = (testing.clone_leaf(case["x"]), testing.clone_leaf(case["weight"]), testing.clone_leaf(case["bias"]),
            testing.clone_leaf(case["initial_states"]), case["seq_idx"], True)
    testing.run_opcheck(torch.ops.ssm_kernels.causal_conv1d_fwd.default, args)
    dout = testing.make_tensor((2, 5, 70), torch.float32, device)
    dfinal = testing.make_tensor((2, 5, 3), torch.float32, device)
    testing.run_opcheck(torch.ops.ssm_kernels.causal_conv1d_bwd.default,
                (case["x"], case["weight"], case["bias"], case["initial_states"], case["seq_idx"], dout, dfinal, True))
    state = testing.make_tensor((2, 5, 5), torch.float32, device)
    testing.run_opcheck(torch.ops.ssm_kernels.causal_conv1d_update.default,
                (testing.make_tensor((2, 5, 3), torch.float32, device), state, case["weight"], case["bias"], None, True))


def test_causal_conv1d_compile(device):
    case = make_case(2, 5, 70, 4, torch.float32, device, init=True)

    def fn(x, w, b, init):
        return ssm_kernels.causal_conv1d(x, w, b, "silu", init, True)

    testing.check_compile(fn, case["x"], case["weight"], case["bias"], case["initial_states"])

    def step(x, state, w, b):
        return ssm_kernels.causal_conv1d_update(x, state, w, b, "silu")

    state = testing.make_tensor((2, 5, 3), torch.float32, device)
    s1, s2 = state.clone(), state.clone()
    x1 = testing.make_tensor((2, 5), torch.float32, device)
    eager = step(x1, s1, case["weight"], case["bias"])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x1, s2, case["weight"], case["bias"])
    testing.assert_close(compiled, eager, torch.float32)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=testing.dtype_id)
@pytest.mark.parametrize("width", [2, 4, 8], ids=lambda v: f"W{v}")
@pytest.mark.parametrize("seqlen", [None, 1, 5], ids=lambda v: f"L{v}")
def test_causal_conv1d_update_matches_reference(device, dtype, width, seqlen):
    batch, dim, state_len = 4, 7, width + 2
    shape = (batch, dim) if seqlen is None else (batch, dim, seqlen)
    x = testing.make_tensor(shape, dtype, device)
    w = testing.make_tensor((dim, width), torch.float32, device)
    b = testing.make_tensor((dim,), torch.float32, device)
    state = testing.make_tensor((batch + 2, dim, state_len), torch.float32, device, strided=True)
    idx = torch.tensor([3, -1, 0, 5], dtype=torch.int32, device=device)
    ref_state = state.detach().clone()
    out = ssm_kernels.causal_conv1d_update(x, state, w, b, "silu", idx)
    ref_out = reference.causal_conv1d_update(x, ref_state, w, b, "silu", idx)
    assert out.shape == x.shape and out.dtype == x.dtype
    testing.assert_close(out, ref_out, dtype)
    testing.assert_close(state, ref_state, torch.float32)
    assert (out[1] == 0).all()



def test_causal_conv1d_update_padding_and_out_of_range_indices(device):
    # A negative index is a padding row: zeros out, its state row untouched. An index >= the state
    # batch raises on CPU (before any write); on CUDA, where the check would synchronise, the
    # kernel treats it like a negative index.
    x = testing.make_tensor((3, 5), torch.float32, device)
    w = testing.make_tensor((5, 4), torch.float32, device)
    state = testing.make_tensor((2, 5, 3), torch.float32, device)
    before = state.clone()
    out = ssm_kernels.causal_conv1d_update(x, state, w, activation="silu",
                                           conv_state_indices=torch.tensor([-1, 1, -5], dtype=torch.int32,
                                                                           device=device))
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert torch.equal(state[0], before[0])
    assert not torch.equal(state[1], before[1])
    before = state.clone()
    bad = torch.tensor([0, 2, 7], dtype=torch.int32, device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match="conv_state_indices: expected values < conv_state batch 2, got 7"):
            ssm_kernels.causal_conv1d_update(x, state, w, activation="silu", conv_state_indices=bad)
        assert torch.equal(state, before)
    else:
        out = ssm_kernels.causal_conv1d_update(x, state, w, activation="silu", conv_state_indices=bad)
        assert (out[1] == 0).all() and (out[2] == 0).all()
        assert torch.equal(state[1], before[1])


def test_causal_conv1d_bwd_returns_empty_grads_for_absent_inputs(device):
    # The backward convention: gradients typed like their inputs, empty [0] for absent ones.
    x = testing.make_tensor((2, 4, 10), torch.bfloat16, device)
    w = testing.make_tensor((4, 3), torch.float64, device)
    dout = testing.make_tensor((2, 4, 10), torch.float32, device)
    dx, dw, db, dinit = torch.ops.ssm_kernels.causal_conv1d_bwd(x, w, None, None, None, dout, None, True)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dw.shape == w.shape and dw.dtype == w.dtype
    assert db.shape == (0,) and db.dtype == x.dtype
    assert dinit.shape == (0,) and dinit.dtype == x.dtype
    b = testing.make_tensor((4,), torch.float16, device)
    init = testing.make_tensor((2, 4, 2), torch.bfloat16, device)
    _, _, db, dinit = torch.ops.ssm_kernels.causal_conv1d_bwd(x, w, b, init, None, dout, None, True)
    assert db.shape == b.shape and db.dtype == b.dtype
    assert dinit.shape == init.shape and dinit.dtype == init.dtype

def test_causal_conv1d_update_steps_equal_full_conv(device):
    x = testing.make_tensor((2, 6, 20), torch.bfloat16, device)
    w = testing.make_tensor((6, 4), torch.float32, device)
    full = ssm_kernels.causal_conv1d(x, w, activation="silu")
    state = torch.zeros(2, 6, 3, device=device, dtype=torch.bfloat16)
    steps = torch.stack([ssm_kernels.causal_conv1d_update(x[..., t], state, w, activation="silu")
                         for t in range(20)], dim=-1)
    testing.assert_close(steps, full, torch.bfloat16)
    assert torch.equal(state, x[..., -3:])


def _bad_calls(device):
    x = torch.randn(2, 4, 10, device=device)
    w = torch.randn(4, 4, device=device)
    yield "x", TypeError, lambda: ssm_kernels.causal_conv1d(x.int(), w)
    yield "x", ValueError, lambda: ssm_kernels.causal_conv1d(x[0], w)
    yield "x", TypeError, lambda: ssm_kernels.causal_conv1d(x.numpy() if device == "cpu" else [1], w)
    yield "weight", ValueError, lambda: ssm_kernels.causal_conv1d(x, torch.randn(4, 1, device=device))
    yield "weight", ValueError, lambda: ssm_kernels.causal_conv1d(x, torch.randn(4, 9, device=device))
    yield "weight", ValueError, lambda: ssm_kernels.causal_conv1d(x, torch.randn(5, 4, device=device))
    yield "weight", ValueError, lambda: ssm_kernels.causal_conv1d(x, torch.randn(4, 4, device="meta"))
    yield "bias", ValueError, lambda: ssm_kernels.causal_conv1d(x, w, torch.randn(3, device=device))
    yield "activation", ValueError, lambda: ssm_kernels.causal_conv1d(x, w, activation="relu")
    yield "initial_states", ValueError, lambda: ssm_kernels.causal_conv1d(
        x, w, initial_states=torch.randn(2, 4, 2, device=device))
    yield "initial_states", TypeError, lambda: ssm_kernels.causal_conv1d(
        x, w, initial_states=torch.randn(2, 4, 3, device=device, dtype=torch.float64))
    yield "seq_idx", ValueError, lambda: ssm_kernels.causal_conv1d(
        x, w, seq_idx=torch.zeros(2, 9, dtype=torch.int32, device=device))
    yield "seq_idx", TypeError, lambda: ssm_kernels.causal_conv1d(
        x, w, seq_idx=torch.zeros(2, 10, dtype=torch.int64, device=device))
    state = torch.zeros(2, 4, 3, device=device)
    yield "conv_state", ValueError, lambda: ssm_kernels.causal_conv1d_update(x[..., 0], state[..., :2], w)
    yield "conv_state", ValueError, lambda: ssm_kernels.causal_conv1d_update(x[..., 0], state[:1], w)
    yield "conv_state_indices", ValueError, lambda: ssm_kernels.causal_conv1d_update(
        x[..., 0], state, w, conv_state_indices=torch.zeros(3, dtype=torch.int32, device=device))
    if device == "cpu":
        yield "conv_state_indices", ValueError, lambda: ssm_kernels.causal_conv1d_update(
            x[..., 0], state, w, conv_state_indices=torch.tensor([0, 2], dtype=torch.int32))


def test_causal_conv1d_bad_inputs(device):
    for argname, exc, call in _bad_calls(device):
        testing.assert_raises_naming(exc, argname, call)


def test_causal_conv1d_op_checks_arguments_itself(device):
    # A direct torch.ops call bypasses the Python checks; the C++ driver still refuses bad shapes.
    x = torch.randn(2, 4, 10, device=device)
    with pytest.raises(ValueError, match="initial_states"):
        torch.ops.ssm_kernels.causal_conv1d_fwd(x, torch.randn(4, 4, device=device), None,
                                                torch.randn(2, 4, 1, device=device), None, False)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.ssm_kernels.causal_conv1d_fwd(x, torch.randn(4, 12, device=device), None, None, None, False)
    w = torch.randn(4, 4, device=device)
    with pytest.raises(ValueError, match="dout"):
        torch.ops.ssm_kernels.causal_conv1d_bwd(x, w, None, None, None, torch.randn(2, 4, 9, device=device), None,
                                                False)
    with pytest.raises(TypeError, match="seq_idx"):
        torch.ops.ssm_kernels.causal_conv1d_bwd(x, w, None, None, torch.zeros(2, 10, device=device),
                                                torch.randn_like(x), None, False)
    state = torch.zeros(2, 4, 3, device=device)
    with pytest.raises(ValueError, match="conv_state"):
        torch.ops.ssm_kernels.causal_conv1d_update(x, state[..., :2], w, None, None, False)
    if device == "cpu":
        with pytest.raises(ValueError, match="conv_state_indices"):
            torch.ops.ssm_kernels.causal_conv1d_update(x, state, w, None, torch.tensor([0, 5], dtype=torch.int32),
                                                       False)
