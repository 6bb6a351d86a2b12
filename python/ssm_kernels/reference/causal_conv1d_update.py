"""Float64 loop-form reference for the causal depthwise conv1d decode step."""

import torch
import torch.nn.functional as F

from ._state_rows import gather_state_rows, scatter_state_rows


def _activate(y, activation):
    return y if activation is None else F.silu(y)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         conv_state_indices=None):
    """Causal depthwise conv1d over new inputs that continue a cached window, in float64.

    Shapes:
        x: [B, D] (one step) or [B, D, L]
        conv_state: [B_state, D, S], S >= W - 1; updated in place
        weight: [D, W]; bias: [D]
        conv_state_indices: [B] int; row i uses conv_state[conv_state_indices[i]] (row i when
            None); a negative index leaves the state untouched and gives zeros.

    Math, for each new input x_t in order, with the window w = cat(state, x_t) of length S + 1:
        out_t = act(bias + sum_{k<W} weight[:, k] * w[S + 1 - W + k])
        state = w[1:]   (shift left by one, append x_t)
    act: None, "silu" or "swish" (= silu); anything else raises ValueError. This matches
    ``causal_conv1d_update`` of the causal-conv1d package (without cache_seqlens).

    The new state is copied back into ``conv_state`` in its own dtype. Returns out (shape of x)
    in float64. Differentiable in x, weight and bias.

    Example:
        >>> conv_state = torch.zeros(2, 4, 3)
        >>> out = causal_conv1d_update(torch.randn(2, 4), conv_state, torch.randn(4, 4))
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    squeeze = x.ndim == 2
    x = x.to(torch.float64)
    if squeeze:
        x = x.unsqueeze(-1)  # [B, D, L]
    weight = weight.to(torch.float64)  # [D, W]
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]

    rows, valid, state = gather_state_rows(conv_state, conv_state_indices, batch, x.device)  # state [B, D, S]

    outs = []
    for t in range(seqlen):
        window = torch.cat([state, x[:, :, t, None]], dim=-1)  # [B, D, S + 1]
        taps = window[:, :, state_len + 1 - width:]  # [B, D, W]
        y = (weight * taps).sum(-1)  # [B, D]
        if bias is not None:
            y = y + bias.to(torch.float64)
        outs.append(_activate(y, activation))
        state = window[:, :, 1:]
    out = torch.stack(outs, dim=-1)  # [B, D, L]
    out = torch.where(valid[:, None, None], out, torch.zeros_like(out))

    scatter_state_rows(conv_state, rows, state)
    return out.squeeze(-1) if squeeze else out
