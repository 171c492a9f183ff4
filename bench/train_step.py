"""DeepSpeed training-step overhead: our trainer (make_engine + train_step) vs a plain PyTorch loop, on CPU.

What it measures: the wall time of one optimizer step (forward, backward, gradient clipping, AdamW update) through
stages/lm/trainer.py's DeepSpeed engine, divided by the time of the same step in a hand-written PyTorch loop:
same GPT init (one seed, the plain model is a copy made before DeepSpeed sees it), torch.optim.AdamW with the
trainer's hyperparameters and parameter groups (weight decay on matrices only), the trainer's learning-rate
schedule, clip_grad_norm_ and the same fixed batch. Both sides run in one process, warm up, then alternate blocks
of steps (the side that goes first switches every round) and the ratio is taken between the median step times.

Goal: ratio <= 1.10, i.e. DeepSpeed (ZeRO 0, fp32, one rank on CPU) adds at most 10% to a step.
The losses of the two models are compared step for step as a sanity check (same maths, so they should agree to
float rounding; a large difference means the two loops do not do the same work and the ratio means nothing).

    make setup && source .venv/bin/activate
    python bench/train_step.py                                   # depth 4, head_dim 32, seq_len 256, batch 8
    python bench/train_step.py --rounds 10 --block 4 --threads 2  # longer; 2 threads on an idle machine
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from stages.lm import trainer  # noqa: E402  (sets DS_ACCELERATOR=cpu before DeepSpeed is imported)
from stages.lm.gpt import GPT, GPTConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64, help="width = depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="micro batch size (sequences per step)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before measuring")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds; each runs one block per side")
    p.add_argument("--block", type=int, default=3, help="consecutive steps per side per round")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default). 1 by default: on a busy 2-core machine a "
                        "second thread mostly adds spin-wait and makes step times swing several-fold")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--goal", type=float, default=1.10)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    cfg = trainer.TrainConfig(steps=10**6, batch_size=args.batch, micro_batch_size=args.batch, grad_accum=1,
                              lr=3e-4, warmup_steps=50, precision="fp32", seed=args.seed)
    total = 10**6  # schedule length: the lr stays in warm-up, both sides get the same lr each step
    mcfg = GPTConfig.from_depth(args.depth, args.vocab, args.seq_len, args.aspect_ratio, args.head_dim)
    torch.manual_seed(args.seed)
    ds_model = GPT(mcfg)
    plain_model = copy.deepcopy(ds_model)  # same init, taken before DeepSpeed touches anything
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)

    # --- DeepSpeed side: exactly what the training stages call ---
    engine = trainer.make_engine(ds_model, cfg)
    engine.train()

    def loss_fn(eng, batch):
        bx, by = batch
        return eng(bx, by)

    # --- plain side: the same optimizer set-up as make_engine, written out ---
    plain_model.train()
    params = [p for p in plain_model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, fused=False)

    def plain_step(step: int) -> dict:
        lr = trainer.lr_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = plain_model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain_model.parameters(), cfg.grad_clip)
        opt.step()
        return {"loss": loss.item(), "grad_norm": float(norm)}

    def ds_step(step: int) -> dict:
        return trainer.train_step(engine, [(x, y)], loss_fn, cfg, step, total)

    sides = {"deepspeed": ds_step, "plain": plain_step}
    steps = {name: 0 for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    times: dict[str, list[float]] = {name: [] for name in sides}
    block_means: dict[str, list[float]] = {name: [] for name in sides}

    def run(name: str, n: int, timed: bool) -> None:
        block = []
        for _ in range(n):
            t0 = time.perf_counter()
            m = sides[name](steps[name])
            dt = time.perf_counter() - t0
            steps[name] += 1
            losses[name].append(m["loss"])
            block.append(dt)
        if timed:
            times[name] += block
            block_means[name].append(statistics.fmean(block))

    t_setup = time.perf_counter() - t_start
    for name in sides:
        run(name, args.warmup, timed=False)
    t_warm = time.perf_counter() - t_start - t_setup
    order = list(sides)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            run(name, args.block, timed=True)

    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["deepspeed"] / med["plain"]
    paired = statistics.median(d / p for d, p in zip(block_means["deepspeed"], block_means["plain"]))
    n = min(len(losses["deepspeed"]), len(losses["plain"]))
    loss_diff = max(abs(a - b) for a, b in zip(losses["deepspeed"][:n], losses["plain"][:n]))
    tokens = args.batch * args.seq_len

    print(f"ratio={ratio:.2f} (goal <= {args.goal:.2f})")
    print(f"model: depth {args.depth}, width {mcfg.n_embd}, {mcfg.n_head} heads of {mcfg.head_dim}, "
          f"{ds_model.num_params() / 1e6:.2f}M params; batch {args.batch} x {args.seq_len} tokens; "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.block} steps per side")
    print(f"{'side':<10} {'median s/step':>14} {'min s/step':>11} {'tok/s':>9}")
    for name in sides:
        print(f"{name:<10} {med[name]:>14.4f} {min(times[name]):>11.4f} {tokens / med[name]:>9.0f}")
    print(f"median of per-round block ratios: {paired:.2f}")
    print(f"wall: set-up {t_setup:.1f} s, warm-up {t_warm:.1f} s, total {time.perf_counter() - t_start:.1f} s")
    print(f"max |loss difference| over {n} matching steps: {loss_diff:.2e} "
          f"(first loss {losses['plain'][0]:.4f}, last {losses['plain'][n - 1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
