"""Presets: functions that start from a base PipelineConfig and change a few fields.

    tiny  the smoke run: the Common Crawl sample that ships in data/tiny-cc, a 2-layer model, whole DAG on
          2 CPU cores in minutes. Tests and CI use it.
    small a 12-layer model on 8 live Common Crawl files; a single GPU in hours.
    d20   nanochat's speedrun size (depth 20, about 560M parameters) on 240 live files; one 8xH100 node.

Model size follows one dial, pretrain.depth (width, heads, learning rate and token budget derive from it).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from stages import (download, evaluate, extract, import_data, pretrain, reward_model, rl, sft, tokenize_shards,
                    train_tokenizer)
from stages.artifacts import canonical_json
from stages.common import StageError, apply_overrides, parse_assignment, recipe_dict

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"

# The DAG's stages in order; flows/pipeline.py wires their inputs.
STAGES = {m.NAME: m for m in (download, extract, train_tokenizer, tokenize_shards, pretrain, import_data, sft,
                              reward_model, rl, evaluate)}
# The imports run three times, once per kind of data, each with a config slot of its own in PipelineConfig
# (`--set preferences.source=...`) and a store alias named after the slot (import_data/preferences).
IMPORTS = import_data.KINDS


def slot_module(slot: str):
    """The stage module that a PipelineConfig slot configures: import_data for the three imports."""
    return import_data if slot in IMPORTS else STAGES[slot]


def slot_alias(slot: str) -> tuple[str, str]:
    """(stage, alias) under which the pipeline records a slot's newest artifact: `latest` for a stage that runs
    with one config, the slot's name for the imports (so three imports never share one alias)."""
    return (import_data.NAME, slot) if slot in IMPORTS else (slot, "latest")


def _import(kind: str):
    return field(default_factory=lambda: import_data.Config(kind=kind, source=import_data.DEFAULT_SOURCES[kind]))


@dataclass(frozen=True)
class PipelineConfig:
    preset: str = "base"
    download: download.Config = field(default_factory=download.Config)
    extract: extract.Config = field(default_factory=extract.Config)
    train_tokenizer: train_tokenizer.Config = field(default_factory=train_tokenizer.Config)
    tokenize_shards: tokenize_shards.Config = field(default_factory=tokenize_shards.Config)
    pretrain: pretrain.Config = field(default_factory=pretrain.Config)
    # The imports: the bundled samples (data/README.md). No problems are bundled, so rl's verifier draws seeded
    # arithmetic unless `--set problems.source=PATH_OR_URL` names a GSM8K-style file to import.
    conversations: import_data.Config = _import("conversations")
    preferences: import_data.Config = _import("preferences")
    problems: import_data.Config = _import("problems")
    sft: sft.Config = field(default_factory=sft.Config)
    reward_model: reward_model.Config = field(default_factory=reward_model.Config)
    rl: rl.Config = field(default_factory=rl.Config)
    evaluate: evaluate.Config = field(default_factory=evaluate.Config)

    def stage(self, name: str):
        return getattr(self, name)


def _set(cfg: PipelineConfig, **stages: dict) -> PipelineConfig:
    """Change fields of several stage configs: _set(cfg, pretrain=dict(depth=2), sft=dict(steps=10))."""
    return replace(cfg, **{name: replace(cfg.stage(name), **changes) for name, changes in stages.items()})


def base() -> PipelineConfig:
    return PipelineConfig()


def tiny() -> PipelineConfig:
    cfg = _set(
        base(),
        download=dict(source=str(DATA / "tiny-cc"), crawl="CC-MAIN-2024-22", num_files=0),
        extract=dict(workers=1),  # 5 small files: one process beats paying start-up for a second
        train_tokenizer=dict(vocab_size=2048, heldout_chars=50_000),
        tokenize_shards=dict(val_fraction=0.1),
        pretrain=dict(depth=2, head_dim=32, seq_len=256, steps=300, batch_size=16, lr=3e-3,
                      warmup_steps=20, eval_sequences=320, checkpoint_every=100),
        sft=dict(steps=150, lr=1e-3, batch_size=8, checkpoint_every=100),
        reward_model=dict(steps=150, lr=3e-4, batch_size=8, checkpoint_every=100),
        rl=dict(steps=20, lr=1e-4, group_size=8, prompts_per_step=4, max_new_tokens=32, checkpoint_every=10),
        evaluate=dict(hellaswag_items=200, gsm8k_items=20, gsm8k_max_new_tokens=64),
    )
    return replace(cfg, preset="tiny")


def small() -> PipelineConfig:
    cfg = _set(
        base(),
        download=dict(num_files=8),
        train_tokenizer=dict(vocab_size=32768),
        pretrain=dict(depth=12, seq_len=1024, batch_size=128),  # 131,072 tokens a step
    )
    return replace(cfg, preset="small")


def d20() -> PipelineConfig:
    cfg = _set(
        base(),
        download=dict(num_files=240),
        train_tokenizer=dict(vocab_size=65536),
        pretrain=dict(depth=20, seq_len=2048, batch_size=256),  # 524,288 tokens a step, nanochat's
        sft=dict(steps=2000), reward_model=dict(steps=2000), rl=dict(steps=500),
    )
    return replace(cfg, preset="d20")


PRESETS = {"tiny": tiny, "small": small, "d20": d20}
# What `--set slot.field=value` can name: every stage but import_data, which is set per kind.
SLOTS = [f.name for f in dataclasses.fields(PipelineConfig) if f.name != "preset"]


def load(preset: str, overrides: list[str] = (), source: str | None = None) -> PipelineConfig:
    """The preset with `--source` and `stage.field=value` overrides applied; errors name the fix."""
    if preset not in PRESETS:
        raise StageError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    if source:
        cfg = _set(cfg, download=dict(source=source))
    per_stage: dict[str, dict[str, str]] = {}
    for text in overrides:
        key, value = parse_assignment(text, "stage.field=value, e.g. pretrain.steps=100")
        slot, dot, fld = key.partition(".")
        if not dot or slot not in SLOTS:
            raise StageError(f"override '{text}' must name a stage: stage.field=value with stage one of "
                             f"{', '.join(SLOTS)}")
        per_stage.setdefault(slot, {})[fld] = value
    return replace(cfg, **{s: apply_overrides(cfg.stage(s), o, s) for s, o in per_stage.items()})


def describe(cfg: PipelineConfig) -> dict:
    return dataclasses.asdict(cfg)


def recipe_id(cfg: PipelineConfig) -> str:
    """8 hex digits that change with any field of any stage's recipe (runtime fields aside): flow runs are named
    `{preset}-{recipe_id}`, so the runs page reads as a history of what was run."""
    recipe = {slot: recipe_dict(cfg.stage(slot)) for slot in SLOTS}
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()[:8]
