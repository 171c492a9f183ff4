"""The whole DAG, Common Crawl -> assistant, as one Prefect flow. Read it top to bottom.

    crawl2chat run --preset tiny                     # or: python -m flows.pipeline tiny

Each line is one stage (stages/<name>.py) and the artifacts it reads. A stage whose recipe is unchanged is
reused from the artifact store; `--set stage.field=value` re-runs that stage and everything downstream.
Without a Prefect server configured (PREFECT_API_URL), Prefect runs its embedded local API.
"""

from __future__ import annotations

import sys

from prefect import flow

from flows import presets
from flows.tasks import run_stage
from stages import (download, evaluate, extract, pretrain, reward_model, rl, sft, tokenize_shards,
                    train_tokenizer)


class _Until(Exception):
    """Raised after the stage named by --until: the flow stops there on purpose."""


@flow(name="crawl2chat", flow_run_name="{preset}", validate_parameters=False)
def end_to_end(preset: str = "tiny", overrides: list[str] = (), source: str | None = None,
               until: str | None = None, root: str = "artifacts") -> list[str]:
    cfg = presets.load(preset, list(overrides), source)
    built: list[str] = []

    def stage(module, *inputs):
        art = run_stage(module, cfg.stage(module.NAME), list(inputs), root)
        built.append(art.ref)
        if module.NAME == until:
            raise _Until
        return art

    try:
        warcs = stage(download)                          # Common Crawl listing -> WARC files
        docs = stage(extract, warcs)                     # WARCs -> filtered documents (Parquet)
        tokenizer = stage(train_tokenizer, docs)         # documents -> SentencePiece BPE
        shards = stage(tokenize_shards, docs, tokenizer)  # documents -> token shards (Arrow)
        base = stage(pretrain, shards, tokenizer)        # base model (DeepSpeed)
        card = stage(evaluate, base, shards)             # bits per byte, HellaSwag
        chat = stage(sft, base)                          # chat model: conversations, assistant-token loss
        reward = stage(reward_model, chat)               # Bradley-Terry on human preference pairs
        card = stage(evaluate, chat, reward, card)       # + GSM8K, reward-model score
        judge = [reward] if cfg.rl.reward == "reward_model" else []  # RLHF, or rl.reward=verifier (math)
        assistant = stage(rl, chat, *judge)              # GRPO, KL penalty to the chat model
        stage(evaluate, assistant, reward, chat, card)   # + win rate against the chat model: the report card
    except _Until:
        pass
    return built


if __name__ == "__main__":
    print(end_to_end(sys.argv[1] if len(sys.argv) > 1 else "tiny"))
