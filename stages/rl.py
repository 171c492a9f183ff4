"""RL from a reward model (RLHF) with GRPO: chat model + reward model -> assistant.

    python -m stages.rl --root artifacts --input sft --input reward_model --set steps=30

Each step samples `prompts_per_step` prompts, draws `group_size` completions of each from the current policy
with the KV-cache engine, scores them with the reward model, and normalises rewards within each group
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
from stages.lm.engine import generate
from stages.lm.examples import pad_batch, read_jsonl, split_heldout
from stages.reward_model import encode_response, load_reward_model, prompt_messages

NAME = "rl"
CODE_VERSION = 1


@dataclass(frozen=True)
class Config(trainer.TrainConfig):
    prompts: str = "data/preferences/hh-rlhf-pairs.800.jsonl"  # JSONL with a "prompt" field
    first_turn_only: bool = True  # keep only the first user turn of each prompt (short rollouts)
    val_prompts: int = 32         # held-out prompts for the before/after reward
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
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: GRPO's advantage compares samples in a group")
        if self.grad_accum != 1:
            raise ValueError("rl takes one optimizer step per batch of rollouts: keep grad_accum=1")


def token_logprobs(model, seqs: torch.Tensor) -> torch.Tensor:
    """log p(seqs[:, t+1] | seqs[:, :t+1]) for every position: (B, T-1)."""
    logits = model(seqs[:, :-1]).float()
    return torch.gather(F.log_softmax(logits, -1), 2, seqs[:, 1:, None]).squeeze(-1)


class Rollouts:
    """A resumable 'loader' for trainer.fit: each next() samples a fresh GRPO batch from the current policy."""

    def __init__(self, cfg: Config, engine, ref, rm, tok: ChatTokenizer, prompts: list[list[int]], out_dir):
        self.cfg, self.engine, self.ref, self.rm, self.tok = cfg, engine, ref, rm, tok
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
            scored = [encode_response(tok, prompt, c, policy.cfg.seq_len) for c in comps]
            with torch.no_grad():
                r = self.rm(pad_batch(scored, tok.pad).to(dev), torch.tensor([len(s) for s in scored], device=dev))
            rewards.append(r)
            for c, rew in zip(comps, r.tolist()):
                seqs.append(prompt + c)
                masks.append([0] * (len(prompt) - 1) + [1] * len(c))  # aligned with targets seqs[1:]
                rows.append({"step": self.step, "prompt": tok.decode(prompt), "completion": tok.decode(c),
                             "reward": rew})
        policy.train()
        r = torch.stack(rewards)                                            # (P, G)
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
def mean_reward(policy, rm, tok: ChatTokenizer, prompts, max_new: int) -> float:
    """Mean reward-model score of greedy replies to prompts."""
    policy.eval()
    dev = next(policy.parameters()).device
    scores = []
    for p in prompts:
        c = generate(policy, p, 1, max_new, temperature=0, stop_ids=(tok.end, tok.eos))[0]
        s = encode_response(tok, p, c, policy.cfg.seq_len)
        scores.append(float(rm(torch.tensor([s], device=dev), torch.tensor([len(s)], device=dev))[0]))
    policy.train()
    return float(np.mean(scores))


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


def run(cfg: Config, chat: Artifact, reward: Artifact, *, out: Artifact) -> dict:
    policy, meta, _ = load_model(chat.path)
    ref, _, _ = load_model(chat.path)
    ref.requires_grad_(False).eval()
    rm = load_reward_model(reward.path).requires_grad_(False).eval()
    if rm.gpt.cfg.vocab_size != policy.cfg.vocab_size:
        raise StageError("the reward model and the policy use different tokenizers: train the reward model "
                         "from this chat model")
    tok = ChatTokenizer(chat.path / TOKENIZER)
    records, malformed = read_jsonl(cfg.prompts, lambda r: None if isinstance(r.get("prompt"), str) else
                                    "'prompt' missing")
    prompts = []
    for r in records:
        msgs = prompt_messages(r["prompt"])
        msgs = msgs[:1] if cfg.first_turn_only else msgs
        ids = tok.render_prompt(msgs)
        if msgs and len(ids) + cfg.max_new_tokens <= policy.cfg.seq_len:
            prompts.append(ids)
    if len(prompts) < cfg.prompts_per_step + 1:
        raise StageError(f"only {len(prompts)} prompts fit the context with max_new_tokens="
                         f"{cfg.max_new_tokens}: lower rl.max_new_tokens or give more prompts")
    train_p, val_p = split_heldout(prompts, cfg.val_prompts / len(prompts), cfg.seed)
    reward_before = mean_reward(policy, rm, tok, val_p, cfg.max_new_tokens)

    torch.manual_seed(cfg.seed)
    engine = trainer.make_engine(policy, cfg)
    rollout_dir = out.path / "rollouts"
    rollouts = Rollouts(cfg, engine, ref.to(engine.device), rm.to(engine.device), tok, train_p, rollout_dir)
    history = trainer.fit(engine, cfg, cfg.steps, rollouts, grpo_loss(cfg, rollout_dir),
                          out.path / "checkpoints", log_every=5)
    policy = engine.module
    reward_after = mean_reward(policy, rm, tok, val_p, cfg.max_new_tokens)
    kl = mean_kl(policy, ref, tok, val_p, cfg.max_new_tokens)
    table = pa.concat_tables([ipc.open_file(str(p)).read_all() for p in sorted(rollout_dir.glob("*.arrow"))])
    train_reward = table.group_by("step").aggregate([("reward", "mean"), ("kl", "mean")]).sort_by("step")
    save_model(policy, out.path, chat.path / TOKENIZER,
               {"stage": NAME, "tokenizer_sha256": meta["tokenizer_sha256"]})
    shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
    return {
        "method": "grpo",
        "reward": "reward_model",
        "prompts": len(prompts),
        "malformed": {"count": len(malformed), "lines": malformed[:50]},
        "val_prompts": len(val_p),
        "val_reward_before": reward_before,
        "val_reward_after": reward_after,
        "val_kl_to_reference": kl,
        "kl_within_bound": kl <= cfg.kl_bound,
        "rollouts": table.num_rows,
        "train_reward_by_step": train_reward.column("reward_mean").to_pylist(),
        "train_kl_by_step": train_reward.column("kl_mean").to_pylist(),
        "curve": trainer.thin(history),
    }


if __name__ == "__main__":
    main(sys.modules[__name__])
