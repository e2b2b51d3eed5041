"""Train a tiny transformers MoE language model patched with moekit, with expert parallelism × FSDP2.

    torchrun --nproc-per-node 4 examples/train_moe_lm.py --out runs/lm --ep 2      # dp 2 × ep 2
    torchrun --nproc-per-node 2 examples/train_moe_lm.py --out runs/lm --ep 2      # ep 2

The workflow end to end, on CPU processes (gloo):

1. a random-init Qwen3-MoE causal LM (byte vocabulary, ``--layers`` layers, ``--experts`` experts) from
   transformers, every MoE block replaced by a moekit layer (``moekit.hf.patch``);
2. ``expert_parallel(model, mesh)`` on a ``("dp", "ep")`` mesh (experts as DTensors over ``ep``), then
   ``fully_shard_moe`` (FSDP2: experts over ``dp``, everything else over all ranks);
3. trained on the embedded byte corpus (``moekit.repro.datasets.corpus``): every step's global batch is
   drawn from a generator seeded by (seed, step), each rank takes its slice; loss = transformers'
   language-model loss + moekit's balancing losses (statistics of the global batch); gradient norm
   clipped with ``moekit.parallel.clip_grad_norm_``;
4. a DCP checkpoint (model, optimizer, RNG, loss history) every ``--ckpt-every`` steps to
   ``OUT/ckpt``; killed at any point (even ``kill -9``) and started again with the same command, it
   resumes and its loss log ``OUT/losses.jsonl`` is bit-identical to an uninterrupted run's;
5. at the end: ``moekit.hf.save_pretrained`` writes ``OUT/hf`` in Qwen3-MoE's own layout (each rank its
   own file), the logits of a probe batch go to ``OUT/probe.json`` (plain
   ``Qwen3MoeForCausalLM.from_pretrained(OUT/hf)`` reproduces them), and rank 0 writes a
   :class:`~moekit.analysis.RoutingMonitor` report of its layers' routing to ``OUT/routing``.

Legend: B global batch (sequences), b = B/W per rank, L sequence length, V = 256 bytes.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run directory (resumed from OUT/ckpt when it exists)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: all processes)")
    p.add_argument("--no-fsdp", action="store_true", help="no FSDP2: replicated non-expert weights, sync_gradients")
    p.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    p.add_argument("--ckpt-every", type=int, default=5, help="steps between checkpoints (default: 5)")
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences, divisible by the processes")
    p.add_argument("--seq", type=int, default=32, help="sequence length in bytes (default: 32)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: 2)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer, divisible by --ep (default: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default: 0)")
    args = p.parse_args(argv)
    for flag in ("steps", "ckpt_every", "batch", "seq", "layers", "experts"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be a positive int, got {getattr(args, flag)}")
    if not (0 < args.lr < float("inf")):
        p.error(f"--lr: must be a positive finite number, got {args.lr}")
    return p, args


def build_model(args):
    import transformers as tf

    import moekit.hf as mh
    cfg = tf.Qwen3MoeConfig(vocab_size=256, hidden_size=32, num_hidden_layers=args.layers, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, intermediate_size=64, num_experts=args.experts,
                            num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                            output_router_logits=False, max_position_embeddings=args.seq)
    cfg._attn_implementation = "eager"
    torch.manual_seed(args.seed)
    model = tf.Qwen3MoeForCausalLM(cfg)
    mh.patch(model)
    for block in mh.patched_blocks(model):         # balancing loss on the global batch's statistics
        block.moe.router.w_switch = 1e-2
    return model


def main(argv=None) -> int:
    parser, args = parse(argv)
    from moekit import checkpoint
    from moekit.analysis import RoutingMonitor
    import moekit.hf as mh
    from moekit.parallel import clip_grad_norm_, expert_parallel, fully_shard_moe, sync_gradients
    from moekit.repro.datasets.corpus import load_corpus

    if "RANK" not in os.environ:                       # plain `python`: a one-process group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29518"),
                          RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    W, rank = dist.get_world_size(), dist.get_rank()
    ep = args.ep or W
    if W % ep or args.batch % W or args.experts % ep:
        parser.error(f"--ep ({ep}) must divide the number of processes ({W}) and --experts ({args.experts}); "
                     f"--batch ({args.batch}) must be divisible by {W}")
    torch.set_num_threads(1)
    dp = W // ep
    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))
    model = build_model(args)
    expert_parallel(model, mesh)
    if not args.no_fsdp:
        fully_shard_moe(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    corpus = load_corpus()
    ckpt, log = args.out / "ckpt", args.out / "losses.jsonl"
    start, losses = 0, []
    if ckpt.exists():
        extra = checkpoint.load(model, ckpt, optimizer=opt)
        start, losses = extra["step"], extra["losses"]
        if rank == 0:
            print(f"resumed from {ckpt} at step {start}", flush=True)
    if rank == 0:                                  # the log holds exactly the checkpointed steps
        args.out.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)))
    monitor = RoutingMonitor(model)
    b = args.batch // W
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x_BL, y_BL = corpus.batch("train", args.batch, args.seq, g)
        x_bL, y_bL = x_BL[rank * b:(rank + 1) * b], y_BL[rank * b:(rank + 1) * b]
        out = model(input_ids=x_bL)
        lm = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), y_bL.flatten())
        (lm + mh.aux_loss(model)).backward()
        if args.no_fsdp:
            sync_gradients(model)
        clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = lm.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / W)              # global-batch mean language-model loss
        if rank == 0:
            with log.open("a") as f:
                f.write(json.dumps({"step": step + 1, "loss": losses[-1]}) + "\n")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            checkpoint.save(model, ckpt, optimizer=opt, extra={"step": step + 1, "losses": losses})
    monitor.remove()
    mh.save_pretrained(model, args.out / "hf")
    g = torch.Generator().manual_seed(12345)
    probe_BL, _ = corpus.batch("valid", 2, args.seq, g)
    with torch.no_grad():
        logits = model(input_ids=probe_BL).logits
    if rank == 0:
        (args.out / "probe.json").write_text(json.dumps({"input_ids": probe_BL.tolist(),
                                                         "logits": logits.tolist()}))
        if any(monitor.records.values()):
            monitor.report(args.out / "routing", title=f"Routing of rank 0 ({W} processes, ep {ep})")
        if losses:
            print(f"step {args.steps}: loss {losses[-1]:.4f} ({W} processes: dp {dp} × ep {ep})", flush=True)
    return 0


if __name__ == "__main__":
    from moekit.parallel import run_then_end
    run_then_end(main)     # barrier, destroy the process groups, flush, exit (moekit.parallel.teardown)
