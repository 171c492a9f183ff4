"""Supervised fine-tuning: base model + conversations -> chat model, loss on assistant tokens only.

    python -m stages.sft --root artifacts --input pretrain --input import_data/conversations --set steps=100

The conversations come from an import_data artifact (kind conversations), encoded with the one chat format of
stages/lm/chat.py and truncated to the model's context. Training packs several conversations into each row of
seq_len tokens (best-fit, stages/lm/examples.pack) so little compute goes to padding; each keeps its own
assistant-only loss mask. Packed conversations are not masked from each other: each one opens with <|bos|>, as
documents do in pre-training, and a block-diagonal attention mask would push SDPA off its flash kernel onto a
dense (B, 1, T, T) mask (the held-out loss is measured one conversation per row, so it shows any harm). A
deterministic held-out part measures the assistant-token loss of the base model before training and of the
chat model after, so the manifest shows what SFT bought. A crash resumes from the newest checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass

import torch

from stages import import_data
from stages.artifacts import Artifact
from stages.common import main
from stages.lm import trainer
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import TOKENIZER, load_model, save_model
from stages.lm.examples import ExampleLoader, pack, pad_batch, real_fraction, split_heldout

NAME = "sft"
CODE_VERSION = 3  # 2: conversations from an import_data artifact; packed rows. 3: global batch_size


@dataclass(frozen=True)
class Config(trainer.TrainConfig):
    pack: bool = True             # several conversations per row (False: one per row, padded to the batch's longest)
    val_fraction: float = 0.05    # held-out conversations for the assistant-token loss
    steps: int = 300
    batch_size: int = 8           # rows per optimizer step, all ranks (a packed row holds one or more conversations)
    lr: float = 1e-4              # lower than pre-training: adapt, don't overwrite
    warmup_steps: int = 20
    max_val: int = 200            # held-out conversations evaluated (bounds eval time)


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


def run(cfg: Config, base: Artifact, conversations: Artifact, *, out: Artifact) -> dict:
    records = import_data.load_records(conversations, "conversations")
    model, meta, _ = load_model(base.path)
    tok = ChatTokenizer(base.path / TOKENIZER)
    row_len = model.cfg.seq_len + 1  # a row gives seq_len inputs and seq_len shifted targets
    encoded = [tok.encode_conversation(r["messages"], max_len=row_len) for r in records]
    encoded = [e for e in encoded if sum(e[1][1:]) > 0]  # truncation can cut every assistant token
    train, val = split_heldout(encoded, cfg.val_fraction, cfg.seed)
    val = val[:cfg.max_val]
    base_loss = assistant_loss(model, val, tok.pad)

    rows = pack(train, row_len) if cfg.pack else train
    cfg = trainer.plan_batch(cfg, model)
    # compute spent on real tokens (inputs, so each sequence's length - 1), as trained and as padding alone would
    fraction = real_fraction([len(ids) - 1 for ids, _ in rows], cfg.micro_batch_size, cfg.seed)
    fraction_unpacked = real_fraction([len(ids) - 1 for ids, _ in train], cfg.micro_batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    engine = trainer.make_engine(model, cfg)
    # Several ranks (stages/lm/launch.py): each trains on its own rows of every step; rank 0 writes the outputs.
    rank, world = trainer.rank_world()
    loader = ExampleLoader(rows, cfg.micro_batch_size, cfg.seed, lambda b: collate(b, tok.pad), rank, world,
                           cfg.grad_accum)

    def loss_fn(eng, batch):  # summed over the micro batch's assistant tokens; fit averages over the batch's
        x, y = batch
        return eng(x.to(eng.device), y.to(eng.device), reduction="sum")

    def assistant_tokens(batch) -> int:
        return int((batch[1] != -1).sum())

    # every assistant token of a step weighs the same, however many share a packed row or a micro batch
    history = trainer.fit(engine, cfg, cfg.steps, loader, loss_fn, out.path / "checkpoints", count_fn=assistant_tokens)
    chat_loss = assistant_loss(engine.module, val, tok.pad)  # every rank: ZeRO-3 gathers weights collectively
    with trainer.whole_params(engine.module):
        if rank == 0:
            save_model(engine.module, out.path, base.path / TOKENIZER,
                       {"stage": NAME, "tokenizer_sha256": meta["tokenizer_sha256"]})
    if rank == 0:
        shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
    return {
        "conversations": len(records),
        "truncated": sum(len(ids) == row_len for ids, _ in encoded),
        "train_conversations": len(train),
        "train_rows": len(rows),
        "world_size": world,
        "real_token_fraction": fraction,
        "real_token_fraction_unpacked": fraction_unpacked,
        "val_conversations": len(val),
        "val_assistant_loss_base": base_loss,
        "val_assistant_loss": chat_loss,
        "improved_over_base": chat_loss < base_loss,
        "train_loss": history[-1]["loss"],
        "curve": trainer.thin(history),
    }


if __name__ == "__main__":
    main(sys.modules[__name__])

