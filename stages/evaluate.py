"""Evaluate any model artifact and add a row to the report card of its lineage.

    python -m stages.evaluate --root artifacts --input pretrain --input tokenize_shards
    python -m stages.evaluate --root artifacts --input rl --input reward_model --input sft --input evaluate/<earlier>

Inputs: the model first, then any of (identified by their stage name):
    tokenize_shards  -> val loss and bits per byte on its val split (tokenizer-independent)
    reward_model     -> mean reward-model score of greedy replies to held-out prompts
    sft              -> with a reward model: win rate of this model's replies against the SFT model's
    evaluate         -> earlier report-card rows (base -> sft -> rl) to carry into this one
Every model gets HellaSwag accuracy by log-likelihood (the ending with the highest mean log-probability per
token wins, as lm-evaluation-harness's acc_norm does with characters); chat models (sft, rl) also get GSM8K
accuracy from greedy answers in the chat format (the last number of the reply against the one after '####').
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages.artifacts import Artifact
from stages.common import StageError, main
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import TOKENIZER, load_model
from stages.lm.engine import generate
from stages.lm.examples import read_jsonl

NAME = "evaluate"
CODE_VERSION = 1
REPO = Path(__file__).resolve().parent.parent
CARD = "report_card.md"


@dataclass(frozen=True)
class Config:
    hellaswag: str = str(REPO / "data/eval/hellaswag-val.shared500.jsonl")  # HellaSwag val, 500 items
    hellaswag_items: int = 500
    gsm8k: str = str(REPO / "data/eval/gsm8k-test.shared300.jsonl")         # GSM8K test, 300 problems
    gsm8k_items: int = 100
    gsm8k_max_new_tokens: int = 256
    prompts: str = str(REPO / "data/preferences/hh-rlhf-pairs.800.jsonl")   # for reward score and win rate
    reward_prompts: int = 32      # the last N first-turn prompts of the file (RL may have trained on some)
    reward_max_new_tokens: int = 48
    val_sequences: int = 320      # val windows (the model's seq_len tokens each) for bits per byte

    def __post_init__(self):
        if min(self.hellaswag_items, self.gsm8k_items, self.reward_prompts) < 0:
            raise ValueError("item counts must be 0 (skip) or more")


# ---- HellaSwag ------------------------------------------------------------------------------------------------
@torch.no_grad()
def hellaswag(model, tok: ChatTokenizer, path: str, n: int) -> dict:
    items, _ = read_jsonl(path, lambda r: None if {"ctx", "endings", "label"} <= r.keys() else "not HellaSwag")
    items = items[:n]
    correct = 0
    for it in items:
        ctx = [tok.bos] + tok.encode(it["ctx"])
        scores = []
        for ending in it["endings"]:
            cont = tok.encode(" " + ending)
            ids = (ctx + cont)[-model.cfg.seq_len:]
            x = torch.tensor([ids[:-1]])
            logp = F.log_softmax(model(x).float(), -1)[0]
            n_cont = min(len(cont), len(ids) - 1)
            targets = torch.tensor(ids[-n_cont:])
            scores.append(float(logp[-n_cont:].gather(1, targets[:, None]).mean()))
        correct += int(np.argmax(scores) == it["label"])
    return {"hellaswag_acc": correct / max(len(items), 1), "hellaswag_items": len(items)}


# ---- GSM8K ----------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in a text, without thousands separators ('1,200.0' -> '1200')."""
    found = _NUMBER.findall(text.split("####")[-1] if "####" in text else text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


@torch.no_grad()
def gsm8k(model, tok: ChatTokenizer, path: str, n: int, max_new: int) -> dict:
    items, _ = read_jsonl(path, lambda r: None if {"question", "answer"} <= r.keys() else "not GSM8K")
    items = items[:n]
    correct = 0
    for it in items:
        prompt = tok.render_prompt([{"role": "user", "content": it["question"]}])
        if len(prompt) >= model.cfg.seq_len:
            continue
        reply = tok.decode([t for t in generate(model, prompt, 1, max_new, temperature=0,
                                                stop_ids=(tok.end, tok.eos))[0] if t not in (tok.end, tok.eos)])
        correct += int(final_number(reply) == final_number(it["answer"]))
    return {"gsm8k_acc": correct / max(len(items), 1), "gsm8k_items": len(items)}


# ---- reward model: score and win rate -------------------------------------------------------------------------
@torch.no_grad()
def reward_eval(model, reference, rm, tok: ChatTokenizer, cfg: Config) -> dict:
    from stages.reward_model import encode_response, prompt_messages

    records, _ = read_jsonl(cfg.prompts, lambda r: None if isinstance(r.get("prompt"), str) else "no prompt")
    prompts = []
    for r in records[::-1]:
        ids = tok.render_prompt(prompt_messages(r["prompt"])[:1])
        if len(ids) + cfg.reward_max_new_tokens <= model.cfg.seq_len:
            prompts.append(ids)
        if len(prompts) == cfg.reward_prompts:
            break

    def score(m, p):
        reply = generate(m, p, 1, cfg.reward_max_new_tokens, temperature=0, stop_ids=(tok.end, tok.eos))[0]
        s = encode_response(tok, p, reply, model.cfg.seq_len)
        return float(rm(torch.tensor([s]), torch.tensor([len(s)]))[0])

    mine = [score(model, p) for p in prompts]
    out = {"reward_mean": float(np.mean(mine)), "reward_prompts": len(prompts)}
    if reference is not None:
        theirs = [score(reference, p) for p in prompts]
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, theirs))
        out["win_rate_vs_sft"] = wins / max(len(prompts), 1)
    return out


