"""What stages/rl.py learns from: the two reward sources of GRPO/PPO, and DPO's preference pairs.

  RewardModelReward  RLHF: a reward model scores replies to the first user turns of preference prompts
  VerifierReward     RL on verifiable problems: a reply is right when its final number is (verifiers.py)
  dpo_pairs, pair_logps, dpo_eval   preference pairs encoded for DPO, and its held-out measures
"""

from __future__ import annotations

import numpy as np
import torch

from stages.artifacts import Artifact
from stages.common import StageError
from stages.lm import verifiers
from stages.lm.chat import ChatTokenizer
from stages.lm.engine import generate
from stages.lm.examples import pad_batch, split_heldout
from stages.lm.policy_opt import sequence_logprobs
from stages.reward_model import encode_response, load_reward_model, prompt_messages, wilson_interval

def reply_text(tok: ChatTokenizer, completion: list[int]) -> str:
    return tok.decode([t for t in completion if t not in (tok.end, tok.eos)])


def fit_context(prompts: list[list[int]], max_new_tokens: int, seq_len: int) -> list[int]:
    """Indices of the prompts that leave room for max_new_tokens in the model's context."""
    return [i for i, ids in enumerate(prompts) if len(ids) + max_new_tokens <= seq_len]


class RewardModelReward:
    """Rewards from a reward model, on the first user turns of preference prompts (RLHF)."""

    def __init__(self, cfg, reward: Artifact, records: list[dict], tok: ChatTokenizer, seq_len: int,
                 vocab_size: int):
        self.rm = load_reward_model(reward.path).requires_grad_(False).eval()
        if self.rm.gpt.cfg.vocab_size != vocab_size:
            raise StageError("the reward model and the policy use different tokenizers: train the reward model "
                             "from this chat model")
        self.tok, self.seq_len, self.max_new = tok, seq_len, cfg.max_new_tokens
        prompts = []
        for r in records:
            msgs = prompt_messages(r["prompt"])
            msgs = msgs[:1] if cfg.first_turn_only else msgs
            if msgs:
                prompts.append(tok.render_prompt(msgs))
        prompts = [prompts[i] for i in fit_context(prompts, cfg.max_new_tokens, seq_len)]
        if len(prompts) < cfg.prompts_per_step + 1:
            raise StageError(f"only {len(prompts)} prompts fit the context with max_new_tokens="
                             f"{cfg.max_new_tokens}: lower rl.max_new_tokens or give more prompts")
        self.train, self.val = split_heldout(prompts, cfg.val_prompts / len(prompts), cfg.seed)
        self.stats = {"prompts": len(prompts)}

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
    """Rewards from checking the final number of each reply against the problem's answer (verifiers.py).

    records: imported {question, answer} problems, split into training and held-out ones; None: the seeded
    arithmetic generator (cfg.arithmetic_*), whose held-out problems are never training problems."""

    def __init__(self, cfg, records: list[dict] | None, name: str, tok: ChatTokenizer, seq_len: int):
        self.tok, self.max_new, self.format_reward = tok, cfg.max_new_tokens, cfg.format_reward
        if records is None:
            train, val = verifiers.arithmetic_problems(cfg.arithmetic_max, cfg.arithmetic_train, cfg.val_prompts,
                                                       cfg.seed)
        else:
            if len(records) < 2:
                raise StageError(f"{name} holds {len(records)} problem(s): RL needs training and held-out ones")
            train, val = split_heldout(records, cfg.val_prompts / len(records), cfg.seed)
        encode = lambda ps: [tok.render_prompt([{"role": "user", "content": p["question"]}]) for p in ps]  # noqa: E731
        train_ids, val_ids = encode(train), encode(val)
        keep_train = fit_context(train_ids, cfg.max_new_tokens, seq_len)
        keep_val = fit_context(val_ids, cfg.max_new_tokens, seq_len)
        if len(keep_train) < cfg.prompts_per_step or not keep_val:
            raise StageError(f"{len(keep_train)} training and {len(keep_val)} held-out problems fit the context "
                             f"with max_new_tokens={cfg.max_new_tokens}: lower rl.max_new_tokens or give more "
                             f"(or shorter) problems")
        self.train = [train_ids[i] for i in keep_train]
        self.train_answers = [str(train[i]["answer"]) for i in keep_train]
        self.val = [val_ids[i] for i in keep_val]
        self.val_answers = [str(val[i]["answer"]) for i in keep_val]
        self.stats = {"problems": name, "train_problems": len(self.train), "val_problems": len(self.val),
                      "too_long": len(train) + len(val) - len(self.train) - len(self.val)}

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


# ---- DPO -------------------------------------------------------------------------------------------------------
Side = tuple[list[int], list[int]]  # (ids, mask over the targets ids[1:]: 1 on the response and its <|end|>)


def encode_side(tok: ChatTokenizer, prompt: list[int], text: str, max_len: int) -> Side:
    """prompt + response + <|end|> in at most max_len tokens: the response keeps up to half, the prompt its end."""
    response = tok.encode(text.strip())[: max_len // 2 - 1] + [tok.end]
    prompt = prompt[-(max_len - len(response)):]
    return prompt + response, [0] * (len(prompt) - 1) + [1] * len(response)


def dpo_pairs(cfg, records: list[dict], tok: ChatTokenizer, seq_len: int) -> tuple[list, list]:
    """(train, held-out) lists of (chosen, rejected) Sides; cfg.val_prompts pairs are held out."""
    if len(records) < 2:
        raise StageError(f"{len(records)} preference pair(s): DPO needs training and held-out pairs")
    pairs = []
    for r in records:
        p = tok.render_prompt(prompt_messages(r["prompt"]))
        pairs.append((encode_side(tok, p, r["chosen"], seq_len), encode_side(tok, p, r["rejected"], seq_len)))
    return split_heldout(pairs, min(cfg.val_prompts / len(pairs), 0.5), cfg.seed)


@torch.no_grad()
def pair_logps(model, pairs: list, pad: int, batch_size: int = 16) -> torch.Tensor:
    """(len(pairs), 2): summed response log-probabilities of each pair's chosen and rejected side."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        sides = [s for pair in pairs[i:i + batch_size] for s in pair]  # chosen, rejected, chosen, ...
        x = pad_batch([ids for ids, _ in sides], pad).to(dev)
        m = pad_batch([mask for _, mask in sides], 0).to(dev).float()[:, : x.size(1) - 1]
        out.append(sequence_logprobs(model(x[:, :-1]), x, m).view(-1, 2).cpu())
    model.train(was_training)
    return torch.cat(out)


def dpo_eval(policy, ref, pairs: list, pad: int, beta: float) -> dict:
    """On held-out pairs: the policy's log-probability margin (chosen - rejected), and its implicit reward
    beta x log(pi / ref): mean margin and pairwise accuracy (ties are not wins) with a 95% Wilson interval."""
    lp, lr = pair_logps(policy, pairs, pad), pair_logps(ref, pairs, pad)
    reward = beta * (lp - lr)
    margins = reward[:, 0] - reward[:, 1]
    correct = int((margins > 0).sum())
    return {"logp_margin": float((lp[:, 0] - lp[:, 1]).mean()), "reward_margin": float(margins.mean()),
            "accuracy": correct / len(pairs), "accuracy_ci95": list(wilson_interval(correct, len(pairs)))}
