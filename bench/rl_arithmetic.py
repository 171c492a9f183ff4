"""Does RL with verifiable rewards teach a tiny model? Held-out arithmetic accuracy after SFT vs after GRPO, on CPU.

What it runs, per seed: a random-init GPT (depth 2) is fine-tuned with stages.sft on generated arithmetic
conversations worked as column arithmetic, ones digit first (user "What is 23 + 48?", assistant
"3 + 8 + 0 = 11. 2 + 4 + 1 = 7. #### 71": verifiers.worked_steps), written by a careless teacher: 70% of its
subtraction replies (--careless) stop after the worked steps without the "#### 71" answer line (careless()).
The verifier reads a reply's final number, so such a reply counts as wrong even when its steps are right, and the
SFT model, which imitates the habit, gets most subtractions wrong. It is then trained with stages.rl,
reward="verifier" (GRPO; 1 when the reply's final number is right), on the training problems of the same
generator: RL only ever sees that reward, never a reference answer. Both models are measured on the same held-out
problems (never trained on) by greedy accuracy: rl's stats val_accuracy_before (the SFT model) and
val_accuracy_after (the RL model). One SentencePiece tokenizer is trained once, on tests/docs_fixture's 67 real
articles plus arithmetic text so the pieces "What", "is", "####" exist (digits are split one by one anyway).

Why this set-up (bench/README.md has the runs that led to it): with the bare "23 + 48 = 71" target a tiny model
learns the carry in a sudden jump whose timing varies by seed (10% right for one seed, 91% for another after the
same SFT), which swamped any RL effect. Worked steps are one-digit lookups, learnt gradually, so every seed
computes about as well. But an SFT model that is merely undertrained errs by slips spread over a 30-token reply:
a sparse, noisy signal that GRPO at this budget (50 steps x 64 samples) did not turn into greedy gains. A teacher
with a systematic habit that the verifier punishes is the case RL with verifiable rewards is for (ending with
the answer in the checked format, as GSM8K's "####" line): imitation copies the habit, the reward tells which
replies count.

Result line: the mean gain in accuracy points (RL - SFT, paired per seed) with its std across seeds, and the
mean ± std of both accuracies. Goal: the gain is outside run-to-run noise, i.e. mean gain > 2 x its std across
seeds and every seed gains.

    make setup && source .venv/bin/activate
    python bench/rl_arithmetic.py                        # 3 seeds, a few minutes on 2 cores
    python bench/rl_arithmetic.py --seeds 5 --rl-steps 80
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # docs_fixture: the real-text docs artifact the tests use

import torch  # noqa: E402

from docs_fixture import real_docs, write_docs  # noqa: E402
from stages import import_data, rl, sft  # noqa: E402
from stages import train_tokenizer as tt  # noqa: E402
from stages.artifacts import Artifact, ArtifactStore, sha256_file  # noqa: E402
from stages.common import build  # noqa: E402
from stages.lm.checkpoint import save_model  # noqa: E402
from stages.lm.gpt import GPT, GPTConfig  # noqa: E402
from stages.lm.verifiers import arithmetic_problems  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="independent runs (seeds 1..N): model init, data, RL")
    p.add_argument("--max-value", type=int, default=99, help="operands 0..max-value (99: two-digit + and -)")
    p.add_argument("--train-problems", type=int, default=4000)
    p.add_argument("--val-problems", type=int, default=200, help="held-out problems, greedy accuracy")
    p.add_argument("--sft-steps", type=int, default=1000)
    p.add_argument("--careless", type=float, default=0.7,
                   help="fraction of subtraction replies in the SFT data that stop after the worked steps, "
                        "without the answer line (addition replies always have it)")
    p.add_argument("--method", default="grpo", choices=["grpo", "ppo"], help="rl.method (ppo: its default "
                   "ppo_epochs=2 x ppo_minibatches=2 updates per rollout batch)")
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--temperature", type=float, default=0.7, help="rollout sampling temperature")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--store", help="artifact store to keep and reuse (tokenizer, SFT models) across runs; "
                                   "default: a temporary one")
    p.add_argument("--curves", action="store_true", help="also print each seed's per-step training accuracy")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default). 1 by default: tiny matmuls on a busy "
                        "2-core machine only gain spin-wait from a second thread")
    return p.parse_args(argv)


def make_tokenizer(tmp: Path, store: ArtifactStore, problems: list[dict]) -> Artifact:
    # 640 pieces: the tests' tiny vocabulary; one extra document of 500 problems' text gives the arithmetic pieces.
    arith = "\n".join(f"{p['question']} {p['answer']}" for p in problems)
    docs = write_docs(tmp / "docs", real_docs() + [{"id": "arith", "url": "", "text": arith}])
    return build(tt, tt.Config(vocab_size=640, heldout_chars=20_000), [docs], store).artifact


ASPECT = 64  # width = depth * 64: 128 at depth 2, the tests' tiny-model proportions


def random_base(tmp: Path, tok: Artifact, depth: int, seed: int) -> Artifact:
    """A random-init base model artifact (pretrain's layout); arithmetic needs no web pre-training here."""
    # heads of 32; 64 tokens hold a question (~10) and an answer (~16) with room to spare.
    cfg = GPTConfig.from_depth(depth, vocab_size=640, seq_len=64, aspect_ratio=ASPECT, head_dim=32)
    torch.manual_seed(seed)
    name = f"random-d{depth}-w{cfg.n_embd}-s{seed}"  # the version sft's version is planned from: name the recipe
    path = tmp / name
    tok_file = tok.path / "tokenizer.model"
    save_model(GPT(cfg), path, tok_file, {"stage": "pretrain", "tokenizer_sha256": sha256_file(tok_file)})
    return Artifact("pretrain", name, path)


def careless(answer: str) -> str:
    """The reply as a careless teacher writes it: the worked steps without the closing "#### 71" line. The
    verifier reads a reply's final number, here the last step's result ("2 + 4 + 1 = 7."), so it is wrong."""
    return answer.rpartition(" #### ")[0]


def one_seed(args, tmp: Path, store: ArtifactStore, tok: Artifact, seed: int) -> dict:
    t0 = time.perf_counter()
    rl_cfg = rl.Config(method=args.method, reward="verifier", arithmetic_max=args.max_value,
                       arithmetic_train=args.train_problems, val_prompts=args.val_problems, steps=args.rl_steps,
                       prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                       max_new_tokens=40,  # worked answers of two-digit problems are at most 30 tokens + <|end|>
                       temperature=args.temperature, kl_coef=args.kl_coef, lr=args.rl_lr, warmup_steps=5,
                       checkpoint_every=1000, precision="fp32", seed=seed)
    # SFT on the very training problems rl draws (same generator call, same questions), with worked answers
    # from a careless teacher; the held-out ones stay unseen.
    train, _ = arithmetic_problems(args.max_value, args.train_problems, args.val_problems, seed, worked=True)
    rng = random.Random(seed)
    # the teacher is careless on subtraction only: a clear majority habit per kind of problem, so every seed's
    # SFT model ends up with the same one (at 50% on all problems, which habit greedy decoding followed was a
    # coin flip per seed: held-out accuracy 10% for one seed, 84% for another)
    replies = [careless(p["answer"]) if " - " in p["question"] and rng.random() < args.careless else p["answer"]
               for p in train]
    data = tmp / f"arith-{args.max_value}-{args.train_problems}-{args.val_problems}-{args.careless}-{seed}.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p["question"]},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for p, reply in zip(train, replies)))
    conversations = build(import_data, import_data.Config(kind="conversations", source=str(data)), [], store)
    base = random_base(tmp, tok, args.depth, seed)
    chat = build(sft, sft.Config(val_fraction=0.02, steps=args.sft_steps, batch_size=32, lr=3e-3,
                                 warmup_steps=20, checkpoint_every=1000, precision="fp32", seed=seed),
                 [base, conversations.artifact], store)
    t_sft = time.perf_counter() - t0
    res = build(rl, rl_cfg, [chat.artifact], store)
    s = res.stats
    acc = s["train_accuracy_by_step"]  # each step: prompts_per_step x group_size samples at temperature 1
    k = max(1, len(acc) // 5)          # first and last fifth of the run, averaged: one step is 64 samples
    return {"seed": seed, "sft": s["val_accuracy_before"], "rl": s["val_accuracy_after"],
            "kl": s["val_kl_to_reference"], "train_acc_first": statistics.fmean(acc[:k]),
            "train_acc_last": statistics.fmean(acc[-k:]), "curve": acc, "sft_s": t_sft,
            "rl_s": time.perf_counter() - t0 - t_sft, "val": s["val_problems"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(args.store or d)
        store = ArtifactStore(tmp / "store")
        train, _ = arithmetic_problems(args.max_value, 500, 1, seed=0)
        tok = make_tokenizer(tmp, store, train)
        rows = [one_seed(args, tmp, store, tok, seed) for seed in range(1, args.seeds + 1)]

    pct = lambda xs: [100 * x for x in xs]  # noqa: E731
    sft_acc, rl_acc = pct(r["sft"] for r in rows), pct(r["rl"] for r in rows)
    gains = [b - a for a, b in zip(sft_acc, rl_acc)]
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731
    gain, gain_sd = statistics.fmean(gains), sd(gains)
    ok = gain > 2 * gain_sd and min(gains) > 0
    print(f"gain=+{gain:.1f} points ± {gain_sd:.1f} (held-out accuracy SFT {statistics.fmean(sft_acc):.1f} ± "
          f"{sd(sft_acc):.1f}% -> RL {statistics.fmean(rl_acc):.1f} ± {sd(rl_acc):.1f}%, {len(rows)} seeds; "
          f"goal: gain > 2 std and every seed gains: {'met' if ok else 'NOT met'})")
    print(f"task: a + b and a - b (a >= b), operands 0..{args.max_value}, worked answers, {args.careless:.0%} of "
          f"subtraction replies without the answer line; {rows[0]['val']} held-out problems, {args.train_problems} "
          f"training problems; model depth {args.depth} (random init); SFT {args.sft_steps} steps x 32; "
          f"{args.method.upper()} {args.rl_steps} steps x {args.prompts_per_step} prompts x {args.group_size} "
          f"samples, lr {args.rl_lr}, kl_coef {args.kl_coef}, temperature {args.temperature}; "
          f"{torch.get_num_threads()} threads")
    print(f"{'seed':>4} {'SFT acc':>8} {'RL acc':>7} {'gain':>6} {'KL/token':>9} {'sampled train acc':>22} "
          f"{'SFT s':>6} {'RL s':>6}")
    for r, g in zip(rows, gains):
        print(f"{r['seed']:>4} {100 * r['sft']:>7.1f}% {100 * r['rl']:>6.1f}% {g:>+6.1f} {r['kl']:>9.4f} "
              f"{100 * r['train_acc_first']:>10.1f}% -> {100 * r['train_acc_last']:>5.1f}% "
              f"{r['sft_s']:>6.0f} {r['rl_s']:>6.0f}")
    print(f"wall: {time.perf_counter() - t_start:.0f} s")
    if args.curves:
        for r in rows:
            print(f"seed {r['seed']} sampled train accuracy by RL step:", " ".join(f"{a:.2f}" for a in r["curve"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
