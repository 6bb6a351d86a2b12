"""The state rows a reference decode step reads and writes back (state-index arguments)."""
from typing import Optional

import torch


def gather_state_rows(state: torch.Tensor, indices: Optional[torch.Tensor], batch: int, device):
    """rows[i] = indices[i] (i when indices is None); a negative index marks a padding entry
    whose output is zero and whose state is left alone. Returns (rows, valid [batch] bool on
    device, the rows' states in float64 on device)."""
    rows = list(range(batch)) if indices is None else [int(i) for i in indices.tolist()]
    valid = torch.tensor([r >= 0 for r in rows], device=device)
    states = state.detach()[torch.tensor([max(r, 0) for r in rows], device=state.device)]
    return rows, valid, states.to(device=device, dtype=torch.float64)


def scatter_state_rows(state: torch.Tensor, rows, new: torch.Tensor) -> None:
    """Writes new[i] back to state[rows[i]] for the non-padding entries."""
    with torch.no_grad():
        for i, r in enumerate(rows):
            if r >= 0:
                state[r].copy_(new[i])
