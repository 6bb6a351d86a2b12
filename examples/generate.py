"""Greedy generation with the recurrent step() of Mamba / Mamba-2 blocks, checked against
re-running the full-sequence forward for every new token.

    python examples/generate.py --mixer mamba2 --train-steps 200

The prompt is a selective-copying input (data tokens in noise, then markers); after a short
training run the continuation replays the data tokens. Decoding costs O(1) per token with step()
(the conv and SSM states are carried), O(length) with the full forward; both give the same tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_selective_copying  # noqa: E402
from tiny_lm import MARKER, TinyLM, selective_copying_batch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_selective_copying.add_task_options(p)
    p.add_argument("--train-steps", type=int, default=200, help="selective-copying training steps first (0: random weights)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    return p.parse_args(argv)


@torch.no_grad()
def generate_with_step(model: TinyLM, prompt: torch.Tensor, new_tokens: int):
    """Prefill the prompt with one forward (keeping the states), then one step() per token."""
    logits, states = model(prompt, return_states=True)
    token = logits[:, -1].argmax(-1)  # [B]
    out, all_logits = [token], [logits[:, -1]]
    for _ in range(new_tokens - 1):
        step_logits = model.step(token, states)
        token = step_logits.argmax(-1)
        out.append(token)
        all_logits.append(step_logits)
    return torch.stack(out, dim=1), torch.stack(all_logits, dim=1)


@torch.no_grad()
def generate_with_forward(model: TinyLM, prompt: torch.Tensor, new_tokens: int):
    """Re-run the whole sequence for every new token (the slow way, for comparison)."""
    ids, out, all_logits = prompt, [], []
    for _ in range(new_tokens):
        logits = model(ids)[:, -1]
        token = logits.argmax(-1)
        out.append(token)
        all_logits.append(logits)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return torch.stack(out, dim=1), torch.stack(all_logits, dim=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.train_steps > 0:
        model = train_selective_copying.main(train_selective_copying.task_argv(args) + [
            "--steps", str(args.train_steps), "--device", "cpu", "--log-every", str(max(1, args.train_steps // 4))
        ])["model"]
    else:
        model = TinyLM(args.n_tokens + 2, d_model=args.d_model, n_layer=args.n_layer, mixer=args.mixer,
                       d_state=args.d_state, headdim=args.headdim)
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt, data = selective_copying_batch(args.batch_size, args.seq_len, args.n_data, args.n_tokens, gen)
    prompt = prompt[:, :-(args.n_data - 1)] if args.n_data > 1 else prompt  # noise run + first marker
    assert (prompt[:, -1] == MARKER).all()

    start = time.time()
    step_tokens, step_logits = generate_with_step(model, prompt, args.new_tokens)
    t_step = time.time() - start
    start = time.time()
    full_tokens, full_logits = generate_with_forward(model, prompt, args.new_tokens)
    t_full = time.time() - start

    for b in range(args.batch_size):
        print(f"data {data[b].tolist()}  step() {step_tokens[b].tolist()}  forward {full_tokens[b].tolist()}")
    same = torch.equal(step_tokens, full_tokens)
    err = ((step_logits - full_logits).abs().max() / full_logits.abs().max()).item()
    print(f"step() and full forward give the same tokens: {same} (max relative logit difference {err:.2e}); "
          f"time {t_step:.3f}s with step(), {t_full:.3f}s with forward")
    return {"step_tokens": step_tokens, "forward_tokens": full_tokens, "step_logits": step_logits,
            "forward_logits": full_logits, "same": same}


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["same"] else 1)
