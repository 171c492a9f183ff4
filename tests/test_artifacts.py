"""stages.artifacts + stages.common.build: versioning, reuse, atomic commit, manifests, verify, aliases, lineage,
fsspec roots and config overrides, with a tiny fake stage module made here (no real stage is run)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import stat
import types
import uuid
from pathlib import Path
from typing import Optional

import pytest
from typer.testing import CliRunner

from flows.cli import app
from stages.artifacts import MANIFEST, MARKER, Artifact, ArtifactError, ArtifactStore, plan_version
from stages.common import StageError, apply_overrides, build, parse_assignment


# ---- a fake stage --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FakeConfig:
    n: int = 3
    text: str = "hello"


def make_stage(name: str = "fake", code_version: int = 1) -> types.ModuleType:
    """A stage module: NAME, CODE_VERSION, Config, run(cfg, *inputs, out) that writes two files and counts calls.

    `mod.fail_after_partial = True` makes run write a partial file and raise; `mod.seen_partial` records whether
    a run found a partial file from an earlier (crashed) run in its output directory."""
    mod = types.ModuleType(f"fake_stage_{name}")
    mod.__doc__ = f"Fake stage {name}."
    mod.NAME = name
    mod.CODE_VERSION = code_version
    mod.Config = FakeConfig
    mod.calls = 0
    mod.fail_after_partial = False
    mod.seen_partial = []

    def run(cfg, *inputs: Artifact, out: Artifact) -> dict:
        mod.calls += 1
        mod.seen_partial.append((out.path / "partial.txt").exists())
        (out.path / "partial.txt").write_text("started\n")
        if mod.fail_after_partial:
            raise RuntimeError("simulated crash")
        upstream = [json.loads((a.path / "data.json").read_text()) for a in inputs]
        (out.path / "data.json").write_text(json.dumps({"stage": name, "n": cfg.n, "text": cfg.text,
                                                        "upstream": upstream}))
        (out.path / "sub").mkdir(exist_ok=True)
        (out.path / "sub" / "blob.bin").write_bytes(bytes(range(256)) * cfg.n)
        return {"n": cfg.n, "inputs": len(inputs), "names": [name, cfg.text]}

    mod.run = run
    return mod


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store", cache_dir=tmp_path / "cache")


def fake_input(stage: str, version: str) -> Artifact:
    return Artifact(stage, version, Path("/nonexistent"))


def files_in(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- version = f(stage, code version, config, input versions) -------------------------------------------------
def test_plan_version_is_a_function_of_the_recipe():
    cfg = {"n": 3, "text": "hello"}
    a, b = fake_input("up", "aaaaaaaaaaaa"), fake_input("up2", "bbbbbbbbbbbb")
    v = plan_version("fake", 1, cfg, [a, b])
    assert v == plan_version("fake", 1, dict(reversed(list(cfg.items()))), [a, b])  # key order is irrelevant
    assert len(v) == 12 and int(v, 16) >= 0
    others = {
        plan_version("other", 1, cfg, [a, b]),
        plan_version("fake", 2, cfg, [a, b]),
        plan_version("fake", 1, {"n": 4, "text": "hello"}, [a, b]),
        plan_version("fake", 1, cfg, [fake_input("up", "cccccccccccc"), b]),
        plan_version("fake", 1, cfg, [b, a]),  # input order matters
        plan_version("fake", 1, cfg, [a]),
        plan_version("fake", 1, cfg, []),
    }
    assert v not in others and len(others) == 7


def test_versions_do_not_depend_on_where_the_checkout_is(monkeypatch, tmp_path):
    """The presets point at the bundled data by absolute path; the same recipe in two clones at different paths must
    plan the same version (paths inside the checkout enter it as <repo>/...), and other paths stay as they are."""
    from stages import common, evaluate

    cfg = evaluate.Config()  # its defaults: data/eval/... of this checkout, by absolute path
    here = common.recipe_dict(cfg)
    assert here["hellaswag"] == "<repo>/data/eval/hellaswag-val.shared500.jsonl"
    clone = tmp_path / "elsewhere" / "crawl2chat"
    paths = {k: v.replace(str(common.REPO), str(clone)) for k, v in dataclasses.asdict(cfg).items()
             if isinstance(v, str) and v.startswith(str(common.REPO))}
    moved = dataclasses.replace(cfg, **paths)  # the same defaults, as that clone's code writes them
    assert paths and moved.hellaswag.startswith(str(clone))
    monkeypatch.setattr(common, "REPO", clone)  # as the code of that clone sees itself
    assert common.recipe_dict(moved) == here
    # a path outside the checkout, or one that only starts with the same characters, is recipe as written
    assert common.portable([str(clone) + "-old/x", "/data/x", {"k": (str(clone / "y"),)}]) == \
        [str(clone) + "-old/x", "/data/x", {"k": ("<repo>/y",)}]


def test_build_version_changes_with_config_code_version_and_inputs(store):
    stage = make_stage()
    v1 = build(stage, FakeConfig(), [], store).artifact.version
    assert build(stage, FakeConfig(), [], store).artifact.version == v1
    assert build(stage, FakeConfig(n=4), [], store).artifact.version != v1
    assert build(make_stage(code_version=2), FakeConfig(), [], store).artifact.version != v1

    up = make_stage("up")
    i1 = build(up, FakeConfig(), [], store).artifact
    i2 = build(up, FakeConfig(text="other"), [], store).artifact
    w1 = build(stage, FakeConfig(), [i1], store).artifact.version
    w2 = build(stage, FakeConfig(), [i2], store).artifact.version
    w12 = build(stage, FakeConfig(), [i1, i2], store).artifact.version
    w21 = build(stage, FakeConfig(), [i2, i1], store).artifact.version
    assert len({v1, w1, w2, w12, w21}) == 5


# ---- reuse ----------------------------------------------------------------------------------------------------
def test_second_build_is_reused_without_running(store):
    stage = make_stage()
    first = build(stage, FakeConfig(), [], store)
    assert not first.reused and stage.calls == 1
    second = build(stage, FakeConfig(), [], store)
    assert second.reused and stage.calls == 1
    assert second.stats == first.stats == {"n": 3, "inputs": 0, "names": ["fake", "hello"]}
    assert second.artifact == first.artifact
    # a fresh store object on the same root reuses too (nothing held in memory)
    third = build(stage, FakeConfig(), [], ArtifactStore(store.root))
    assert third.reused and stage.calls == 1


def test_chain_change_propagates_downstream_only(store):
    A, B, C = make_stage("a"), make_stage("b"), make_stage("c")

    def chain(ca=FakeConfig(), cb=FakeConfig(), cc=FakeConfig()):
        ra = build(A, ca, [], store)
        rb = build(B, cb, [ra.artifact], store)
        rc = build(C, cc, [rb.artifact], store)
        return ra, rb, rc

    a1, b1, c1 = chain()
    assert [r.reused for r in (a1, b1, c1)] == [False, False, False]
    a2, b2, c2 = chain()
    assert [r.reused for r in (a2, b2, c2)] == [True, True, True]
    assert (A.calls, B.calls, C.calls) == (1, 1, 1)

    # change A's config: A, B and C all get new versions
    a3, b3, c3 = chain(ca=FakeConfig(n=5))
    assert [r.reused for r in (a3, b3, c3)] == [False, False, False]
    assert a3.artifact.version != a1.artifact.version
    assert b3.artifact.version != b1.artifact.version
    assert c3.artifact.version != c1.artifact.version
    assert json.loads((c3.artifact.path / "data.json").read_text())["upstream"][0]["upstream"][0]["n"] == 5

    # change only C: A and B are reused
    a4, b4, c4 = chain(cc=FakeConfig(text="changed"))
    assert [r.reused for r in (a4, b4, c4)] == [True, True, False]
    assert (a4.artifact.version, b4.artifact.version) == (a1.artifact.version, b1.artifact.version)
    assert c4.artifact.version not in (c1.artifact.version, c3.artifact.version)
    assert (A.calls, B.calls, C.calls) == (2, 2, 3)


# ---- atomic commit and resume ---------------------------------------------------------------------------------
def test_crashed_run_commits_nothing_and_resumes_in_same_staging_dir(store):
    stage = make_stage()
    stage.fail_after_partial = True
    version = plan_version("fake", 1, dataclasses.asdict(FakeConfig()), [])
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(stage, FakeConfig(), [], store)
    assert not store.is_committed("fake", version)
    assert not Path(store.root, "fake", version).exists()
    assert store.versions("fake") == []
    staging = store.staging_path("fake", version)
    assert (staging / "partial.txt").exists()
    assert not (staging / MARKER).exists()
    with pytest.raises(ArtifactError, match="artifacts list"):
        store.get("fake", version)
    result = CliRunner().invoke(app, ["artifacts", "list", "--root", store.root])
    assert result.exit_code == 0, result.output
    assert "fake/" not in result.output

    stage.fail_after_partial = False
    res = build(stage, FakeConfig(), [], store)
    assert stage.seen_partial == [False, True]  # the second run found the first run's partial file
    assert not res.reused and res.artifact.version == version
    assert store.is_committed("fake", version)
    assert store.staging_path("fake", version) != res.artifact.path
    assert not store.staging_path("fake", version).exists()
    assert "partial.txt" in {f["path"] for f in res.artifact.manifest()["files"]}


# ---- manifest -------------------------------------------------------------------------------------------------
def test_manifest_contents_and_read_only_files(store):
    up = build(make_stage("up"), FakeConfig(), [], store).artifact
    res = build(make_stage(), FakeConfig(n=2), [up], store)
    art = res.artifact
    m = art.manifest()
    assert m == store.manifest("fake", art.version)
    assert m["stage"] == "fake" and m["version"] == art.version
    assert m["config"] == {"n": 2, "text": "hello"}
    assert m["inputs"] == [{"stage": "up", "version": up.version}]
    assert m["code_version"] == "1"
    for key in ("code_revision", "started", "ended", "host"):
        assert isinstance(m[key], str) and m[key], key
    assert m["started"] <= m["ended"]
    assert m["stats"] == res.stats
    on_disk = files_in(art.path)
    assert set(on_disk) == {f["path"] for f in m["files"]} | {MANIFEST, MARKER}
    assert {f["path"] for f in m["files"]} == {"partial.txt", "data.json", "sub/blob.bin"}
    for f in m["files"]:
        data = on_disk[f["path"]]
        assert f["size"] == len(data)
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
    for p in art.path.rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o444, p
    assert art.ref == f"fake/{art.version}"


# ---- verify ---------------------------------------------------------------------------------------------------
@pytest.fixture
def committed(store) -> Artifact:
    return build(make_stage(), FakeConfig(), [], store).artifact


def writable(p: Path) -> Path:
    p.chmod(0o644)
    return p


def test_verify_intact(store, committed):
    assert store.verify("fake", committed.version) == []


@pytest.mark.parametrize("rel", ["partial.txt", "data.json", "sub/blob.bin"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_verify_flipped_byte(store, committed, rel, where):
    p = writable(committed.path / rel)
    data = bytearray(p.read_bytes())
    i = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[i] ^= 0x01
    p.write_bytes(bytes(data))
    problems = store.verify("fake", committed.version)
    assert len(problems) == 1 and problems[0].startswith("content changed") and rel in problems[0]


def test_verify_missing_file(store, committed):
    (committed.path / "sub" / "blob.bin").unlink()
    assert store.verify("fake", committed.version) == ["missing: sub/blob.bin"]


def test_verify_unexpected_file(store, committed):
    (committed.path / "sub" / "extra.txt").write_text("x")
    assert store.verify("fake", committed.version) == ["unexpected file: sub/extra.txt"]


def test_verify_truncated_file(store, committed):
    p = writable(committed.path / "data.json")
    p.write_bytes(p.read_bytes()[:-3])
    problems = store.verify("fake", committed.version)
    assert len(problems) == 1 and problems[0].startswith("size changed: data.json")


def test_reuse_refuses_a_file_of_another_size(store, committed):
    p = writable(committed.path / "data.json")
    p.write_bytes(p.read_bytes() + b"\n")  # an append: `verify` would find it, a plain reuse must not miss it
    with pytest.raises(ArtifactError, match=f"artifacts verify fake/{committed.version}"):
        store.get("fake", committed.version)
    with pytest.raises(ArtifactError, match="is corrupt"):
        build(make_stage(), FakeConfig(), [], store)  # the same recipe: not silently reused


def test_a_missing_manifest_is_reported_not_a_crash(store, committed):
    (committed.path / MANIFEST).unlink()
    assert store.versions("fake") == [committed.version]  # still listed, so `verify` reaches it
    problems = store.verify("fake", committed.version)
    assert len(problems) == 1 and "manifest.json is missing or unreadable" in problems[0]
    with pytest.raises(ArtifactError, match="delete .* and re-run"):
        store.get("fake", committed.version)


# ---- aliases and refs -----------------------------------------------------------------------------------------
def test_aliases_and_resolve(store):
    stage = make_stage()
    v1 = build(stage, FakeConfig(n=1), [], store).artifact.version
    v2 = build(stage, FakeConfig(n=2), [], store).artifact.version
    assert store.read_alias("fake", "latest") is None
    store.set_alias("fake", "latest", v1)
    assert store.read_alias("fake", "latest") == v1
    store.set_alias("fake", "latest", v2)  # moves
    assert store.read_alias("fake", "latest") == v2
    store.set_alias("fake", "best", v1)  # a user tag
    assert store.resolve("fake") == ("fake", v2)
    assert store.resolve("fake/latest") == ("fake", v2)
    assert store.resolve("fake/best") == ("fake", v1)
    assert store.resolve(f"fake/{v1}") == ("fake", v1)
    prefix = next(v1[:k] for k in range(1, 13) if not v2.startswith(v1[:k]))
    assert store.resolve(f"fake/{prefix}") == ("fake", v1)
    assert set(store.versions("fake")) == {v1, v2}
    assert not list(Path(store.root, "_aliases", "fake").glob("*.tmp-*"))


def test_resolve_errors_name_the_fix(store):
    stage = make_stage()
    v = build(stage, FakeConfig(), [], store).artifact.version
    with pytest.raises(ArtifactError) as e:
        store.resolve("nosuchstage")
    assert "nosuchstage" in str(e.value) and "fake" in str(e.value)  # names the stages there are
    with pytest.raises(ArtifactError) as e:
        store.resolve("fake/zzzz")
    assert "zzzz" in str(e.value) and "crawl2chat artifacts list fake" in str(e.value)
    with pytest.raises(ArtifactError, match="artifacts list"):
        store.get("fake", "0" * 12)
    with pytest.raises(ArtifactError, match="not committed"):
        store.set_alias("fake", "latest", "0" * 12)
    assert store.resolve("fake/" + v[:4]) == ("fake", v)


def test_resolve_ambiguous_prefix(store):
    stage = make_stage()
    versions = set()
    n = 0
    while True:  # find two versions that share a first hex char (at most 17 builds)
        n += 1
        v = build(stage, FakeConfig(n=n), [], store).artifact.version
        if any(w[0] == v[0] for w in versions):
            versions.add(v)
            break
        versions.add(v)
    with pytest.raises(ArtifactError, match="several versions"):
        store.resolve(f"fake/{v[0]}")


def test_resolve_a_bare_version_prefix(store):
    a = build(make_stage("a"), FakeConfig(), [], store).artifact.version
    b = build(make_stage("b"), FakeConfig(), [], store).artifact.version
    prefix = next(a[:k] for k in range(4, 13) if not b.startswith(a[:k]))  # 4+ characters: never a stage name
    assert store.resolve(prefix) == ("a", a)
    assert store.resolve(b) == ("b", b)
    with pytest.raises(ArtifactError, match="no stage or version 'zzzz'"):
        store.resolve("zzzz")


def test_resolve_in_empty_store(tmp_path):
    with pytest.raises(ArtifactError, match="none yet"):
        ArtifactStore(tmp_path / "empty").resolve("download")


# ---- lineage --------------------------------------------------------------------------------------------------
def test_lineage_both_ways(store):
    A, B, C = make_stage("a"), make_stage("b"), make_stage("c")
    a = build(A, FakeConfig(), [], store).artifact
    b = build(B, FakeConfig(), [a], store).artifact
    c = build(C, FakeConfig(), [b], store).artifact
    other = build(make_stage("d"), FakeConfig(), [], store).artifact

    up = store.upstream("c", c.version)
    assert up["ref"] == c.ref
    assert [i["ref"] for i in up["inputs"]] == [b.ref]
    assert [i["ref"] for i in up["inputs"][0]["inputs"]] == [a.ref]
    assert up["inputs"][0]["inputs"][0]["inputs"] == []
    assert up["manifest"]["stage"] == "c"

    assert set(store.downstream("a", a.version)) == {b.ref, c.ref}
    assert store.downstream("b", b.version) == [c.ref]
    assert store.downstream("c", c.version) == []
    assert store.downstream("d", other.version) == []


def test_lineage_diamond(store):
    A, B, C, D = (make_stage(n) for n in "abcd")
    a = build(A, FakeConfig(), [], store).artifact
    b = build(B, FakeConfig(), [a], store).artifact
    c = build(C, FakeConfig(), [a], store).artifact
    d = build(D, FakeConfig(), [b, c], store).artifact
    down = store.downstream("a", a.version)
    assert sorted(down) == sorted([b.ref, c.ref, d.ref])  # d once, although reached twice
    assert [i["ref"] for i in store.upstream("d", d.version)["inputs"]] == [b.ref, c.ref]


# ---- fsspec root ----------------------------------------------------------------------------------------------
def test_memory_root_cycle(tmp_path):
    root = f"memory://c2c-test-{uuid.uuid4().hex}"
    store = ArtifactStore(root, cache_dir=tmp_path / "cache")
    assert not store.is_local
    try:
        A, B = make_stage("a"), make_stage("b")
        ra = build(A, FakeConfig(), [], store)
        assert not ra.reused and store.is_committed("a", ra.artifact.version)
        rb = build(B, FakeConfig(), [ra.artifact], store)
        # the committed artifact lives in the store, materialised into the local cache
        assert rb.artifact.path.is_dir() and str(rb.artifact.path).startswith(str(tmp_path / "cache"))
        local = files_in(rb.artifact.path)
        m = store.manifest("b", rb.artifact.version)
        assert {f["path"] for f in m["files"]} == {"partial.txt", "data.json", "sub/blob.bin"}
        for f in m["files"]:
            remote = store.fs.cat_file(f"{store._base}/b/{rb.artifact.version}/{f['path']}")
            assert local[f["path"]] == remote
            assert hashlib.sha256(remote).hexdigest() == f["sha256"] and len(remote) == f["size"]
        assert json.loads(local["data.json"])["upstream"][0]["stage"] == "a"
        assert not store.staging_path("b", rb.artifact.version).exists()

        # reuse: no run, same stats
        again = build(B, FakeConfig(), [ra.artifact], store)
        assert again.reused and B.calls == 1 and again.stats == rb.stats
        # a fresh cache downloads and checks it again (made first: see test_memory_root_get_into_missing_cache_dir)
        (tmp_path / "cache2").mkdir()
        fresh = ArtifactStore(root, cache_dir=tmp_path / "cache2")
        got = fresh.get("b", rb.artifact.version)
        assert files_in(got.path) == local

        assert store.stages() == ["a", "b"]
        assert store.versions("b") == [rb.artifact.version]
        store.set_alias("b", "latest", rb.artifact.version)
        assert store.resolve("b") == ("b", rb.artifact.version)
        assert store.downstream("a", ra.artifact.version) == [rb.artifact.ref]

        assert store.verify("b", rb.artifact.version) == []
        path = f"{store._base}/b/{rb.artifact.version}/data.json"
        data = bytearray(store.fs.cat_file(path))
        data[0] ^= 0xFF
        store.fs.pipe_file(path, bytes(data))
        problems = store.verify("b", rb.artifact.version)
        assert len(problems) == 1 and problems[0].startswith("content changed: data.json")
        # a corrupted remote artifact is refused when materialised into a fresh cache
        (tmp_path / "cache3").mkdir()
        with pytest.raises(ArtifactError, match="does not match its manifest"):
            ArtifactStore(root, cache_dir=tmp_path / "cache3").get("b", rb.artifact.version)
        store.fs.pipe_file(f"{store._base}/b/{rb.artifact.version}/stray", b"x")
        assert "unexpected file: stray" in store.verify("b", rb.artifact.version)
        store.fs.rm(f"{store._base}/b/{rb.artifact.version}/sub/blob.bin")
        assert "missing: sub/blob.bin" in store.verify("b", rb.artifact.version)
    finally:
        store.fs.rm(store._base, recursive=True)


def test_memory_root_get_into_missing_cache_dir(tmp_path):
    root = f"memory://c2c-test-{uuid.uuid4().hex}"
    writer = ArtifactStore(root, cache_dir=tmp_path / "writer-cache")
    try:
        art = build(make_stage(), FakeConfig(), [], writer).artifact
        reader = ArtifactStore(root, cache_dir=tmp_path / "reader-cache")  # does not exist yet
        assert files_in(reader.get("fake", art.version).path) == files_in(art.path)
    finally:
        writer.fs.rm(writer._base, recursive=True)


def test_memory_roots_sharing_a_cache_do_not_mix(tmp_path):
    stage = make_stage()
    a = ArtifactStore(f"memory://c2c-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")
    b = ArtifactStore(f"memory://c2c-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")
    try:
        build(stage, FakeConfig(), [], a)
        stage.run = lambda cfg, *inputs, out: (out.path / "data.json").write_text("other bytes") and {}
        art = build(stage, FakeConfig(), [], b).artifact  # same recipe, other store, other bytes
        assert (art.path / "data.json").read_text() == "other bytes"
    finally:
        for s in (a, b):
            s.fs.rm(s._base, recursive=True)


def test_memory_root_crash_commits_nothing(tmp_path):
    store = ArtifactStore(f"memory://c2c-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")
    try:
        stage = make_stage()
        stage.fail_after_partial = True
        with pytest.raises(RuntimeError):
            build(stage, FakeConfig(), [], store)
        version = plan_version("fake", 1, dataclasses.asdict(FakeConfig()), [])
        assert not store.is_committed("fake", version)
        assert store.versions("fake") == []
        stage.fail_after_partial = False
        assert not build(stage, FakeConfig(), [], store).reused
        assert stage.seen_partial == [False, True]
        assert store.is_committed("fake", version)
    finally:
        if store.fs.exists(store._base):
            store.fs.rm(store._base, recursive=True)


# ---- overrides ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Typed:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "x"
    langs: tuple[str, ...] = ("en",)
    items: list[str] = dataclasses.field(default_factory=list)
    limit: Optional[int] = None
    scale: float | None = 1.0
    label: str | None = "a"

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


def test_apply_overrides_types_values():
    cfg = apply_overrides(Typed(), {"count": "7", "rate": "1e-3", "flag": "true", "name": "12",
                                    "langs": "en,de", "limit": "5", "scale": "none", "label": "null"}, "t")
    assert cfg == Typed(count=7, rate=1e-3, flag=True, name="12", langs=("en", "de"), limit=5, scale=None,
                        label=None)
    assert isinstance(cfg.count, int) and isinstance(cfg.rate, float) and isinstance(cfg.langs, tuple)
    assert apply_overrides(Typed(), {"rate": "3"}, "t").rate == 3.0
    assert apply_overrides(Typed(), {"langs": '["a", "b,c"]'}, "t").langs == ("a", "b,c")
    assert apply_overrides(Typed(), {"langs": ""}, "t").langs == ()
    assert apply_overrides(Typed(), {"items": "1,2"}, "t").items == ["1", "2"]
    assert apply_overrides(Typed(), {"limit": "None"}, "t").limit is None
    assert apply_overrides(Typed(), {"scale": "2.5"}, "t").scale == 2.5
    assert apply_overrides(Typed(), {}, "t") == Typed()
    for raw, want in [("1", True), ("yes", True), ("on", True), ("False", False), ("0", False), ("off", False)]:
        assert apply_overrides(Typed(), {"flag": raw}, "t").flag is want


@pytest.mark.parametrize("field,raw", [("count", "abc"), ("count", "1.5"), ("rate", "fast"), ("flag", "maybe"),
                                       ("limit", "many"), ("langs", "5"), ("count", "-1")])
def test_apply_overrides_bad_value_names_the_field(field, raw):
    with pytest.raises(StageError) as e:
        apply_overrides(Typed(), {field: raw}, "mystage")
    assert "mystage" in str(e.value)
    if raw != "-1":  # __post_init__'s own message names the field its own way
        assert f"mystage.{field}" in str(e.value) and raw in str(e.value)
    else:
        assert "count" in str(e.value)


def test_apply_overrides_unknown_field():
    with pytest.raises(StageError) as e:
        apply_overrides(Typed(), {"nosuch": "1"}, "mystage")
    msg = str(e.value)
    assert "nosuch" in msg and "mystage" in msg and "count" in msg and "rate" in msg  # lists valid settings


def test_apply_overrides_types_tuple_elements():
    from stages.lm.trainer import TrainConfig
    assert apply_overrides(TrainConfig(), {"betas": "0.8,0.9"}, "pretrain").betas == (0.8, 0.9)


@pytest.mark.parametrize("text", ["nokey", "=x", " =x", ""])
def test_parse_assignment_rejects_malformed(text):
    with pytest.raises(StageError, match="field=value"):
        parse_assignment(text)


def test_stage_main_names_the_inputs_it_needs_and_lists_its_settings(tmp_path, capsys):
    from stages import pretrain
    from stages.common import main
    with pytest.raises(SystemExit) as e:
        main(pretrain, ["--root", str(tmp_path / "store"), "--input", "tokenize_shards"])
    assert "2 input(s), in this order: shards, tokenizer" in str(e.value.code) and "1 --input" in str(e.value.code)
    assert not (tmp_path / "store").exists()  # refused before anything ran
    with pytest.raises(SystemExit) as e:
        main(pretrain, ["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "python -m stages.pretrain --root artifacts --input tokenize_shards" in help_text  # the usage examples
    assert "depth = " in help_text and "seq_len = " in help_text  # every --set field, with its default


def test_parse_assignment_ok():
    assert parse_assignment("a=b") == ("a", "b")
    assert parse_assignment(" pretrain.depth = 4 ") == ("pretrain.depth", "4")
    assert parse_assignment("x=a=b") == ("x", "a=b")
    assert parse_assignment("x=") == ("x", "")


def test_runtime_fields_stay_out_of_the_version():
    """Process counts say how to run, not what to make: changing them reuses the artifact."""
    from stages import download, tokenize_shards
    from stages.artifacts import plan_version
    from stages.common import recipe_dict

    for stage, field in ((download, "workers"), (tokenize_shards, "workers")):
        a, b = stage.Config(), dataclasses.replace(stage.Config(), **{field: 7})
        assert plan_version(stage.NAME, 1, recipe_dict(a), []) == plan_version(stage.NAME, 1, recipe_dict(b), [])
        assert field not in recipe_dict(a)


# ---- names from manifests, aliases and listings are data ------------------------------------------------------
def test_a_crafted_alias_is_refused(store):
    stage = make_stage()
    art = build(stage, FakeConfig(), [], store).artifact
    store.set_alias("fake", "latest", art.version)
    (Path(store.root) / "_aliases" / "fake" / "latest").chmod(0o644)
    (Path(store.root) / "_aliases" / "fake" / "latest").write_text("../../../etc")
    with pytest.raises(ArtifactError, match="refusing version name '../../../etc'"):
        store.resolve("fake/latest")
    for bad in ("../x", "/etc", "a/b", ""):
        with pytest.raises(ArtifactError, match="refusing"):
            store.set_alias("fake", bad, art.version) if bad else store.get("fake", "../" + art.version)


def test_a_crafted_manifest_path_is_refused_locally(store, tmp_path):
    stage = make_stage()
    art = build(stage, FakeConfig(), [], store).artifact
    outside = tmp_path / "outside.txt"
    outside.write_text("not the store's")
    manifest_path = art.path / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"path": "../../../outside.txt", "size": outside.stat().st_size, "sha256": "0" * 64})
    manifest_path.chmod(0o644)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="refusing the manifest's file path"):
        store.get("fake", art.version)
    assert any("refusing" in p for p in store.verify("fake", art.version))
    assert outside.read_text() == "not the store's"


def test_symbolic_links_are_refused(store, tmp_path):
    stage = make_stage()
    real_run = stage.run

    def run_with_link(cfg, *inputs, out):
        stats = real_run(cfg, *inputs, out=out)
        (out.path / "link").symlink_to(tmp_path)
        return stats

    stage.run = run_with_link
    with pytest.raises(ArtifactError, match="symbolic link, link"):
        build(stage, FakeConfig(), [], store)
    assert store.versions("fake") == []
    stage.run = real_run
    (store.staging_path("fake", plan_version("fake", 1, dataclasses.asdict(FakeConfig()), [])) / "link").unlink()
    art = build(stage, FakeConfig(), [], store).artifact  # a committed one whose file became a link afterwards
    target = art.path / "data.json"
    copy = tmp_path / "data.json"
    copy.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(copy)
    with pytest.raises(ArtifactError, match="is corrupt"):
        store.get("fake", art.version)
    assert "symbolic link: data.json (an artifact holds files only)" in store.verify("fake", art.version)


def test_a_crafted_remote_manifest_touches_nothing_outside_the_cache(tmp_path):
    """A remote manifest naming an input of its own stage at '../../..' would have made get() fetch it into, and
    first rmtree, a cache path outside the cache."""
    store = ArtifactStore(f"memory://c2c-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    try:
        art = build(make_stage(), FakeConfig(), [], store).artifact
        remote = f"{store._base}/fake/{art.version}/{MANIFEST}"
        manifest = json.loads(store.fs.cat_file(remote))
        manifest["inputs"] = [{"stage": "fake", "version": "../../../../victim"}]
        store.fs.pipe_file(remote, json.dumps(manifest).encode())
        shutil.rmtree(store.cache_dir / "artifacts")  # not cached: get() downloads and follows the inputs
        with pytest.raises(ArtifactError, match="refusing version name"):
            store.get("fake", art.version)
        assert (victim / "keep.txt").read_text() == "mine"
        manifest["inputs"], manifest["files"] = [], [{"path": "../../victim/keep.txt", "size": 4, "sha256": "0"}]
        store.fs.pipe_file(remote, json.dumps(manifest).encode())
        with pytest.raises(ArtifactError, match="refusing the manifest's file path"):
            store.get("fake", art.version)
        assert (victim / "keep.txt").read_text() == "mine"
        assert not list((store.cache_dir / "artifacts").rglob(MARKER))  # nothing crafted entered the cache
    finally:
        if store.fs.exists(store._base):
            store.fs.rm(store._base, recursive=True)


def test_listings_skip_names_that_are_not_stages_or_versions(store):
    art = build(make_stage(), FakeConfig(), [], store).artifact
    (Path(store.root) / "Not-A-Stage").mkdir()
    (Path(store.root) / "fake" / "not-a-version").mkdir()
    assert store.stages() == ["fake"] and store.versions("fake") == [art.version]
