"""Model FLOPs utilisation (MFU) of a nanochat-d20-sized GPT trained through our trainer on one CUDA GPU.

What it measures: optimizer steps of stages/lm/gpt.GPT at GPTConfig.from_depth(20, vocab 65536, seq_len 2048)
(width 1280, 10 heads of 128, about 560M parameters) through exactly what pretrain calls:
trainer.make_engine (DeepSpeed, ZeRO 0, bf16, fused AdamW) and trainer.train_step (forward, backward, clipping,
update), on random tokens, with attention forced onto SDPA's flash kernel (it fails rather than silently falling
back). After untimed warm-up steps (which include torch.compile's compilation with --compile), the timed steps run
between two torch.cuda.synchronize() calls (train_step's loss.item() also syncs every step).

    MFU = tokens per second * model.flops_per_token() / the GPU's peak dense bf16 FLOP/s

flops_per_token is 6 * non-embedding parameters + 12 * layers * width * seq_len (PaLM appendix B, as nanochat
counts). Peaks from the NVIDIA datasheets (SXM parts, dense, no sparsity): H100 and H200 989e12, A100 312e12;
other GPUs need --peak. Goal: mfu >= 0.45.

Without CUDA it prints that it needs CUDA and exits 0 (the bench scripts only report).

    python bench/gpu_mfu.py                     # depth 20, batch 16 x 2048 tokens
    python bench/gpu_mfu.py --compile --batch 8   # an 80 GB GPU
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s (SXM datasheets)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=2048)
    # 16 x 2048 tokens. A rough estimate of the peak: ~35 GB of bf16 layer activations (no activation
    # checkpointing), ~40 GB for the 65536-wide logits in fp32 and their gradient, ~11 GB of weights, fp32
    # master copy, gradients and AdamW moments: fine on an H200 (141 GB), tight on an 80 GB H100 (use 8 there).
    p.add_argument("--batch", type=int, default=16, help="micro batch size (sequences per step)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (include compilation with --compile)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (engine.compile(), as pretrain)")
    p.add_argument("--peak", type=float, default=0.0, help="peak bf16 FLOP/s (default: from the GPU's name)")
    p.add_argument("--goal", type=float, default=0.45)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_mfu: needs CUDA (no GPU visible to torch); nothing measured")
        return 0
    name = torch.cuda.get_device_name()
    peak = args.peak or next((p for gpu, p in PEAK_BF16.items() if gpu in name), 0.0)
    if not peak:
        print(f"gpu_mfu: unknown peak FLOP/s for {name}: pass --peak (e.g. --peak 989e12 for an H100 SXM)")
        return 0
    # imported only now: DeepSpeed's import is slow and picks its accelerator at import time
    from stages.lm import trainer
    from stages.lm.gpt import GPT, GPTConfig

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dev = trainer.device()
    torch.cuda.set_device(dev)
    cfg = trainer.TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, micro_batch_size=args.batch,
                              grad_accum=1, precision="bf16")
    mcfg = GPTConfig.from_depth(args.depth, args.vocab, args.seq_len)
    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the GPU: seconds instead of a minute of CPU init for 560M params
        model = GPT(mcfg)
    params, flops_per_token = model.num_params(), model.flops_per_token()  # before DeepSpeed may partition them
    engine = trainer.make_engine(model, cfg)
    if args.compile:
        engine.compile()
    engine.train()

    def loss_fn(eng, batch):
        x, y = batch
        return eng(x, y)

    def step(i: int) -> dict:
        batch = torch.randint(0, args.vocab, (2, args.batch, args.seq_len), device=dev)  # x, y: random tokens
        return trainer.train_step(engine, [(batch[0], batch[1])], loss_fn, cfg, i, cfg.steps)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t0 = time.perf_counter()
        for i in range(args.warmup):
            step(i)
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(args.warmup, cfg.steps):
            m = step(i)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps

    tokens_per_s = args.batch * args.seq_len / dt
    mfu = tokens_per_s * flops_per_token / peak
    print(f"mfu={mfu:.2f} (goal >= {args.goal:.2f})")
    print(f"gpu: {name}, peak {peak:.3g} bf16 FLOP/s; torch.compile {'on' if args.compile else 'off'}")
    print(f"model: depth {args.depth}, width {mcfg.n_embd}, {mcfg.n_head} heads of {mcfg.head_dim}, "
          f"{params / 1e6:.0f}M params, {flops_per_token / 1e9:.2f} GFLOP/token; "
          f"batch {args.batch} x {args.seq_len} tokens")
    print(f"step {dt * 1e3:.0f} ms, {tokens_per_s:.3g} tokens/s; {args.steps} timed steps after {args.warmup} "
          f"warm-up ({warm_s:.1f} s); last loss {m['loss']:.3f}; "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
