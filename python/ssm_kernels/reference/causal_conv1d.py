"""float64 reference of causal_conv1d (loop over the taps)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    seq_idx: Optional[torch.Tensor] = None,
):
    """out[b, d, t] = act(bias[d] + sum_{k<W} weight[d, k] * x[b, d, t - W + 1 + k]), in float64.

    x: [B, D, L]; weight: [D, W]; bias: [D]; initial_states: [B, D, W-1] (inputs at positions
    -W+1..-1, zeros if None); seq_idx: [B, L]: tap p feeds output t only if both are in the same
    sequence, positions p < 0 counting as the sequence of position 0. final_states: the inputs at
    positions L-W+1..L-1, zeroed where they lie in another sequence than position L-1.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")
    x = x.to(torch.float64)
    weight = weight.to(torch.float64)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if initial_states is None:
        history = x.new_zeros(batch, dim, width - 1)
    else:
        history = initial_states.to(torch.float64)
    xpad = torch.cat([history, x], dim=-1)  # [B, D, W-1+L], slot i = position i-(W-1)
    positions = torch.arange(-(width - 1), seqlen, device=x.device)
    if seq_idx is not None:
        seq_of_slot = seq_idx.long()[:, positions.clamp(min=0)]  # [B, W-1+L]
    out = x.new_zeros(batch, dim, seqlen)
    for k in range(width):
        tap = xpad[:, :, k : k + seqlen]  # [B, D, L]: position t-W+1+k for each t
        if seq_idx is not None:
            same = (seq_of_slot[:, k : k + seqlen] == seq_idx.long()).to(x.dtype)  # [B, L]
            tap = tap * same[:, None, :]
        out = out + weight[:, k, None] * tap
    if bias is not None:
        out = out + bias.to(torch.float64)[:, None]
    if activation is not None:
        out = F.silu(out)
    if not return_final_states:
        return out
    final_states = xpad[:, :, seqlen:]  # [B, D, W-1]
    if seq_idx is not None:
        keep = (seq_of_slot[:, seqlen:] == seq_idx.long()[:, -1:]).to(x.dtype)  # [B, W-1]
        final_states = final_states * keep[:, None, :]
    return out, final_states
