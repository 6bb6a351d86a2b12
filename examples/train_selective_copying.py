"""Train a small Mamba or Mamba-2 model on selective copying, on CPU (or CUDA when present).

    python examples/train_selective_copying.py --mixer mamba
    python examples/train_selective_copying.py --mixer mamba2 --batch-size 16 --lr 1e-2 --steps 300
    python examples/train_selective_copying.py --mixer mamba3 --batch-size 16 --lr 1e-2 --steps 300

The loss starts at about log(n_tokens) and falls as the model learns to pick the data tokens out
of the noise and replay them in order.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_lm import TinyLM, copying_loss, selective_copying_batch  # noqa: E402


def add_task_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The selective-copying task and the size of the TinyLM that learns it (generate.py takes the
    same options and trains with them before it generates)."""
    p.add_argument("--mixer", choices=["mamba", "mamba2", "mamba3"], default="mamba")
    p.add_argument("--seq-len", type=int, default=32, help="length of the noisy run holding the data tokens")
    p.add_argument("--n-data", type=int, default=4, help="data tokens to copy")
    p.add_argument("--n-tokens", type=int, default=8, help="size of the data vocabulary")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--headdim", type=int, default=32, help="Mamba-2 head size")
    p.add_argument("--seed", type=int, default=0)
    return p


def task_argv(args: argparse.Namespace) -> list:
    """The task and model options of args as command-line words for main."""
    names = vars(add_task_options(argparse.ArgumentParser()).parse_args([]))
    return [word for name in names for word in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_options(p)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = TinyLM(args.n_tokens + 2, d_model=args.d_model, n_layer=args.n_layer, mixer=args.mixer,
                   d_state=args.d_state, headdim=args.headdim).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(1, args.steps))))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.mixer}: {n_params} parameters, chance loss {math.log(args.n_tokens):.3f}")
    losses, start = [], time.time()
    for step in range(args.steps):
        ids, targets = selective_copying_batch(args.batch_size, args.seq_len, args.n_data, args.n_tokens, gen)
        loss, acc = copying_loss(model, ids.to(args.device), targets.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  acc {acc.item():.3f}  {time.time() - start:7.1f}s")
    model.eval()
    with torch.no_grad():
        ids, targets = selective_copying_batch(256, args.seq_len, args.n_data, args.n_tokens, gen)
        eval_loss, eval_acc = copying_loss(model, ids.to(args.device), targets.to(args.device))
    print(f"eval: loss {eval_loss.item():.4f}  accuracy {eval_acc.item():.3f}")
    return {"losses": losses, "eval_loss": eval_loss.item(), "eval_accuracy": eval_acc.item(), "model": model}


if __name__ == "__main__":
    main()
