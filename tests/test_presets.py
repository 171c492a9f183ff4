"""flows.presets, litgpt-style: every preset builds and validates, overrides apply, tiny is tiny and local."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from flows import presets
from flows.presets import PRESETS, STAGES, PipelineConfig, load
from stages.artifacts import canonical_json, plan_version
from stages.common import StageError

REPO = Path(__file__).resolve().parent.parent
ORDER = ["download", "extract", "train_tokenizer", "tokenize_shards", "pretrain", "sft", "reward_model", "rl", "evaluate"]


def test_stages_in_dag_order():
    assert list(STAGES) == ORDER
    for name, mod in STAGES.items():
        assert mod.NAME == name
        assert isinstance(mod.CODE_VERSION, (int, str))
        assert dataclasses.is_dataclass(mod.Config) and callable(mod.run)
        assert mod.Config.__dataclass_params__.frozen, f"{name}.Config must be frozen"
        assert PipelineConfig.__dataclass_fields__[name]  # every stage has a slot in the pipeline config


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_and_validates(name):
    cfg = load(name)
    assert isinstance(cfg, PipelineConfig) and cfg.preset == name
    assert cfg == PRESETS[name]()  # deterministic
    for stage, mod in STAGES.items():
        sc = cfg.stage(stage)
        assert isinstance(sc, mod.Config), stage
        # re-construct from its fields: __post_init__ validation runs again and accepts it
        again = mod.Config(**{f.name: getattr(sc, f.name) for f in dataclasses.fields(sc)})
        assert again == sc
        # its config is JSON (it goes into manifests and versions) and gives a stable version
        d = dataclasses.asdict(sc)
        json.loads(canonical_json(d))
        assert plan_version(stage, mod.CODE_VERSION, d, []) == plan_version(stage, mod.CODE_VERSION, d, [])
    json.dumps(presets.describe(cfg), default=str)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_data_files_exist(name):
    cfg = load(name)
    assert Path(cfg.sft.data).is_file()
    assert Path(cfg.reward_model.data).is_file()
    assert Path(cfg.rl.prompts).is_file()


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


def test_override_changes_only_downstream_versions():
    a, b = load("tiny"), load("tiny", ["pretrain.depth=3"])
    for stage, mod in STAGES.items():
        va = plan_version(stage, mod.CODE_VERSION, dataclasses.asdict(a.stage(stage)), [])
        vb = plan_version(stage, mod.CODE_VERSION, dataclasses.asdict(b.stage(stage)), [])
        assert (va != vb) == (stage == "pretrain"), stage


@pytest.mark.parametrize("preset,overrides,source,says", [
    ("nope", [], None, ["nope", "tiny", "small", "d20"]),
    ("tiny", ["pretrain.nosuch=1"], None, ["nosuch", "depth"]),
    ("tiny", ["nostage.x=1"], None, ["nostage", "download"]),
    ("tiny", ["depth=3"], None, ["depth=3", "stage.field=value"]),
    ("tiny", ["badformat"], None, ["badformat", "field=value"]),
    ("tiny", ["pretrain.depth=abc"], None, ["pretrain.depth", "abc"]),
    ("tiny", ["pretrain.depth=0"], None, ["depth"]),
    ("tiny", ["download.crawl=nope"], None, ["crawl"]),
])
def test_load_errors_name_the_fix(preset, overrides, source, says):
    with pytest.raises(StageError) as e:
        load(preset, overrides, source)
    for word in says:
        assert word in str(e.value), (word, str(e.value))