# ---- the report card ------------------------------------------------------------------------------------------
COLUMNS = ("model", "val_bpb", "hellaswag_acc", "gsm8k_acc", "reward_mean", "win_rate_vs_sft")


def card_markdown(rows: list[dict]) -> str:
    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run(cfg: Config, model_art: Artifact, *context: Artifact, out: Artifact) -> dict:
    by_stage: dict[str, list[Artifact]] = {}
    for a in context:
        by_stage.setdefault(a.stage, []).append(a)
    unknown = set(by_stage) - {"tokenize_shards", "reward_model", "sft", "evaluate"}
    if unknown:
        raise StageError(f"evaluate does not know what to do with {sorted(unknown)} inputs: pass a model, then "
                         f"tokenize_shards, reward_model, sft or earlier evaluate artifacts")
    torch.manual_seed(0)
    model, meta, _ = load_model(model_art.path)
    model.eval()
    tok = ChatTokenizer(model_art.path / TOKENIZER)
    row: dict = {"model": model_art.ref}

    if "tokenize_shards" in by_stage:
        from stages.lm.data import ShardIndex, check_tokenizer
        from stages.pretrain import evaluate_lm, token_bytes

        shards = by_stage["tokenize_shards"][0]
        check_tokenizer(ShardIndex.load(shards.path), meta["tokenizer_sha256"])
        ev = evaluate_lm(model, shards.path, model.cfg.seq_len, 16, cfg.val_sequences, token_bytes(tok))
        row.update(val_loss=ev["val_loss"], val_bpb=ev["val_bpb"])
    if cfg.hellaswag_items:
        row.update(hellaswag(model, tok, cfg.hellaswag, cfg.hellaswag_items))
    if meta.get("stage") in ("sft", "rl") and cfg.gsm8k_items:
        row.update(gsm8k(model, tok, cfg.gsm8k, cfg.gsm8k_items, cfg.gsm8k_max_new_tokens))
    if "reward_model" in by_stage and cfg.reward_prompts:
        from stages.reward_model import load_reward_model

        rm = load_reward_model(by_stage["reward_model"][0].path).eval()
        reference = load_model(by_stage["sft"][0].path)[0].eval() if "sft" in by_stage else None
        row.update(reward_eval(model, reference, rm, tok, cfg))

    rows = [r for e in by_stage.get("evaluate", []) for r in json.loads((e.path / "metrics.json").read_text())["card"]]
    rows.append(row)
    (out.path / "metrics.json").write_text(json.dumps({"row": row, "card": rows}, indent=2))
    (out.path / CARD).write_text(card_markdown(rows))
    return {**{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))},
            "report_card": card_markdown(rows)}


if __name__ == "__main__":
    main(sys.modules[__name__])
