import torch

from ssm_kernels import causal_conv1d, reference
from ssm_kernels.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ssm_kernels.testing import assert_close, make_tensor


def test_causal_conv1d_fn_signature_and_final_states_out(device):
    x = make_tensor((2, 8, 50), torch.float32, device)
    w = make_tensor((8, 4), torch.float32, device)
    b = make_tensor((8,), torch.float32, device)
    init = make_tensor((2, 8, 3), torch.float32, device)
    seq_idx = torch.zeros(2, 50, dtype=torch.int32, device=device)
    final_out = torch.empty(2, 8, 3, device=device)
    out, fin = causal_conv1d_fn(x, w, b, seq_idx, init, True, final_out, "silu")
    ref_out, ref_fin = reference.causal_conv1d(x, w, b, "silu", init, True, seq_idx)
    assert fin is final_out
    assert_close(out, ref_out, torch.float32)
    assert_close(final_out, ref_fin, torch.float32)
    assert_close(causal_conv1d_fn(x, w, activation="swish"), reference.causal_conv1d(x, w, activation="silu"),
                 torch.float32)


def test_causal_conv1d_update_circular_buffer(device):
    batch, dim, width, state_len = 3, 5, 4, 7
    x = make_tensor((batch, dim, 30), torch.float32, device)
    w = make_tensor((dim, width), torch.float32, device)
    history = make_tensor((batch, dim, width - 1), torch.float32, device)
    full = causal_conv1d(x, w, activation="silu", initial_states=history)
    # circular buffers whose next write positions differ per row, holding `history` as the
    # newest width-1 entries
    seqlens = torch.tensor([0, 5, 13], dtype=torch.int32, device=device)
    state = make_tensor((batch, dim, state_len), torch.float32, device)
    for i in range(batch):
        for j in range(width - 1):
            pos = (int(seqlens[i]) - (width - 1) + j) % state_len
            state[i, :, pos] = history[i, :, j]
    outs = []
    for t in range(30):
        outs.append(causal_conv1d_update(x[..., t], state, w, activation="silu", cache_seqlens=seqlens))
        seqlens = seqlens + 1
    assert_close(torch.stack(outs, dim=-1), full, torch.float32)
