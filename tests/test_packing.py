"""ssm_kernels.packing: list <-> packed, padded batch + mask <-> packed, cu_seqlens -> seq_idx."""
import pytest
import torch

import ssm_kernels
from ssm_kernels import packing
from ssm_kernels.testing import assert_raises_naming


def test_pack_unpack_round_trip_with_empty_sequences(device):
    seqs = [torch.randn(n, 3, device=device) for n in (4, 0, 1, 7)]
    packed, cu = packing.pack(seqs)
    assert packed.shape == (1, 12, 3)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 4, 4, 5, 12] and cu.device == packed.device
    back = packing.unpack(packed, cu)
    assert len(back) == 4
    for s, b in zip(seqs, back):
        assert torch.equal(s, b)


def test_pack_along_last_axis_for_the_ops(device):
    seqs = [torch.randn(2, n, device=device) for n in (3, 5)]  # [D, L_i]
    packed, cu = packing.pack(seqs, dim=-1)
    assert packed.shape == (1, 2, 8)
    back = packing.unpack(packed, cu, dim=-1)
    assert all(torch.equal(s, b) for s, b in zip(seqs, back))


def test_pack_is_differentiable(device):
    seqs = [torch.randn(n, 2, device=device, requires_grad=True) for n in (2, 3)]
    packed, _ = packing.pack(seqs)
    (packed * torch.arange(5., device=device)[None, :, None]).sum().backward()
    assert torch.equal(seqs[1].grad[:, 0], torch.tensor([2., 3., 4.], device=device))


def test_pad_to_packed_and_back(device):
    x = torch.randn(3, 5, 2, device=device, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], device=device)
    packed, cu = packing.pad_to_packed(x, mask)
    assert packed.shape == (1, 8, 2) and cu.tolist() == [0, 3, 3, 8]
    assert torch.equal(packed[0, :3], x[0, :3]) and torch.equal(packed[0, 3:], x[2])
    padded = packing.packed_to_pad(packed, mask)
    assert torch.equal(padded, x * mask[..., None])
    padded.sum().backward()
    assert torch.equal(x.grad, mask[..., None].expand_as(x).to(x.dtype))


def test_left_padded_mask(device):
    x = torch.arange(8., device=device).view(2, 4, 1)
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool, device=device)
    packed, cu = packing.pad_to_packed(x, mask)
    assert packed[0, :, 0].tolist() == [2., 3., 5., 6., 7.] and cu.tolist() == [0, 2, 5]


def test_cu_seqlens_to_seq_idx(device):
    cu = torch.tensor([0, 0, 3, 3, 4, 6], dtype=torch.int64, device=device)
    seq_idx = packing.cu_seqlens_to_seq_idx(cu, 6)
    assert seq_idx.dtype == torch.int32 and seq_idx.shape == (1, 6)
    assert seq_idx.tolist() == [[1, 1, 1, 3, 4, 4]]
    assert packing.lengths_to_cu_seqlens(torch.tensor([2, 0, 3], device=device)).tolist() == [0, 2, 2, 5]


def test_packed_scan_from_padded_batch_matches_padded_rows(device):
    # The usual flow: padded batch + mask -> packed scan -> padded output equals each row's own
    # scan over its tokens.
    x = torch.randn(2, 6, 3, device=device)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    packed, cu = packing.pad_to_packed(x, mask)  # [1, T, 3]
    a = torch.full_like(packed, 0.9)
    h = ssm_kernels.linear_scan(a.transpose(1, 2), packed.transpose(1, 2), cu_seqlens=cu).transpose(1, 2)
    padded = packing.packed_to_pad(h, mask)
    for row, n in enumerate((4, 6)):
        own = ssm_kernels.linear_scan(torch.full((3, n), 0.9, device=device), x[row, :n].T).T
        assert torch.equal(padded[row, :n], own)
        assert torch.equal(padded[row, n:], torch.zeros_like(padded[row, n:]))


def test_bad_input(device):
    assert_raises_naming(ValueError, "seqs", packing.pack, [])
    assert_raises_naming(ValueError, "dim", packing.pack, [torch.zeros(2, 3)], dim=2)
    assert_raises_naming(ValueError, "mask", packing.pad_to_packed, torch.zeros(2, 3, 1), torch.ones(2, 4))
    assert_raises_naming(ValueError, "packed", packing.unpack, torch.zeros(2, 3), torch.tensor([0, 3]))
    assert_raises_naming(ValueError, "cu_seqlens", packing.cu_seqlens_to_seq_idx, torch.tensor([0]), 3)
    assert_raises_naming(ValueError, "lengths", packing.lengths_to_cu_seqlens, torch.tensor([1.5]))


@pytest.mark.parametrize("name", packing.__all__)
def test_documented(name):
    assert getattr(packing, name).__doc__
    assert ssm_kernels.packing is packing
