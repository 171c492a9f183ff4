"""Rollout speed of the KV-cache engine (stages/lm/engine.generate) vs naive recomputation, greedy, on CPU.

What it measures: tokens per second of sampling --new-tokens tokens for a batch of --samples copies of one prompt
(a GRPO group, as the RL stage rolls out) with engine.generate (prefill once, then one position per step through
the KV cache), divided by the same rollout done naively: every new token runs the model over the whole sequence so
far (no cache) and takes the argmax of the last position's logits. Same model, same prompt, greedy on both sides,
and the outputs are checked to be identical token for token.

The naive rollout is long (its cost grows with the square of the length), so it is cut into --chunks pieces and a
complete engine.generate run is timed before each piece and after the last: the cached side is the median of
those interleaved runs, the naive side the sum of its pieces.

Goal: ratio >= 5 (the cache makes rollouts at least 5x faster at 256 new tokens).

    make setup && source .venv/bin/activate
    python bench/kv_cache.py                          # depth 4, head_dim 32, seq_len 512, 8 samples, 256 tokens
    python bench/kv_cache.py --new-tokens 128 --chunks 2   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from stages.lm.engine import generate  # noqa: E402
from stages.lm.gpt import GPT, GPTConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64, help="width = depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--samples", type=int, default=8, help="batch: samples of the one prompt")
    p.add_argument("--chunks", type=int, default=4, help="pieces the naive rollout is cut into (cached runs: +1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default); 1 keeps a busy 2-core machine steady")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", type=float, default=5.0)
    return p.parse_args(argv)


@torch.no_grad()
def naive_rollout(model: GPT, prompt: list[int], samples: int, new_tokens: int):
    """Yields after each new token; returns the (samples, new_tokens) greedy ids. No cache: full recompute."""
    seq = torch.tensor([prompt] * samples)
    out = []
    for _ in range(new_tokens):
        h = model.hidden(seq)                      # (B, T, C): the whole sequence, every step
        nxt = model.lm_head(h[:, -1]).argmax(-1)   # (B,) logits of the last position only
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        yield
    return torch.stack(out, dim=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompt_len + args.new_tokens > args.seq_len:
        sys.exit(f"prompt_len + new_tokens = {args.prompt_len + args.new_tokens} exceeds seq_len {args.seq_len}")
    torch.manual_seed(args.seed)
    cfg = GPTConfig.from_depth(args.depth, args.vocab, args.seq_len, args.aspect_ratio, args.head_dim)
    model = GPT(cfg).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(8, args.vocab, (args.prompt_len,), generator=gen).tolist()

    def cached():
        t0 = time.perf_counter()
        out = generate(model, prompt, num_samples=args.samples, max_new_tokens=args.new_tokens, temperature=0.0)
        return time.perf_counter() - t0, torch.tensor(out)

    cached()  # warm-up (allocator, kernels)
    kv_times, kv_outs, naive_time = [], [], 0.0
    per_chunk = -(-args.new_tokens // args.chunks)
    naive = naive_rollout(model, prompt, args.samples, args.new_tokens)
    naive_out = None
    for c in range(args.chunks + 1):
        dt, out = cached()
        kv_times.append(dt)
        kv_outs.append(out)
        if c == args.chunks:
            break
        t0 = time.perf_counter()
        try:
            for _ in range(per_chunk):
                next(naive)
        except StopIteration as stop:
            naive_out = stop.value
        naive_time += time.perf_counter() - t0
    if naive_out is None:  # new_tokens divisible by chunks: the generator still has to return
        try:
            next(naive)
        except StopIteration as stop:
            naive_out = stop.value

    kv_time = statistics.median(kv_times)
    n_tokens = args.samples * args.new_tokens
    ratio = naive_time / kv_time
    kv_out = kv_outs[0]
    same = naive_out.shape == kv_out.shape and torch.equal(naive_out, kv_out)
    runs_agree = all(torch.equal(o, kv_out) for o in kv_outs)
    if same:
        match = "identical"
    else:
        diff = (naive_out != kv_out).any(0).nonzero()
        match = f"DIFFERENT (first at new token {int(diff[0])})" if len(diff) else "DIFFERENT (shape)"

    print(f"ratio={ratio:.1f} (goal >= {args.goal:g})")
    print(f"model: depth {args.depth}, width {cfg.n_embd}, {cfg.n_head} heads of {cfg.head_dim}, "
          f"{model.num_params() / 1e6:.2f}M params; prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"{args.samples} samples; {torch.get_num_threads()} threads")
    print(f"{'rollout':<10} {'seconds':>9} {'tok/s':>9}  note")
    print(f"{'kv-cache':<10} {kv_time:>9.3f} {n_tokens / kv_time:>9.0f}  median of {len(kv_times)} runs "
          f"({min(kv_times):.3f}-{max(kv_times):.3f} s)")
    print(f"{'naive':<10} {naive_time:>9.3f} {n_tokens / naive_time:>9.0f}  one run in {args.chunks} timed pieces")
    print(f"greedy outputs: {match}; cached runs agree with each other: {runs_agree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
