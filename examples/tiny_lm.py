"""A small language model of Mamba, Mamba-2 or Mamba-3 blocks and the selective-copying task, shared by the
examples (train_selective_copying.py, generate.py)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssm_kernels.nn import Mamba, Mamba2, Mamba3

NOISE, MARKER = 0, 1  # token ids; data tokens are 2 .. 2 + n_tokens - 1


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(rmsnorm(x))."""

    def __init__(self, mixer: nn.Module, d_model: int):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = mixer

    def forward(self, x, *state):
        if isinstance(self.mixer, Mamba3):
            # state: (angle, ssm, k, v), or (None, None) for none
            y, new_state = self.mixer(self.norm(x), initial_states=state if len(state) == 4 else None,
                                      return_final_states=True)
            return x + y, new_state
        conv_state, ssm_state = state
        y, conv_state, ssm_state = self.mixer(self.norm(x), conv_state=conv_state, ssm_state=ssm_state,
                                              return_final_states=True)
        return x + y, (conv_state, ssm_state)

    def step(self, x, state):
        if isinstance(self.mixer, Mamba3):
            return x + self.mixer.step(self.norm(x)[:, 0], state)[:, None]  # updates state in place
        y, _, _ = self.mixer.step(self.norm(x), *state)  # updates state in place
        return x + y


class TinyLM(nn.Module):
    """Embedding -> n_layer blocks -> RMSNorm -> tied output head.

    mixer: "mamba" (Mamba-1 blocks), "mamba2" (Mamba-2 blocks, headdim dividing 2 * d_model) or
    "mamba3" (Mamba-3 SISO blocks, the same headdim rule).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layer: int = 2, mixer: str = "mamba",
                 d_state: int = 16, headdim: int = 32, chunk_size: int = 64):
        super().__init__()
        if mixer not in ("mamba", "mamba2", "mamba3"):
            raise ValueError(f"mixer: expected 'mamba', 'mamba2' or 'mamba3', got {mixer!r}")
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)  # small logits at init (the head is tied)
        self.layers = nn.ModuleList()
        for i in range(n_layer):
            if mixer == "mamba":
                block = Mamba(d_model, d_state=d_state, layer_idx=i)
            elif mixer == "mamba2":
                block = Mamba2(d_model, d_state=d_state, headdim=headdim, chunk_size=chunk_size, layer_idx=i)
            else:
                block = Mamba3(d_model, d_state=d_state, headdim=headdim, chunk_size=chunk_size, layer_idx=i)
            self.layers.append(Block(block, d_model))
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor, states=None, return_states: bool = False):
        """ids [B, L] -> logits [B, L, V] (and the per-layer states after the last position)."""
        x = self.embedding(ids)
        new_states = []
        for i, layer in enumerate(self.layers):
            x, st = layer(x, *(states[i] if states is not None else (None, None)))
            new_states.append(st)
        logits = self.lm_head(self.norm_f(x))
        return (logits, new_states) if return_states else logits

    def step(self, ids: torch.Tensor, states) -> torch.Tensor:
        """One decode step: ids [B] -> logits [B, V]; states (from forward) are updated in place."""
        x = self.embedding(ids)[:, None]  # [B, 1, D]
        for layer, st in zip(self.layers, states):
            x = layer.step(x, st)
        return self.lm_head(self.norm_f(x))[:, 0]


def selective_copying_batch(batch: int, seq_len: int, n_data: int, n_tokens: int, generator=None):
    """The selective-copying task of the Mamba paper.

    Inputs [B, seq_len + n_data]: n_data random data tokens at random positions of a length-seq_len
    run of NOISE tokens, then n_data MARKER tokens. Targets [B, n_data]: the data tokens in order,
    to be predicted at the MARKER positions.
    """
    data = torch.randint(2, 2 + n_tokens, (batch, n_data), generator=generator)
    positions = torch.rand(batch, seq_len, generator=generator).argsort(dim=1)[:, :n_data].sort(dim=1).values
    ids = torch.full((batch, seq_len + n_data), NOISE, dtype=torch.long)
    ids.scatter_(1, positions, data)
    ids[:, seq_len:] = MARKER
    return ids, data


def copying_loss(model: TinyLM, ids: torch.Tensor, targets: torch.Tensor):
    """Cross-entropy and accuracy of the predictions at the MARKER positions."""
    n_data = targets.shape[1]
    logits = model(ids)[:, -n_data:]  # [B, n_data, V]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, accuracy
