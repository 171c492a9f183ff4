"""RL with GRPO: chat model + (reward model | verifier) -> assistant.

    python -m stages.rl --root artifacts --input sft --input reward_model --set steps=30     # RLHF
    python -m stages.rl --root artifacts --input sft --set reward=verifier --set steps=30    # verifiable rewards

Rewards come from one of two places (`reward`):
  reward_model  a Bradley-Terry reward model scores replies to the prompts of a preference file (RLHF);
  verifier      problems with checkable answers (stages/lm/verifiers.py): a GSM8K-style JSONL, or generated
                small-number arithmetic; a reply earns 1 when its final number is right (+ `format_reward`
                when it ends with "#### <number>"). Held-out accuracy (greedy) is measured before and after.

Each step samples `prompts_per_step` prompts, draws `group_size` completions of each from the current policy
with the KV-cache engine, scores them, and normalises rewards within each group
(GRPO's group-relative advantage, Shao et al. 2024, so no value network is needed). The loss is the
advantage-weighted log-likelihood of the completions plus `kl_coef` times the k3 estimate of KL(policy ||
reference), the reference being the frozen SFT model. One gradient step per batch of rollouts keeps it
on-policy, so PPO's ratio is 1 and clipping is moot here. Every rollout (prompt, completion, reward, KL,
step) is written to Arrow in the artifact so a run can be audited and re-scored.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
import torch.nn.functional as F

from stages.artifacts import Artifact
from stages.common import StageError, main
from stages.lm import trainer
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import TOKENIZER, load_model, save_model
from stages.lm import verifiers
from stages.lm.engine import generate
from stages.lm.examples import pad_batch, read_jsonl, split_heldout
from stages.reward_model import encode_response, load_reward_model, prompt_messages

NAME = "rl"
CODE_VERSION = 1


@dataclass(frozen=True)
class Config(trainer.TrainConfig):
    reward: str = "reward_model"  # "reward_model" (input 2 is a reward model) or "verifier" (chat model only)
    prompts: str = "data/preferences/hh-rlhf-pairs.800.jsonl"  # reward_model: JSONL with a "prompt" field
    first_turn_only: bool = True  # reward_model: keep only the first user turn of each prompt (short rollouts)
    problems: str = "arithmetic"  # verifier: a JSONL of {"question", "answer"} (GSM8K format), or "arithmetic"
    arithmetic_max: int = 99      # verifier, arithmetic: operands 0..99, i.e. up to two-digit + and -
    arithmetic_train: int = 2000  # verifier, arithmetic: training problems (held-out ones: val_prompts)
    format_reward: float = 0.0    # verifier: bonus for ending with "#### <number>" (0: only the answer counts)
    val_prompts: int = 32         # held-out prompts (problems) for the before/after reward (and accuracy)
    steps: int = 50
    prompts_per_step: int = 4
    group_size: int = 8           # completions per prompt (GRPO group)
    max_new_tokens: int = 48
    temperature: float = 1.0
    kl_coef: float = 0.05
    kl_bound: float = 1.0         # nats/token: the run reports whether the final KL stayed under it
    lr: float = 2e-5
    warmup_steps: int = 5
    micro_batch_size: int = 1     # unused by GRPO's own batching; kept for the DeepSpeed config

    def __post_init__(self):
        super().__post_init__()
        if self.reward not in ("reward_model", "verifier"):
            raise ValueError(f"reward must be reward_model or verifier, not {self.reward!r}")
        if self.arithmetic_max < 1 or self.arithmetic_train < 1 or self.val_prompts < 1:
            raise ValueError("arithmetic_max, arithmetic_train and val_prompts must be at least 1")
        if self.format_reward < 0:
            raise ValueError("format_reward must be >= 0: it is a bonus for the answer format, not a penalty")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: GRPO's advantage compares samples in a group")
        if self.grad_accum != 1:
            raise ValueError("rl takes one optimizer step per batch of rollouts: keep grad_accum=1")


def token_logprobs(model, seqs: torch.Tensor) -> torch.Tensor:
    """log p(seqs[:, t+1] | seqs[:, :t+1]) for every position: (B, T-1)."""
    logits = model(seqs[:, :-1]).float()
    return torch.gather(F.log_softmax(logits, -1), 2, seqs[:, 1:, None]).squeeze(-1)


class Rollouts:
    """A resumable 'loader' for trainer.fit: each next() samples a fresh GRPO batch from the current policy.

    score(i, completions) -> one row per completion, {"reward": float, ...}, for training prompt i; its other
    fields (the verifier's "correct") go to the rollout Arrow files with the reward."""

    def __init__(self, cfg: Config, engine, ref, score, tok: ChatTokenizer, prompts: list[list[int]], out_dir):
        self.cfg, self.engine, self.ref, self.score, self.tok = cfg, engine, ref, score, tok
        self.prompts, self.out_dir, self.step = prompts, out_dir, 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def __iter__(self):
        return self

    def __next__(self):
        cfg, tok, policy = self.cfg, self.tok, self.engine.module
        dev = self.engine.device
        gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + self.step)
        pick = np.random.default_rng([cfg.seed, self.step]).choice(len(self.prompts), cfg.prompts_per_step,
                                                                  replace=False)
        seqs, masks, rewards, rows = [], [], [], []
        policy.eval()
        for i in pick:
            prompt = self.prompts[i]
            comps = generate(policy, prompt, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                             stop_ids=(tok.end, tok.eos), generator=gen)
            scored = self.score(int(i), comps)
            rewards.append([row["reward"] for row in scored])
            for c, row in zip(comps, scored):
                seqs.append(prompt + c)
                masks.append([0] * (len(prompt) - 1) + [1] * len(c))  # aligned with targets seqs[1:]
                rows.append({"step": self.step, "prompt": tok.decode(prompt), "completion": tok.decode(c), **row})
        policy.train()
        r = torch.tensor(rewards, device=dev)                               # (P, G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).flatten()
        x = pad_batch(seqs, tok.pad).to(dev)
        m = pad_batch(masks, 0).to(dev).float()[:, : x.size(1) - 1]
        with torch.no_grad():
            ref_lp = token_logprobs(self.ref, x)
        batch = {"x": x, "mask": m, "adv": adv, "ref_lp": ref_lp, "rows": rows, "reward_mean": float(r.mean())}
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def grpo_loss(cfg: Config, out_dir):
    def loss_fn(engine, b):
        lp = token_logprobs(engine, b["x"])
        m, n_tok = b["mask"], b["mask"].sum(1).clamp(min=1)
        log_ratio = b["ref_lp"] - lp
        kl = (log_ratio.exp() - log_ratio - 1) * m                          # k3 estimator, >= 0
        pg = -(b["adv"][:, None] * lp * m).sum(1) / n_tok
        kl_seq = kl.sum(1) / n_tok
        for row, k in zip(b["rows"], kl_seq.tolist()):
            row["kl"] = k
        step = b["rows"][0]["step"]
        table = pa.Table.from_pylist(b["rows"])  # the audit trail: one Arrow file per step
        with ipc.new_file(str(out_dir / f"step_{step:06d}.arrow"), table.schema) as w:
            w.write_table(table)
        return (pg + cfg.kl_coef * kl_seq).mean()
    return loss_fn


