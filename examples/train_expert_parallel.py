"""Train a small MoE classifier with expert parallelism on torch.distributed, checkpointing as it goes.

    torchrun --nproc-per-node 2 examples/train_expert_parallel.py --ckpt runs/ep/ckpt

Runs under ``torchrun --nproc-per-node N`` (N = 1, 2, 4 on CPU with gloo; plain ``python`` = one process).
The experts of the MoE layer are spread over the N ranks (E must be divisible by N); each rank trains on
its slice of every global batch. Every ``--ckpt-every`` steps the model, the optimizer, the RNG and the
loss history are saved atomically to the DCP checkpoint directory ``--ckpt``. Killed at any moment (even with SIGKILL) and started
again with the same command, it resumes from the last checkpoint, and its loss curve (``--log``, one
JSON line per step: the global-batch mean loss) is bit-identical to an uninterrupted run's.

Data: scikit-learn's 8×8 digits (1,797 images, shipped with scikit-learn); the global batch of every
step is drawn from a generator seeded by (seed, step), so it does not depend on where a run resumed.
Legend: B global batch, b = B/N per rank, F = 64 pixels, D model dim, C = 10 classes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from moekit import MoE, checkpoint
from moekit.parallel import expert_parallel, sync_gradients


class DigitsMoE(nn.Module):
    """pixels → Linear → x + MoE(x) → Linear → class logits."""

    def __init__(self, dim: int = 32, hidden: int = 64, experts: int = 8):
        super().__init__()
        self.inp = nn.Linear(64, dim)
        self.moe = MoE(dim, hidden, experts, top_k=2, router="topk", expert="glu")
        self.out = nn.Linear(dim, 10)

    def forward(self, x_bF):
        h_bD = torch.tanh(self.inp(x_bF))
        moe = self.moe(h_bD)
        return self.out(h_bD + moe.y), moe.aux_loss


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (resumed from when it exists)")
    p.add_argument("--log", type=Path, default=None, help="loss log, one JSON line per step (default: next to --ckpt)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    p.add_argument("--ckpt-every", type=int, default=10, help="steps between checkpoints (default: 10)")
    p.add_argument("--batch", type=int, default=64, help="global batch size, divisible by the world size (default: 64)")
    p.add_argument("--experts", type=int, default=8, help="experts, divisible by the world size (default: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default: 0)")
    args = p.parse_args(argv)
    for flag, v in (("--steps", args.steps), ("--ckpt-every", args.ckpt_every), ("--batch", args.batch),
                    ("--experts", args.experts)):
        if v < 1:
            p.error(f"{flag}: must be a positive int, got {v}")
    if not (args.lr > 0 and args.lr < float("inf")):
        p.error(f"--lr: must be a positive finite number, got {args.lr}")
    return p, args


def main(argv=None) -> int:
    parser, args = parse(argv)
    if "RANK" not in os.environ:                       # plain `python`: a one-process group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"),
                          RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    W, rank = dist.get_world_size(), dist.get_rank()
    if args.batch % W or args.experts % W:
        parser.error(f"--batch ({args.batch}) and --experts ({args.experts}) must be divisible by the "
                     f"number of processes ({W})")
    torch.set_num_threads(1)
    log = args.log or args.ckpt.with_name(args.ckpt.name + ".losses.jsonl")
    X, Y = load_digits()
    torch.manual_seed(args.seed)
    model = DigitsMoE(experts=args.experts)
    expert_parallel(model, init_device_mesh("cpu", (W,), mesh_dim_names=("ep",)))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, losses = 0, []
    if args.ckpt.exists():
        extra = checkpoint.load(model, args.ckpt, optimizer=opt)
        if extra.get("world") != W:
            print(f"resuming a run saved with {extra.get('world')} processes on {W}", file=sys.stderr)
        start, losses = extra["step"], extra["losses"]
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {start}", file=sys.stderr)
    if rank == 0:                                  # the log holds exactly the checkpointed steps
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)))
    b = args.batch // W
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx_B = torch.randint(0, X.shape[0], (args.batch,), generator=g)
        idx_b = idx_B[rank * b:(rank + 1) * b]                       # this rank's slice
        logits, aux = model(X[idx_b])
        task = F.cross_entropy(logits, Y[idx_b])
        (task + aux).backward()
        sync_gradients(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = task.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / W)                               # global-batch mean loss
        if rank == 0:
            with log.open("a") as f:
                f.write(json.dumps({"step": step + 1, "loss": losses[-1]}) + "\n")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            checkpoint.save(model, args.ckpt, optimizer=opt,
                            extra={"step": step + 1, "losses": losses, "world": W})
    if rank == 0 and losses:
        print(f"step {args.steps}: loss {losses[-1]:.4f} ({W} processes, {args.experts // W} experts each)")
    return 0


if __name__ == "__main__":
    from moekit.parallel import run_then_end
    run_then_end(main)     # barrier, destroy the process groups, flush, exit (moekit.parallel.teardown)
