"""The batched GEMM behind ssd_scan (BLAS on the CPU, the tensor-core kernel on CUDA), on its own.

On CUDA the operands are rounded to the tensor-core precision that `in_dtype` selects (float16,
bfloat16, or 3xTF32 for float32); the expected result rounds them the same way and multiplies in
float64, so only the float32 accumulation error remains. The zero structures (`tri`) are checked
on matrices that have them, against a full product.
"""
import pytest
import torch

from ssm_kernels.testing import assert_close, dtype_id

gemm = torch.ops.ssm_kernels_test.ssd_gemm

TRI_NONE, TRI_LOWER_A, TRI_UPPER_A, TRI_LOWER_OUT = 0, 1, 2, 3


def operand(batch, rows, cols, device, transposed, dtype=torch.float32):
    """[batch, rows, cols]; transposed: a column-major view (stride 1 along rows)."""
    if transposed:
        return torch.randn(batch, cols, rows, dtype=dtype, device=device).transpose(1, 2)
    return torch.randn(batch, rows, cols, dtype=dtype, device=device)


def expected_product(a, b, in_dtype, device):
    if device == "cuda" and in_dtype in (torch.float16, torch.bfloat16):
        a, b = a.to(in_dtype), b.to(in_dtype)
    return a.double() @ b.double()


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "batch,M,N,K",
    [(1, 1, 1, 1), (3, 17, 33, 5), (2, 64, 64, 32), (2, 65, 63, 33), (1, 130, 200, 256), (5, 256, 64, 128)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
def test_gemm_matches_float64_product(device, in_dtype, batch, M, N, K, layout):
    a = operand(batch, M, K, device, layout[0] == "t")
    b = operand(batch, K, N, device, layout[1] == "t")
    out = gemm(a, b, in_dtype, TRI_NONE, None)
    assert out.shape == (batch, M, N) and out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, expected_product(a, b, in_dtype, device), torch.float32)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("Q", [16, 64, 100, 256])
def test_gemm_zero_structures(device, in_dtype, Q):
    batch, P = 3, 40
    lower = torch.tril(torch.randn(batch, Q, Q, device=device))
    x = operand(batch, Q, P, device, False)
    full = expected_product(lower, x, in_dtype, device)
    assert_close(gemm(lower, x, in_dtype, TRI_LOWER_A, None), full, torch.float32, "lower A")
    upper = lower.transpose(1, 2)  # a strided view, as the driver passes GL^T
    assert_close(gemm(upper, x, in_dtype, TRI_UPPER_A, None), expected_product(upper, x, in_dtype, device),
                 torch.float32, "upper A")
    c = operand(batch, Q, P, device, False)
    bt = operand(batch, P, Q, device, True)
    out = gemm(c, bt, in_dtype, TRI_LOWER_OUT, None)
    want = expected_product(c, bt, in_dtype, device)
    mask = torch.ones(Q, Q, dtype=torch.bool, device=device).tril()
    assert torch.isfinite(out).all()
    assert_close(out * mask, want * mask, torch.float32, "lower out")


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_gemm_accumulates(device, in_dtype):
    a = operand(4, 70, 50, device, True)
    b = operand(4, 50, 90, device, False)
    acc = torch.randn(4, 70, 90, device=device)
    out = gemm(a, b, in_dtype, TRI_NONE, acc)
    assert_close(out, acc.double() + expected_product(a, b, in_dtype, device), torch.float32)


def test_gemm_float64(device):
    a = operand(2, 33, 20, device, True, torch.float64)
    b = operand(2, 20, 7, device, False, torch.float64)
    assert_close(gemm(a, b, torch.float64, TRI_NONE, None), a @ b, torch.float64)


def test_gemm_bad_arguments(device):
    a = torch.randn(2, 8, 4, device=device)
    with pytest.raises(ValueError, match="a, b"):
        gemm(a, torch.randn(2, 5, 3, device=device), torch.float32, 0, None)
    with pytest.raises(TypeError, match="a, b"):
        gemm(a, torch.randn(2, 4, 3, device=device, dtype=torch.float64), torch.float32, 0, None)
    with pytest.raises(ValueError, match="tri"):
        gemm(a, torch.randn(2, 4, 3, device=device), torch.float32, 7, None)
    with pytest.raises(ValueError, match="acc"):
        gemm(a, torch.randn(2, 4, 3, device=device), torch.float32, 0, torch.zeros(2, 8, 4, device=device))
