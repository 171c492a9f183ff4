"""flows.presets, litgpt-style: every preset builds and validates, overrides apply, tiny is tiny and local."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from flows import presets
from flows.presets import PRESETS, SLOTS, STAGES, PipelineConfig, load, slot_alias, slot_module
from stages.artifacts import canonical_json, plan_version
from stages.common import StageError

REPO = Path(__file__).resolve().parent.parent
ORDER = ["download", "extract", "train_tokenizer", "tokenize_shards", "pretrain", "import_data", "sft", "reward_model",
         "rl", "evaluate"]
IMPORTS = ["conversations", "preferences", "problems"]


def test_stages_in_dag_order():
    assert list(STAGES) == ORDER
    for name, mod in STAGES.items():
        assert mod.NAME == name
        assert isinstance(mod.CODE_VERSION, (int, str))
        assert dataclasses.is_dataclass(mod.Config) and callable(mod.run)
        assert mod.Config.__dataclass_params__.frozen, f"{name}.Config must be frozen"
    # every stage has a slot in the pipeline config: its own name, or one per kind for the imports
    assert SLOTS == ORDER[:5] + IMPORTS + ORDER[6:]
    assert {slot_module(s).NAME for s in SLOTS} == set(STAGES)
    assert [slot_alias(s) for s in ("sft", "preferences")] == [("sft", "latest"), ("import_data", "preferences")]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_and_validates(name):
    cfg = load(name)
    assert isinstance(cfg, PipelineConfig) and cfg.preset == name
    assert cfg == PRESETS[name]()  # deterministic
    for stage in SLOTS:
        mod = slot_module(stage)
        sc = cfg.stage(stage)
        assert isinstance(sc, mod.Config), stage
        # re-construct from its fields: __post_init__ validation runs again and accepts it
        again = mod.Config(**{f.name: getattr(sc, f.name) for f in dataclasses.fields(sc) if f.init})
        assert again == sc
        # its config is JSON (it goes into manifests and versions) and gives a stable version
        d = dataclasses.asdict(sc)
        json.loads(canonical_json(d))
        assert plan_version(stage, mod.CODE_VERSION, d, []) == plan_version(stage, mod.CODE_VERSION, d, [])
    json.dumps(presets.describe(cfg), default=str)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_data_files_exist(name):
    """The imports default to the samples bundled in data/ (the repo works without ../shared), hashed into the
    config so their versions follow their content; no problems are bundled (rl then draws arithmetic)."""
    cfg = load(name)
    for kind in ("conversations", "preferences"):
        src = Path(cfg.stage(kind).source)
        assert cfg.stage(kind).kind == kind and src.is_file() and src.resolve().is_relative_to(REPO / "data")
        assert cfg.stage(kind).source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert cfg.problems.kind == "problems" and cfg.problems.source == ""


def test_tiny_is_local_and_small():
    cfg = load("tiny")
    src = Path(cfg.download.source)
    assert src.is_dir() and src.resolve().is_relative_to(REPO)
    assert (src / "crawl-data" / cfg.download.crawl / "warc.paths.gz").is_file()
    assert cfg.download.num_files <= 0  # all of the bundled sample
    assert cfg.pretrain.depth <= 4
    assert cfg.pretrain.seq_len <= 512
    assert cfg.train_tokenizer.vocab_size <= 4096


def test_presets_grow():
    depths = [load(n).pretrain.depth for n in ("tiny", "small", "d20")]
    assert depths == sorted(depths) and load("d20").pretrain.depth == 20
    for n in ("small", "d20"):
        assert "://" in load(n).download.source  # the live crawl


@pytest.mark.parametrize("name", list(PRESETS))
def test_overrides_apply(name):
    base = load(name)
    cfg = load(name, ["pretrain.depth=3", "pretrain.lr=0.001", "extract.languages=en,de", "sft.steps=7",
                      "download.num_files=2"], source="/some/mirror")
    assert cfg.pretrain.depth == 3 and cfg.pretrain.lr == 0.001
    assert cfg.extract.languages == ("en", "de")
    assert cfg.sft.steps == 7
    assert cfg.download.num_files == 2 and cfg.download.source == "/some/mirror"
    # everything else is untouched
    assert cfg.pretrain.seq_len == base.pretrain.seq_len and cfg.rl == base.rl
    assert cfg.train_tokenizer == base.train_tokenizer
    # the same override given twice: the last one wins
    assert load(name, ["sft.steps=1", "sft.steps=2"]).sft.steps == 2
    assert load(name) == base  # presets are rebuilt, overrides do not leak


@pytest.mark.parametrize("override,changed", [("pretrain.depth=3", "pretrain"),
                                               ("preferences.source=data/conversations/hh-rlhf-dialogues.800.jsonl",
                                                "preferences")])
def test_override_changes_only_that_slots_version(override, changed):
    a, b = load("tiny"), load("tiny", [override])
    for stage in SLOTS:
        mod = slot_module(stage)
        va = plan_version(mod.NAME, mod.CODE_VERSION, dataclasses.asdict(a.stage(stage)), [])
        vb = plan_version(mod.NAME, mod.CODE_VERSION, dataclasses.asdict(b.stage(stage)), [])
        assert (va != vb) == (stage == changed), stage


def test_an_import_source_can_be_set_per_kind(tmp_path):
    src = tmp_path / "problems.jsonl"
    src.write_text('{"question": "What is 1 + 1?", "answer": "#### 2"}\n')
    cfg = load("tiny", [f"problems.source={src}"])
    assert cfg.problems.source == str(src) and cfg.problems.kind == "problems"
    assert cfg.problems.source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert cfg.conversations == load("tiny").conversations


@pytest.mark.parametrize("preset,overrides,source,says", [
    ("nope", [], None, ["nope", "tiny", "small", "d20"]),
    ("tiny", ["pretrain.nosuch=1"], None, ["nosuch", "depth"]),
    ("tiny", ["nostage.x=1"], None, ["nostage", "download"]),
    ("tiny", ["depth=3"], None, ["depth=3", "stage.field=value"]),
    ("tiny", ["badformat"], None, ["badformat", "field=value"]),
    ("tiny", ["pretrain.depth=abc"], None, ["pretrain.depth", "abc"]),
    ("tiny", ["pretrain.depth=0"], None, ["depth"]),
    ("tiny", ["download.crawl=nope"], None, ["crawl"]),
    ("tiny", ["conversations.source=/no/such.jsonl"], None, ["conversations", "cannot read source", "/no/such"]),
    ("tiny", ["import_data.source=x"], None, ["import_data.source=x", "conversations"]),
])
def test_load_errors_name_the_fix(preset, overrides, source, says):
    with pytest.raises(StageError) as e:
        load(preset, overrides, source)
    for word in says:
        assert word in str(e.value), (word, str(e.value))