@torch.no_grad()
def mean_kl(policy, ref, tok: ChatTokenizer, prompts, max_new: int) -> float:
    """Per-token KL(policy || ref) on sampled replies (exact over the vocabulary at each position)."""
    dev = next(policy.parameters()).device
    kls = []
    for p in prompts:
        c = generate(policy, p, 1, max_new, temperature=1.0, stop_ids=(tok.end, tok.eos),
                     generator=torch.Generator(device=dev).manual_seed(len(p)))[0]
        if not c:
            continue
        x = torch.tensor([p + c], device=dev)
        lp, lq = F.log_softmax(policy(x).float(), -1), F.log_softmax(ref(x).float(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)[0, len(p) - 1:-1]
        kls.append(float(kl.mean()))
    return float(np.mean(kls)) if kls else 0.0


def reply_text(tok: ChatTokenizer, completion: list[int]) -> str:
    return tok.decode([t for t in completion if t not in (tok.end, tok.eos)])


def fit_context(prompts: list[list[int]], cfg: Config, seq_len: int) -> list[int]:
    """Indices of the prompts that leave room for max_new_tokens in the model's context."""
    return [i for i, ids in enumerate(prompts) if len(ids) + cfg.max_new_tokens <= seq_len]


class RewardModelReward:
    """Rewards from a reward model, on the first user turns of a preference file's prompts (RLHF)."""

    def __init__(self, cfg: Config, reward: Artifact, tok: ChatTokenizer, seq_len: int, vocab_size: int):
        self.rm = load_reward_model(reward.path).requires_grad_(False).eval()
        if self.rm.gpt.cfg.vocab_size != vocab_size:
            raise StageError("the reward model and the policy use different tokenizers: train the reward model "
                             "from this chat model")
        self.tok, self.seq_len, self.max_new = tok, seq_len, cfg.max_new_tokens
        records, self.malformed = read_jsonl(cfg.prompts, lambda r: None if isinstance(r.get("prompt"), str) else
                                             "'prompt' missing")
        prompts = []
        for r in records:
            msgs = prompt_messages(r["prompt"])
            msgs = msgs[:1] if cfg.first_turn_only else msgs
            if msgs:
                prompts.append(tok.render_prompt(msgs))
        prompts = [prompts[i] for i in fit_context(prompts, cfg, seq_len)]
        if len(prompts) < cfg.prompts_per_step + 1:
            raise StageError(f"only {len(prompts)} prompts fit the context with max_new_tokens="
                             f"{cfg.max_new_tokens}: lower rl.max_new_tokens or give more prompts")
        self.train, self.val = split_heldout(prompts, cfg.val_prompts / len(prompts), cfg.seed)
        self.stats = {"prompts": len(prompts), "malformed": {"count": len(self.malformed),
                                                             "lines": self.malformed[:50]}}

    def _scores(self, prompt: list[int], comps: list[list[int]]) -> list[float]:
        dev = next(self.rm.parameters()).device
        scored = [encode_response(self.tok, prompt, c, self.seq_len) for c in comps]
        with torch.no_grad():
            return self.rm(pad_batch(scored, self.tok.pad).to(dev),
                           torch.tensor([len(s) for s in scored], device=dev)).tolist()

    def to(self, device) -> None:
        self.rm.to(device)

    def score(self, i: int, comps: list[list[int]]) -> list[dict]:
        return [{"reward": r} for r in self._scores(self.train[i], comps)]

    @torch.no_grad()
    def evaluate(self, policy) -> dict:
        """Mean reward-model score of greedy replies to the held-out prompts."""
        policy.eval()
        scores = [self._scores(p, generate(policy, p, 1, self.max_new, temperature=0,
                                           stop_ids=(self.tok.end, self.tok.eos)))[0] for p in self.val]
        policy.train()
        return {"val_reward": float(np.mean(scores))}


class VerifierReward:
    """Rewards from checking the final number of each reply against the problem's answer (stages/lm/verifiers.py)."""

    def __init__(self, cfg: Config, tok: ChatTokenizer, seq_len: int):
        self.tok, self.max_new, self.format_reward = tok, cfg.max_new_tokens, cfg.format_reward
        if cfg.problems == "arithmetic":
            train, val = verifiers.arithmetic_problems(cfg.arithmetic_max, cfg.arithmetic_train, cfg.val_prompts,
                                                       cfg.seed)
            malformed = []
        else:
            problems, malformed = verifiers.load_problems(cfg.problems)
            train, val = split_heldout(problems, cfg.val_prompts / len(problems), cfg.seed)
        encode = lambda ps: [tok.render_prompt([{"role": "user", "content": p["question"]}]) for p in ps]  # noqa: E731
        train_ids, val_ids = encode(train), encode(val)
        keep_train, keep_val = fit_context(train_ids, cfg, seq_len), fit_context(val_ids, cfg, seq_len)
        if len(keep_train) < cfg.prompts_per_step or not keep_val:
            raise StageError(f"{len(keep_train)} training and {len(keep_val)} held-out problems fit the context "
                             f"with max_new_tokens={cfg.max_new_tokens}: lower rl.max_new_tokens or give more "
                             f"(or shorter) problems")
        self.train = [train_ids[i] for i in keep_train]
        self.train_answers = [train[i]["answer"] for i in keep_train]
        self.val = [val_ids[i] for i in keep_val]
        self.val_answers = [val[i]["answer"] for i in keep_val]
        self.stats = {"problems": cfg.problems, "train_problems": len(self.train), "val_problems": len(self.val),
                      "too_long": len(train) + len(val) - len(self.train) - len(self.val),
                      "malformed": {"count": len(malformed), "lines": malformed[:50]}}

    def to(self, device) -> None:
        pass  # the verifier is plain Python: nothing to move

    def score(self, i: int, comps: list[list[int]]) -> list[dict]:
        rows = []
        for c in comps:
            reward, correct = verifiers.score(reply_text(self.tok, c), self.train_answers[i], self.format_reward)
            rows.append({"reward": reward, "correct": correct})
        return rows

    @torch.no_grad()
    def evaluate(self, policy) -> dict:
        """Accuracy and mean reward of greedy replies to the held-out problems."""
        policy.eval()
        results = [verifiers.score(reply_text(self.tok, generate(policy, p, 1, self.max_new, temperature=0,
                                                                 stop_ids=(self.tok.end, self.tok.eos))[0]),
                                   answer, self.format_reward)
                   for p, answer in zip(self.val, self.val_answers)]
        policy.train()
        return {"val_accuracy": float(np.mean([ok for _, ok in results])),
                "val_reward": float(np.mean([r for r, _ in results]))}


def run(cfg: Config, chat: Artifact, *reward: Artifact, out: Artifact) -> dict:
    if cfg.reward == "reward_model" and len(reward) != 1:
        raise StageError(f"rl.reward=reward_model scores rollouts with a reward model, but {len(reward)} inputs "
                         f"follow the chat model: pass the chat model then a reward_model artifact, or set "
                         f"rl.reward=verifier to reward checkable answers instead")
    if cfg.reward == "verifier" and reward:
        raise StageError("rl.reward=verifier takes only the chat model as input: drop the other inputs "
                         f"({', '.join(a.ref for a in reward)}), or set rl.reward=reward_model to use them")
    policy, meta, _ = load_model(chat.path)
    ref, _, _ = load_model(chat.path)
    ref.requires_grad_(False).eval()
    tok = ChatTokenizer(chat.path / TOKENIZER)
    if cfg.reward == "verifier":
        source = VerifierReward(cfg, tok, policy.cfg.seq_len)
    else:
        source = RewardModelReward(cfg, reward[0], tok, policy.cfg.seq_len, policy.cfg.vocab_size)
    before = source.evaluate(policy)

    torch.manual_seed(cfg.seed)
    engine = trainer.make_engine(policy, cfg)
    source.to(engine.device)
    rollout_dir = out.path / "rollouts"
    rollouts = Rollouts(cfg, engine, ref.to(engine.device), source.score, tok, source.train, rollout_dir)
    history = trainer.fit(engine, cfg, cfg.steps, rollouts, grpo_loss(cfg, rollout_dir),
                          out.path / "checkpoints", log_every=5)
    policy = engine.module
    after = source.evaluate(policy)
    kl = mean_kl(policy, ref, tok, source.val, cfg.max_new_tokens)
    table = pa.concat_tables([ipc.open_file(str(p)).read_all() for p in sorted(rollout_dir.glob("*.arrow"))])
    per_step = [("reward", "mean"), ("kl", "mean")] + ([("correct", "mean")] if "correct" in table.column_names
                                                       else [])
    by_step = table.group_by("step").aggregate(per_step).sort_by("step")
    save_model(policy, out.path, chat.path / TOKENIZER,
               {"stage": NAME, "tokenizer_sha256": meta["tokenizer_sha256"]})
    shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
    stats = {
        "method": "grpo",
        "reward": cfg.reward,
        **source.stats,
        "val_prompts": len(source.val),
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
        "val_kl_to_reference": kl,
        "kl_within_bound": kl <= cfg.kl_bound,
        "rollouts": table.num_rows,
        "train_reward_by_step": by_step.column("reward_mean").to_pylist(),
        "train_kl_by_step": by_step.column("kl_mean").to_pylist(),
        "curve": trainer.thin(history),
    }
    if "correct_mean" in by_step.column_names:
        stats["train_accuracy_by_step"] = by_step.column("correct_mean").to_pylist()
    return stats


if __name__ == "__main__":
    main(sys.modules[__name__])
