"""Supervised fine-tuning: base model + conversations -> chat model, loss on assistant tokens only.

    python -m stages.sft --root artifacts --input pretrain \
        --set data=data/conversations/hh-rlhf-dialogues.800.jsonl --set steps=100

Conversations are JSONL lines `{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}`,
encoded with the one chat format of stages/lm/chat.py and truncated to the model's context. A deterministic
held-out part measures the assistant-token loss of the base model before training and of the chat model
after, so the manifest shows what SFT bought. A crash resumes from the newest checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass

import torch

from stages.artifacts import Artifact
from stages.common import main
from stages.lm import trainer
from stages.lm.chat import ROLES, ChatTokenizer
from stages.lm.checkpoint import TOKENIZER, load_model, save_model
from stages.lm.examples import ExampleLoader, pad_batch, read_jsonl, split_heldout

NAME = "sft"
CODE_VERSION = 1


@dataclass(frozen=True)
class Config(trainer.TrainConfig):
    data: str = "data/conversations/hh-rlhf-dialogues.800.jsonl"  # JSONL of {"messages": [...]}
    val_fraction: float = 0.05    # held-out conversations for the assistant-token loss
    steps: int = 300
    micro_batch_size: int = 8
    lr: float = 1e-4              # lower than pre-training: adapt, don't overwrite
    warmup_steps: int = 20
    max_val: int = 200            # held-out conversations evaluated (bounds eval time)


def check_conversation(rec: dict) -> str | None:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "no 'messages' list"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"a message is not {{role: {'|'.join(ROLES)}, content: str}}"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant turn to learn from"
    return None


def collate(examples: list[tuple[list[int], list[int]]], pad: int):
    """(ids, mask) pairs -> x (B, T), y (B, T) with -1 where no loss is taken."""
    x = pad_batch([ids[:-1] for ids, _ in examples], pad)
    y = pad_batch([[t if m else -1 for t, m in zip(ids[1:], mask[1:])] for ids, mask in examples], -1)
    return x, y


@torch.no_grad()
def assistant_loss(model, examples, pad: int, batch_size: int = 8) -> float:
    """Mean cross-entropy (nats) over the assistant tokens of the examples."""
    model.eval()
    dev = next(model.parameters()).device
    nats, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i:i + batch_size], pad)
        nats += model(x.to(dev), y.to(dev), reduction="sum").item()
        n += int((y != -1).sum())
    model.train()
    return nats / max(n, 1)


def run(cfg: Config, base: Artifact, *, out: Artifact) -> dict:
    model, meta, _ = load_model(base.path)
    tok = ChatTokenizer(base.path / TOKENIZER)
    records, malformed = read_jsonl(cfg.data, check_conversation)
    encoded = [tok.encode_conversation(r["messages"], max_len=model.cfg.seq_len + 1) for r in records]
    encoded = [e for e in encoded if sum(e[1][1:]) > 0]  # truncation can cut every assistant token
    train, val = split_heldout(encoded, cfg.val_fraction, cfg.seed)
    val = val[:cfg.max_val]
    base_loss = assistant_loss(model, val, tok.pad)

    torch.manual_seed(cfg.seed)
    engine = trainer.make_engine(model, cfg)
    loader = ExampleLoader(train, cfg.micro_batch_size, cfg.seed, lambda b: collate(b, tok.pad))

    def loss_fn(eng, batch):
        x, y = batch
        return eng(x.to(eng.device), y.to(eng.device))

    history = trainer.fit(engine, cfg, cfg.steps, loader, loss_fn, out.path / "checkpoints")
    chat_loss = assistant_loss(engine.module, val, tok.pad)
    save_model(engine.module, out.path, base.path / TOKENIZER,
               {"stage": NAME, "tokenizer_sha256": meta["tokenizer_sha256"]})
    shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
    return {
        "conversations": len(records),
        "malformed": {"count": len(malformed), "lines": malformed[:50]},
        "train_conversations": len(train),
        "val_conversations": len(val),
        "val_assistant_loss_base": base_loss,
        "val_assistant_loss": chat_loss,
        "improved_over_base": chat_loss < base_loss,
        "train_loss": history[-1]["loss"],
        "curve": trainer.thin(history),
    }


if __name__ == "__main__":
    main(sys.modules[__name__])

