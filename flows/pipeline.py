"""The whole DAG, Common Crawl -> assistant, as one Prefect flow. Read it top to bottom.

    crawl2chat run --preset tiny                     # or: python -m flows.pipeline tiny

Each line is one stage (stages/<name>.py) and the artifacts it reads. A stage whose recipe is unchanged is
reused from the artifact store; `--set stage.field=value` re-runs that stage and everything downstream.
Without a Prefect server configured (PREFECT_API_URL), `crawl2chat run` starts a temporary one (flows/server.py);
`python -m flows.pipeline` uses Prefect's own.
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.runtime import flow_run

from flows import presets
from flows.deploy import TRAINING, run_training
from flows.tasks import run_stage
from stages import (download, evaluate, extract, import_data, pretrain, reward_model, rl, sft, tokenize_shards,
                    train_tokenizer)


class _Until(Exception):
    """Raised after the stage named by --until: the flow stops there on purpose."""


def rl_inputs(cfg: rl.Config, reward, preferences, problems) -> list:
    """What rl reads after the chat model (it sorts them by stage and kind): DPO learns from the pairs alone;
    RLHF scores replies to the pairs' prompts with the reward model; the verifier checks the problems' answers
    (without problems, its seeded arithmetic)."""
    if cfg.method == "dpo":
        return [preferences]
    if cfg.reward == "reward_model":
        return [reward, preferences]
    return [problems] if problems else []


def run_name() -> str:
    """`tiny-3fa2c1d9`: the preset and a short hash of its whole recipe, overrides included."""
    p = flow_run.parameters
    cfg = presets.load(p["preset"], list(p.get("overrides") or ()), p.get("source"))
    return f"{p['preset']}-{presets.recipe_id(cfg)}"


@flow(name="crawl2chat", flow_run_name=run_name, validate_parameters=False)
def end_to_end(preset: str = "tiny", overrides: list[str] = (), source: str | None = None,
               until: str | None = None, root: str = "artifacts", train_on: str | None = None) -> list[str]:
    """train_on: a deployment (crawl2chat-train/train, gpu pool) that builds each training stage as its own
    run, which can be cancelled and retried alone; run_stage below then finds that run's artifact committed."""
    cfg = presets.load(preset, list(overrides), source)
    built: list[str] = []

    def stage(module, *inputs, slot: str | None = None):
        """slot: the PipelineConfig field of a stage that runs with several configs (the imports)."""
        stage_cfg = cfg.stage(slot or module.NAME)
        if train_on and module.NAME in TRAINING:  # -> the config whose version that run committed
            stage_cfg = run_training(module.NAME, stage_cfg, preset, list(overrides), source, root, train_on)
        art = run_stage(module, stage_cfg, list(inputs), root, slot)
        built.append(art.ref)
        if until and until in (module.NAME, slot):
            raise _Until
        return art

    def importing(kind: str):
        return stage(import_data, slot=kind) if cfg.stage(kind).source else None

    try:
        warcs = stage(download)                          # Common Crawl listing -> WARC files
        docs = stage(extract, warcs)                     # WARCs -> filtered documents (Parquet)
        tokenizer = stage(train_tokenizer, docs)         # documents -> SentencePiece BPE
        shards = stage(tokenize_shards, docs, tokenizer)  # documents -> token shards (Arrow)
        base = stage(pretrain, shards, tokenizer)        # base model (DeepSpeed)
        card = stage(evaluate, base, shards)             # bits per byte, HellaSwag
        conversations = importing("conversations")      # JSONL files or URLs -> versioned records,
        preferences = importing("preferences")          # malformed lines counted by line number
        problems = importing("problems")                # none by default: rl draws seeded arithmetic
        chat = stage(sft, base, conversations)           # chat model: packed conversations, assistant-token loss
        reward = stage(reward_model, chat, preferences)  # Bradley-Terry on human preference pairs
        card = stage(evaluate, chat, reward, card)       # + GSM8K, reward-model score
        assistant = stage(rl, chat, *rl_inputs(cfg.rl, reward, preferences, problems))  # GRPO/PPO/DPO, KL-bound
        stage(evaluate, assistant, reward, chat, card)   # + win rate against the chat model: the report card
    except _Until:
        pass
    return built


if __name__ == "__main__":
    print(end_to_end(sys.argv[1] if len(sys.argv) > 1 else "tiny"))
