import math

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing
from ssm_kernels.testing import assert_close, clone_leaf, dtype_id, make_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEQLENS = [1, 2, 3, 100, 1023, 1024, 1025, 8192, 8193]
KLENS = ["K1", "K=L/3", "K=L", "K>L"]
ACTS = [None, "gelu", "silu"]
# Above this length the direct-sum reference (O(L K) autograd graph) is too slow; a float64
# torch.fft computation written here stands in (test_reference.py validates it at small sizes).
DIRECT_REF_MAX = 1025


def klen_of(kind, L):
    return {"K1": 1, "K=L/3": max(1, L // 3), "K=L": L, "K>L": L + 7}[kind]


def fft_reference(u, k, D=None, k_rev=None, pregate=None, postgate=None, activation=None):
    """float64 FFT evaluation of the same math (zero-padded to 2L, both kernels truncated to L)."""
    L = u.shape[-1]
    n = 2 * L
    v = u.double() if pregate is None else u.double() * pregate.double()

    def causal(x, kern):
        kern = kern.double()[:, :L]
        return torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(kern, n=n), n=n)[..., :L]

    c = causal(v, k)
    if k_rev is not None:
        c = c + causal(v.flip(-1), k_rev).flip(-1)
    if D is not None:
        c = c + D.double()[:, None] * v
    if activation == "gelu":
        c = 0.5 * c * (1 + torch.erf(c / math.sqrt(2)))
    elif activation == "silu":
        c = c * torch.sigmoid(c)
    return c if postgate is None else c * postgate.double()


def make_case(device, dtype, batch, dim, L, K, *, D=False, k_rev=None, pregate=False, postgate=False,
              strided=False):
    u = make_tensor((batch, dim, L), dtype, device, strided=strided)
    k = make_tensor((dim, K), torch.float32, device, scale=1.0 / math.sqrt(min(K, L)))
    args = {
        "u": u,
        "k": k,
        "D": make_tensor((dim,), torch.float32, device) if D else None,
        "k_rev": make_tensor((dim, k_rev), torch.float32, device, scale=1.0 / math.sqrt(min(k_rev, L)))
        if k_rev else None,
        "pregate": make_tensor((batch, dim, L), dtype, device, strided=strided) if pregate else None,
        "postgate": make_tensor((batch, dim, L), dtype, device, strided=strided) if postgate else None,
    }
    return args


GRAD_NAMES = ["u", "k", "D", "k_rev", "pregate", "postgate"]


def check_against(ref_fn, args, activation, dtype, grads=True):
    ours_in = {n: clone_leaf(t) for n, t in args.items()}
    ref_in = {n: clone_leaf(t, torch.float64) for n, t in args.items()}
    out = ssm_kernels.fftconv(**ours_in, activation=activation)
    ref = ref_fn(**ref_in, activation=activation)
    assert out.dtype == args["u"].dtype and out.shape == args["u"].shape
    assert_close(out, ref, dtype, "out")
    if not grads:
        return
    g = torch.randn_like(ref)
    wanted = [ours_in[n] for n in GRAD_NAMES]
    g_ours = testing.grads([out], wanted, [g.to(out.dtype)])
    g_ref = testing.grads([ref], [ref_in[n] for n in GRAD_NAMES], [g])
    for name, a, b, leaf in zip(GRAD_NAMES, g_ours, g_ref, wanted):
        if leaf is None:
            continue
        assert a is not None and a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert_close(a, b, dtype, f"d{name}")


def covering_cases():
    """Every seqlen x klen kind, with dtype and the options rotated so each value appears."""
    cases = []
    i = 0
    for L in SEQLENS:
        for kind in KLENS:
            opts = {
                "D": i % 2 == 0,
                "rev": i % 3 != 1,
                "pre": i % 4 in (1, 2),
                "post": i % 5 in (0, 3, 4),
                "act": ACTS[(i // 3) % 3],
                "dtype": DTYPES[i % 3],
            }
            cases.append((L, kind, opts))
            i += 1
    return cases


def case_id(case):
    L, kind, o = case
    flags = [f for f, on in (("D", o["D"]), ("rev", o["rev"]), ("pre", o["pre"]), ("post", o["post"])) if on]
    return "-".join([f"L{L}", kind.replace("=", "").replace("/", "d").replace(">", "gt"), dtype_id(o["dtype"])]
                    + flags + [o["act"] or "noact"])


@pytest.mark.parametrize("case", covering_cases(), ids=case_id)
def test_fftconv_matches_reference(device, case):
    L, kind, o = case
    K = klen_of(kind, L)
    k_rev = (K + 2 if K > 1 else 1) if o["rev"] else None
    big = L > DIRECT_REF_MAX
    batch, dim = (1, 2) if big else (2, 3)
    args = make_case(device, o["dtype"], batch, dim, L, K, D=o["D"], k_rev=k_rev, pregate=o["pre"],
                     postgate=o["post"])
    check_against(fft_reference if big else reference.fftconv, args, o["act"], o["dtype"])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=dtype_id)
@pytest.mark.parametrize("options", ["none", "all-gelu", "all-silu"])
def test_fftconv_every_dtype(device, dtype, options):
    on = options != "none"
    args = make_case(device, dtype, 3, 4, 257, 100, D=on, k_rev=40 if on else None, pregate=on, postgate=on)
    if dtype == torch.float64:  # float64 parameters go with a float64 u (gradcheck's case)
        args = {n: t.double() if n in ("k", "D", "k_rev") and t is not None else t for n, t in args.items()}
    check_against(reference.fftconv, args, {"none": None, "all-gelu": "gelu", "all-silu": "silu"}[options], dtype)


@pytest.mark.parametrize("layout", ["strided", "channel-last"])
def test_fftconv_strided(device, layout):
    args = make_case(device, torch.float32, 2, 5, 300, 120, D=True, k_rev=30, pregate=True, postgate=True,
                     strided=layout == "strided")
    if layout == "channel-last":
        args = {n: testing.make_channel_last(t) if t is not None and t.dim() == 3 else t for n, t in args.items()}
    args["k"] = make_tensor((5, 240), torch.float32, device)[:, ::2]  # non-contiguous kernel too
    check_against(reference.fftconv, args, "silu", torch.float32)
    contiguous = {n: t.contiguous() if t is not None else None for n, t in args.items()}
    assert torch.equal(ssm_kernels.fftconv(**args, activation="silu"),
                       ssm_kernels.fftconv(**contiguous, activation="silu"))


def test_fftconv_long_65536(device):
    L = 65536
    args = make_case(device, torch.float32, 1, 2, L, L, D=True, k_rev=L // 3, pregate=True, postgate=True)
    check_against(fft_reference, args, "gelu", torch.float32)


def test_fftconv_long_2pow20_forward(device):
    L = 1 << 20
    args = make_case(device, torch.float32, 1, 1, L, L, D=True)
    check_against(fft_reference, args, None, torch.float32, grads=False)


def test_fftconv_batch_rows_share_kernel(device):
    # More batch rows than one CPU block holds (so a channel's rows span several chunks).
    args = make_case(device, torch.float32, 40, 2, 64, 64, D=True, k_rev=5, postgate=True)
    check_against(reference.fftconv, args, "gelu", torch.float32)


@pytest.mark.parametrize("shape", [(0, 3, 10), (2, 0, 10)], ids=["batch0", "dim0"])
def test_fftconv_empty_rows(device, shape):
    # No rows: an empty output, and the parameters' gradients are empty sums (zeros).
    B, dim, L = shape
    args = make_case(device, torch.float32, B, dim, L, 4, D=True, k_rev=3, pregate=True, postgate=True)
    leaves = {n: clone_leaf(t) for n, t in args.items()}
    out = ssm_kernels.fftconv(**leaves, activation="gelu")
    assert out.shape == shape
    grads = torch.autograd.grad(out, [leaves[n] for n in GRAD_NAMES], torch.ones_like(out))
    for name, g in zip(GRAD_NAMES, grads):
        assert g.shape == leaves[name].shape and not g.any(), name


def test_fftconv_gradients_bitwise_reproducible(device):
    args = make_case(device, torch.float32, 4, 6, 500, 500, D=True, k_rev=100, pregate=True, postgate=True)
    g = torch.randn(4, 6, 500, device=device)

    def run():
        leaves = {n: clone_leaf(t) for n, t in args.items()}
        out = ssm_kernels.fftconv(**leaves, activation="gelu")
        return [out] + list(torch.autograd.grad(out, [leaves[n] for n in GRAD_NAMES], g))

    testing.assert_deterministic(run)


def test_fftconv_opcheck(device):
    args = make_case(device, torch.float32, 2, 3, 37, 20, D=True, k_rev=9, pregate=True, postgate=True)
    leaves = [clone_leaf(args[n]) for n in GRAD_NAMES]
    testing.run_opcheck(torch.ops.ssm_kernels.fftconv_fwd, (*leaves, 1))
    plain = make_case(device, torch.float32, 2, 3, 37, 50)
    testing.run_opcheck(torch.ops.ssm_kernels.fftconv_fwd,
                        (clone_leaf(plain["u"]), clone_leaf(plain["k"]), None, None, None, None, 0))
    dout = torch.randn(2, 3, 37, device=device)
    testing.run_opcheck(torch.ops.ssm_kernels.fftconv_bwd, (dout, *[args[n] for n in GRAD_NAMES], 2))


def test_fftconv_compile(device):
    args = make_case(device, torch.float32, 2, 3, 100, 100, D=True, k_rev=10, pregate=True, postgate=True)

    def fn(u, k, D, k_rev, pregate, postgate):
        return ssm_kernels.fftconv(u, k, D, k_rev, pregate, postgate, activation="gelu")

    testing.check_compile(fn, *[args[n] for n in GRAD_NAMES])
    # The backward of the compiled graph (AOT autograd traces fftconv_bwd) agrees with eager.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_in = [clone_leaf(args[n]) for n in GRAD_NAMES]
    comp_in = [clone_leaf(args[n]) for n in GRAD_NAMES]
    g = torch.randn(2, 3, 100, device=device)
    eager_grads = torch.autograd.grad(fn(*eager_in), eager_in, g)
    comp_grads = torch.autograd.grad(compiled(*comp_in), comp_in, g)
    for name, a, b in zip(GRAD_NAMES, comp_grads, eager_grads):
        assert_close(a, b, torch.float32, f"compiled d{name}")


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_fftconv_gradcheck(device, activation):
    args = make_case(device, torch.float64, 2, 2, 7, 4, D=True, k_rev=3, pregate=True, postgate=True)
    args["k"], args["D"], args["k_rev"] = (args[n].double() for n in ("k", "D", "k_rev"))
    inputs = [clone_leaf(args[n]) for n in GRAD_NAMES]
    testing.check_gradcheck(lambda *xs: ssm_kernels.fftconv(*xs, activation=activation), inputs)


def bad(device, **override):
    base = make_case(device, torch.float32, 2, 3, 10, 4, D=True, k_rev=2, pregate=True, postgate=True)
    base.update(override)
    return base


@pytest.mark.parametrize(
    "argname,exc,override",
    [
        ("u", ValueError, {"u": torch.zeros(3, 10)}),
        ("u", TypeError, {"u": torch.zeros(2, 3, 10, dtype=torch.int32)}),
        ("u", TypeError, {"u": [1.0]}),
        ("k", ValueError, {"k": torch.zeros(3, 4, 1)}),
        ("k", ValueError, {"k": torch.zeros(4, 4)}),
        ("k", ValueError, {"k": torch.zeros(3, 0)}),
        ("k", TypeError, {"k": torch.zeros(3, 4, dtype=torch.float16)}),
        ("k", TypeError, {"k": torch.zeros(3, 4, dtype=torch.float64)}),
        ("D", ValueError, {"D": torch.zeros(4)}),
        ("D", TypeError, {"D": torch.zeros(3, dtype=torch.bfloat16)}),
        ("k_rev", ValueError, {"k_rev": torch.zeros(2, 4)}),
        ("k_rev", TypeError, {"k_rev": torch.zeros(3, 4, dtype=torch.int64)}),
        ("pregate", ValueError, {"pregate": torch.zeros(2, 3, 11)}),
        ("pregate", TypeError, {"pregate": torch.zeros(2, 3, 10, dtype=torch.float16)}),
        ("postgate", ValueError, {"postgate": torch.zeros(2, 3)}),
        ("postgate", TypeError, {"postgate": torch.zeros(2, 3, 10, dtype=torch.float64)}),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_fftconv_bad_inputs(device, argname, exc, override):
    override = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in override.items()}
    args = bad(device, **override)
    testing.assert_raises_naming(exc, argname, ssm_kernels.fftconv, **args)


def test_fftconv_bad_activation(device):
    testing.assert_raises_naming(ValueError, "activation", ssm_kernels.fftconv, **bad(device), activation="relu")


def test_fftconv_bad_seqlen(device):
    testing.assert_raises_naming(ValueError, "u", ssm_kernels.fftconv, torch.zeros(1, 3, 0, device=device),
                                 torch.zeros(3, 2, device=device))


@pytest.mark.parametrize(
    "argname,override",
    [("k", {"k": torch.zeros(4, 4)}), ("k_rev", {"k_rev": torch.zeros(3, 0)}), ("D", {"D": torch.zeros(5)}),
     ("pregate", {"pregate": torch.zeros(2, 3, 9)}), ("postgate", {"postgate": torch.zeros(2, 3, 10, dtype=torch.half)})],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_fftconv_op_rechecks(device, argname, override):
    # A direct torch.ops call bypasses the Python checks; the C++ driver must still refuse.
    args = bad(device, **{n: t.to(device) for n, t in override.items()})
    testing.assert_raises_naming((ValueError, TypeError, RuntimeError), argname, torch.ops.ssm_kernels.fftconv_fwd,
                                 *[args[n] for n in GRAD_NAMES], 0)
    dout = torch.zeros(2, 3, 10, device=device)
    testing.assert_raises_naming((ValueError, TypeError, RuntimeError), argname, torch.ops.ssm_kernels.fftconv_bwd,
                                 dout, *[args[n] for n in GRAD_NAMES], 0)
    good = bad(device)
    testing.assert_raises_naming((ValueError, RuntimeError), "activation", torch.ops.ssm_kernels.fftconv_fwd,
                                 *[good[n] for n in GRAD_NAMES], 3)


# (seqlen, klen, klen_rev) whose CPU plan is the hand-written power-of-two FFT, with n from 16
# (m = 8, odd log2: the radix-2 stage) up: no zero-padded half (L = n, K = 1), both kernels, k_rev
# longer than k, and the benchmark's L = K = 4096 (n = 8192).
HAND_CASES = [(9, 8, 3), (20, 13, 8), (33, 32, None), (64, 1, 1), (128, 128, 60), (1000, 1000, 1000),
              (4096, 4096, None)]
HAND_N = {9: 16, 20: 32, 33: 64, 64: 64, 128: 256, 1000: 2048, 4096: 8192}


def hand_id(case):
    L, K, Kr = case
    return f"L{L}-K{K}" + (f"-rev{Kr}" if Kr else "")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", HAND_CASES, ids=hand_id)
def test_fftconv_hand_fft_path(dtype, case):
    # The CPU's own FFT, forward and every gradient, float64 included (float64 tolerance checks
    # the FFT's arithmetic, which the CUDA fused kernel shares).
    L, K, Kr = case
    big = L > DIRECT_REF_MAX
    if big and dtype != torch.float32:
        return
    batch, dim = (1, 2) if big else (2, 3)
    args = make_case("cpu", dtype, batch, dim, L, K, D=True, k_rev=Kr, pregate=L % 2 == 0, postgate=True)
    if dtype == torch.float64:
        args = {n: t.double() if n in ("k", "D", "k_rev") and t is not None else t for n, t in args.items()}
    assert torch.ops.ssm_kernels_test.fftconv_cpu_plan(args["u"], args["k"], args["k_rev"]) == [HAND_N[L], 1]
    check_against(fft_reference if big else reference.fftconv, args, "gelu" if L % 3 else "silu", dtype)


@pytest.mark.parametrize("driver", ["cpu-loops", "gpu-index"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("n", [1 << j for j in range(4, 17)], ids=lambda n: f"n{n}")
def test_fftconv_hand_fft_matches_torch_fft(dtype, n, driver):
    # gpu-index: the butterfly / pair index arithmetic of the CUDA fused kernels, run serially.
    strided = driver == "gpu-index"
    x = torch.randn(3, n, dtype=torch.float64).to(dtype)
    X = torch.ops.ssm_kernels_test.fftconv_fft(x, False, n, strided)
    assert X.shape == (3, n // 2 + 1) and X.dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
    assert_close(X, torch.fft.rfft(x.double()), dtype, "rfft")
    spectrum = torch.fft.rfft(torch.randn(3, n, dtype=torch.float64)).to(X.dtype)
    y = torch.ops.ssm_kernels_test.fftconv_fft(spectrum, True, n, strided)
    assert y.shape == (3, n) and y.dtype == dtype
    assert_close(y, torch.fft.irfft(spectrum.to(torch.complex128), n=n), dtype, "irfft")


@pytest.mark.parametrize(
    "L,K,Kr,plan",
    [(1, 1, None, [16, 1]), (3, 1, None, [16, 1]), (100, 100, None, [256, 1]), (1023, 1023, None, [2048, 1]),
     (1024, 1024, 7, [2048, 1]), (1025, 1025, None, [2160, 0]), (1025, 1, None, [1080, 0]),
     (4096, 4096, None, [8192, 1]), (4097, 4097, None, [8640, 0]),
     (8192, 1, None, [8192, 1]), (8193, 1, None, [8640, 0]), (8192, 8192, None, [16384, 1]),
     (32768, 32768, None, [65536, 1]), (65536, 65536, None, [131072, 0]), (1 << 20, 1 << 20, None, [1 << 21, 0])],
    ids=lambda x: str(x) if not isinstance(x, list) else "-".join(map(str, x)),
)
def test_fftconv_cpu_plan(L, K, Kr, plan):
    # The hand-written FFT runs for power-of-two lengths in [16, 2^16], up to 1024 or within 1.5x
    # of the best 2^a 3^b 5^c length; ATen's FFT (covered above at L = 1025, 8193, 65536, 2^20)
    # for the rest.
    u, k = torch.empty(1, 1, L), torch.empty(1, K)
    k_rev = torch.empty(1, Kr) if Kr else None
    assert torch.ops.ssm_kernels_test.fftconv_cpu_plan(u, k, k_rev) == plan
