"""flows.cli through typer's CliRunner: artifacts list/show/lineage/verify, status, and `run`'s fail-fast errors.

The store is the real download stage on the bundled data/tiny-cc sample (well under a second) plus two fake
stages built on it; `run` is only exercised on bad input (and with flows.pipeline replaced), so Prefect never
starts."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import flows.cli as cli
from flows.presets import SLOTS
from stages import download
from stages.artifacts import ArtifactStore
from stages.common import build

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny-cc"
runner = CliRunner()


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    n: int = 1


def fake_stage(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.NAME, mod.CODE_VERSION, mod.Config = name, 1, FakeConfig

    def run(cfg, *inputs, out):
        (out.path / "out.txt").write_text(f"{name} {cfg.n} from {[a.ref for a in inputs]}\n")
        return {"n": cfg.n, "docs_out": 42}

    mod.run = run
    return mod


@pytest.fixture(scope="module")
def built_store(tmp_path_factory) -> dict:
    """download (real, tiny-cc) -> fakeb -> fakec, with latest aliases; built once, copied per test."""
    root = tmp_path_factory.mktemp("cli") / "store"
    store = ArtifactStore(root)
    d = build(download, download.Config(source=str(TINY), num_files=0), [], store).artifact
    b = build(fake_stage("fakeb"), FakeConfig(), [d], store).artifact
    c = build(fake_stage("fakec"), FakeConfig(), [b], store).artifact
    for a in (d, b, c):
        store.set_alias(a.stage, "latest", a.version)
    return {"root": root, "download": d, "fakeb": b, "fakec": c}


@pytest.fixture
def env(built_store, tmp_path, monkeypatch) -> dict:
    root = tmp_path / "store"
    shutil.copytree(built_store["root"], root)
    monkeypatch.setattr(cli, "console", Console(width=250))  # wide enough that table cells are not cut
    monkeypatch.delenv("CRAWL2CHAT_ROOT", raising=False)
    return {**built_store, "root": root}


def invoke(*args, **kw):
    result = runner.invoke(cli.app, [str(a) for a in args], **kw)
    assert "Traceback" not in result.output, result.output
    return result


# ---- artifacts ------------------------------------------------------------------------------------------------
def test_artifacts_list(env):
    r = invoke("artifacts", "list", "--root", env["root"])
    assert r.exit_code == 0, r.output
    for s in ("download", "fakeb", "fakec"):
        assert env[s].ref in r.output
    assert env["download"].ref in r.output.split(env["fakeb"].ref, 1)[1]  # fakeb's row names its input
    assert "latest" in r.output
    r = invoke("artifacts", "list", "fakeb", "--root", env["root"])
    assert r.exit_code == 0 and env["fakeb"].ref in r.output and env["fakec"].ref not in r.output


def test_artifacts_list_root_from_env(env):
    r = invoke("artifacts", "list", env={"CRAWL2CHAT_ROOT": str(env["root"])})
    assert r.exit_code == 0 and env["fakec"].ref in r.output


@pytest.mark.parametrize("ref", ["fakeb", "fakeb/latest", "fakeb/{v}", "fakeb/{v6}"])
def test_artifacts_show(env, ref):
    v = env["fakeb"].version
    r = invoke("artifacts", "show", ref.format(v=v, v6=v[:6]), "--root", env["root"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["stage"] == "fakeb" and m["version"] == v
    assert m["inputs"] == [{"stage": "download", "version": env["download"].version}]
    assert m["stats"] == {"n": 1, "docs_out": 42}
    assert m["config"] == {"n": 1}
    assert m["path"].endswith(f"fakeb/{v}")
    assert [f["path"] for f in m["files"]] == ["out.txt"]


def test_artifacts_lineage_up_and_down(env):
    r = invoke("artifacts", "lineage", "fakec", "--root", env["root"])
    assert r.exit_code == 0, r.output
    for s in ("download", "fakeb", "fakec"):
        assert env[s].ref in r.output
    assert "zyte-aeb-part1.warc.gz" in r.output  # back to the WARC files
    assert r.output.index(env["fakec"].ref) < r.output.index(env["fakeb"].ref) < r.output.index(env["download"].ref)

    r = invoke("artifacts", "lineage", "download", "--down", "--root", env["root"])
    assert r.exit_code == 0, r.output
    assert set(r.output.split()) == {env["fakeb"].ref, env["fakec"].ref}
    r = invoke("artifacts", "lineage", "fakec", "--down", "--root", env["root"])
    assert r.exit_code == 0 and r.output.strip() == ""


def test_artifacts_lineage_lists_a_shared_ancestor_once(env):
    store = ArtifactStore(env["root"])
    d = build(fake_stage("faked"), FakeConfig(), [env["fakeb"], env["fakec"]], store).artifact  # fakeb twice
    r = invoke("artifacts", "lineage", d.ref, "--root", env["root"])
    assert r.exit_code == 0, r.output
    assert r.output.count("zyte-aeb-part1.warc.gz") == 1 and r.output.count(env["download"].ref) == 1
    assert f"{env['fakeb'].ref}  (shown above)" in r.output


def test_a_bare_version_prefix_is_a_ref(env):
    r = invoke("artifacts", "show", env["fakeb"].version[:6], "--root", env["root"])
    assert r.exit_code == 0 and json.loads(r.output)["stage"] == "fakeb", r.output


def test_a_missing_manifest_shows_as_corrupt(env):
    d = env["download"]
    (env["root"] / "download" / d.version / "manifest.json").unlink()
    r = invoke("status", "--root", env["root"])
    assert r.exit_code == 0 and f"CORRUPT: run `crawl2chat artifacts verify {d.ref}`" in r.output, r.output
    r = invoke("artifacts", "list", "--root", env["root"])
    assert r.exit_code == 0 and "CORRUPT" in r.output, r.output
    r = invoke("artifacts", "verify", "--root", env["root"])
    assert r.exit_code == 1 and f"CORRUPT {d.ref}" in r.output and "manifest.json is missing" in r.output


def test_artifacts_verify_ok(env):
    r = invoke("artifacts", "verify", "--root", env["root"])
    assert r.exit_code == 0, r.output
    for s in ("download", "fakeb", "fakec"):
        assert f"ok {env[s].ref}" in r.output
    assert "CORRUPT" not in r.output
    r = invoke("artifacts", "verify", "fakeb", "--root", env["root"])
    assert r.exit_code == 0 and f"ok {env['fakeb'].ref}" in r.output and env["fakec"].ref not in r.output


def test_artifacts_verify_flipped_byte(env):
    d = env["download"]
    rel = next(f["path"] for f in d.manifest()["files"] if f["path"].endswith("zyte-aeb-part1.warc.gz"))
    p = env["root"] / "download" / d.version / rel
    p.chmod(0o644)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    r = invoke("artifacts", "verify", "--root", env["root"])
    assert r.exit_code == 1, r.output
    assert f"CORRUPT {d.ref}" in r.output
    assert rel in r.output and "content changed" in r.output
    assert f"ok {env['fakeb'].ref}" in r.output  # the others are still checked and reported
    assert "1 of 3" in r.output
    r = invoke("artifacts", "verify", "download", "--root", env["root"])
    assert r.exit_code == 1 and "CORRUPT" in r.output


def test_status(env):
    r = invoke("status", "--root", env["root"])
    assert r.exit_code == 0, r.output
    assert env["download"].version in r.output
    row = next(line for line in r.output.splitlines() if "download" in line and env["download"].version in line)
    assert "files_ok=5" in row  # the headline numbers
    for slot in SLOTS:  # every stage, and each import by its slot (conversations, preferences, problems)
        assert slot in r.output
    assert r.output.count("not run yet") == len(SLOTS) - 1


def test_status_formats_intervals():
    assert cli._fmt([0.44849, 0.58571]) == "[0.4485, 0.5857]"  # the reward model's val_accuracy_ci95
    assert cli._fmt(0.517587) == "0.5176" and cli._fmt(101) == "101"


def test_status_empty_store(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=250))
    r = invoke("status", "--root", tmp_path / "nothing")
    assert r.exit_code == 0 and r.output.count("not run yet") == len(SLOTS)
    assert f"no artifacts under {tmp_path / 'nothing'} yet" in r.output  # the absolute path: a wrong folder shows


def test_artifacts_list_unknown_stage(env):
    r = invoke("artifacts", "list", "nosuch", "--root", env["root"])
    assert r.exit_code == 1 and "no stage 'nosuch'" in r.output and "fakeb" in r.output


@pytest.mark.parametrize("option", [["--top-k", "-5"], ["--temperature", "-1"], ["--max-new-tokens", "0"]])
def test_sampling_options_out_of_range(env, option):
    r = invoke("generate", "fakeb", "hi", *option, "--root", env["root"])
    assert r.exit_code == 2 and option[0] in r.output, r.output  # click's usage error names the option


def test_artifacts_on_memory_root(tmp_path, monkeypatch):
    import uuid

    monkeypatch.setattr(cli, "console", Console(width=250))
    root = f"memory://c2c-cli-{uuid.uuid4().hex}"
    store = ArtifactStore(root, cache_dir=tmp_path / "cache")
    try:
        a = build(fake_stage("fakeb"), FakeConfig(), [], store).artifact
        store.set_alias("fakeb", "latest", a.version)
        assert invoke("artifacts", "list", "--root", root).output.count(a.ref) == 1
        r = invoke("artifacts", "verify", "--root", root)
        assert r.exit_code == 0 and f"ok {a.ref}" in r.output
        store.fs.pipe_file(f"{store._base}/fakeb/{a.version}/out.txt", b"tampered\n")
        r = invoke("artifacts", "verify", "--root", root)
        assert r.exit_code == 1 and "CORRUPT" in r.output and "out.txt" in r.output
    finally:
        store.fs.rm(store._base, recursive=True)


# ---- bad input: one line, non-zero exit, no traceback, no Prefect -----------------------------------------------
@pytest.fixture
def no_pipeline(monkeypatch):
    """Replace flows.pipeline so that reaching it (and so Prefect) is seen, and record its arguments."""
    calls = []
    fake = types.ModuleType("flows.pipeline")

    def end_to_end(**kw):
        calls.append(kw)
        return ["download/000000000000"]

    fake.end_to_end = end_to_end
    monkeypatch.setitem(sys.modules, "flows.pipeline", fake)
    return calls


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("args,says", [
    (["run", "--preset", "nope"], ["nope", "tiny", "small", "d20"]),
    (["run", "--set", "pretrain.nosuch=1"], ["nosuch", "depth"]),
    (["run", "--set", "badformat"], ["badformat", "field=value"]),
    (["run", "--set", "nostage.depth=1"], ["nostage", "pretrain"]),
    (["run", "--set", "depth=4"], ["depth=4", "stage.field=value"]),
    (["run", "--set", "pretrain.depth=abc"], ["pretrain.depth", "abc"]),
    (["run", "--set", "pretrain.depth=0"], ["depth"]),
    (["run", "--until", "nosuchstage"], ["nosuchstage", "download", "rl"]),
    (["run", "--source", "/does/not/exist"], ["/does/not/exist"]),
    (["run", "--source", str(Path(__file__).parent)], ["warc.paths.gz", "source"]),  # a folder, no listing
])
def test_run_bad_input_fails_fast(no_pipeline, tmp_path, args, says):
    r = invoke(*args, "--root", tmp_path / "store")
    assert r.exit_code != 0, r.output
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for word in says:
        assert word in lines[0], (word, lines[0])
    assert no_pipeline == []  # flows.pipeline (Prefect) never reached
    assert not (tmp_path / "store").exists()


def test_run_good_input_reaches_pipeline(no_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=250))
    r = invoke("run", "--preset", "tiny", "--until", "download", "--set", "pretrain.depth=3",
               "--source", TINY, "--root", tmp_path / "store")
    assert r.exit_code == 0, r.output
    assert no_pipeline == [dict(preset="tiny", overrides=["pretrain.depth=3"], source=str(TINY), until="download",
                                root=str(tmp_path / "store"))]
    assert "download/000000000000" in r.output


@pytest.mark.parametrize("args", [["artifacts", "show", "nosuchstage"], ["artifacts", "lineage", "nosuchstage"],
                                  ["artifacts", "verify", "nosuchstage"], ["artifacts", "show", "fakeb/zzzz"]])
def test_artifacts_bad_ref(env, args):
    r = invoke(*args, "--root", env["root"])
    assert r.exit_code == 1, r.output
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert args[-1].split("/")[-1] in lines[0]
    assert "artifacts list" in lines[0] or "stages: download, fakeb, fakec" in lines[0]
