"""The tiny preset end to end through Prefect and the CLI, as a new user runs it.

One full run (with a corrupt WARC file added to the source), a second run that reuses every stage, and a run
with one RL setting changed that rebuilds only the RL stage. Each run starts its temporary Prefect server in a
PREFECT_HOME of the test's own; a Ctrl-C stops a run at once.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.presets import SLOTS, STAGES, slot_alias
from stages.artifacts import ArtifactStore

REPO = Path(__file__).resolve().parent.parent
CRAWL = "crawl-data/CC-MAIN-2024-22"
CORRUPT = f"{CRAWL}/segments/tiny-samples/warc/corrupt-truncated.warc.gz"


def crawl2chat(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The bundled tiny crawl plus one truncated WARC file listed in warc.paths.gz."""
    src = tmp_path_factory.mktemp("source")
    shutil.copytree(REPO / "data" / "tiny-cc", src, dirs_exist_ok=True)
    good = (src / "crawl-data/CC-MAIN-2024-22/segments/tiny-samples/warc/dolma-wget-sample-0000.warc.gz").read_bytes()
    (src / CORRUPT).write_bytes(good[: len(good) // 2])  # cut mid gzip member
    listing = src / CRAWL / "warc.paths.gz"
    paths = gzip.decompress(listing.read_bytes()).decode().split()
    listing.write_bytes(gzip.compress(("\n".join(sorted(paths + [CORRUPT])) + "\n").encode()))
    return src


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("prefect")
    # not PREFECT_* (the test picks its server) nor torch.distributed's variables: in-process training in an
    # earlier test set them here, with its rendezvous port still open, and a child would try to listen on it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")
           and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               CRAWL2CHAT_ROOT=str(home / "artifacts"), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def first_run(source, env):
    result = crawl2chat("run", "--preset", "tiny", "--source", str(source), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return ArtifactStore(env["CRAWL2CHAT_ROOT"])


# The slots the tiny preset runs: every stage, the imports once per kind, except problems (none bundled).
RUN = [s for s in SLOTS if s != "problems"]
RUNS_PER_STAGE = {"evaluate": 3, "import_data": 2}  # evaluate after pretrain, sft and rl; conversations + pairs


def latest(store: ArtifactStore, slot: str) -> str:
    return store.read_alias(*slot_alias(slot))


def stats(store: ArtifactStore, slot: str) -> dict:
    return store.manifest(slot_alias(slot)[0], latest(store, slot))["stats"]


def test_every_stage_committed_with_its_numbers(first_run):
    store = first_run
    for stage in STAGES:
        assert len(store.versions(stage)) == RUNS_PER_STAGE.get(stage, 1), stage
    assert stats(store, "conversations")["valid"] == 800 and stats(store, "preferences")["malformed"] == 1
    assert store.read_alias("import_data", "latest") is None  # the imports keep one alias per kind instead
    bad = stats(store, "download")["bad_files"]
    assert [b["path"] for b in bad] == [CORRUPT]
    assert stats(store, "extract")["documents"] > 50
    base = stats(store, "pretrain")
    assert base["val_loss"] < base["unigram_entropy"]  # learned more than token frequencies
    chat = stats(store, "sft")
    assert chat["val_assistant_loss"] < chat["val_assistant_loss_base"]
    assert chat["conversations"] == 800 and chat["real_token_fraction"] > chat["real_token_fraction_unpacked"]
    sft_inputs = store.manifest("sft", latest(store, "sft"))["inputs"]
    assert {"stage": "import_data", "version": latest(store, "conversations")} in sft_inputs
    assert 0 <= stats(store, "reward_model")["val_accuracy"] <= 1
    rl = stats(store, "rl")
    assert {"val_reward_before", "val_reward_after", "val_kl_to_reference"} <= rl.keys()
    card = stats(store, "evaluate")["report_card"].splitlines()  # base -> sft -> rl, one row each
    assert [row.split("|")[1].strip().split("/")[0] for row in card[2:]] == ["pretrain", "sft", "rl"]
    # evaluate measures the base model on the same 320 val windows as pretrain's own figure (tiny preset)
    assert float(card[2].split("|")[2]) == pytest.approx(base["val_bpb"], abs=1e-4)
    assert 0 <= stats(store, "evaluate")["win_rate_vs_sft"] <= 1


READ_UI_ARTIFACTS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        published = {}
        for a in await client.read_artifacts():
            published.setdefault(a.key, []).append({"type": a.type, "data": a.data})
        print(json.dumps(published))

asyncio.run(main())
"""


def test_each_stage_published_its_stats_to_prefect(first_run, env):
    """Read back, through Prefect's API on the same PREFECT_HOME, the markdown artifact of every stage."""
    result = subprocess.run([sys.executable, "-c", READ_UI_ARTIFACTS], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    published = json.loads(result.stdout.strip().splitlines()[-1])
    def data(key: str, kind: str) -> list:
        return [a["data"] for a in published[key] if a["type"] == kind]

    for slot in RUN:  # evaluate publishes under one key three times (base, chat, assistant); imports by kind
        assert any(latest(first_run, slot) in md for md in data(slot.replace("_", "-"), "markdown"))
    assert "val_loss" in data("pretrain", "markdown")[0] and "bad_files" in data("download", "markdown")[0]
    curve = json.loads(data("pretrain-loss-curve", "table")[0])  # the loss curve, as a table and as an image
    assert curve[-1]["step"] == stats(first_run, "pretrain")["steps"] and "loss" in curve[0]
    assert data("pretrain-loss-image", "image")[0].startswith("data:image/png;base64,")
    funnel = json.loads(data("extract-funnel", "table")[0])  # the data funnel, one row per filter
    assert funnel[0]["step"] == "read_warc" and funnel[-1]["docs_out"] == stats(first_run, "extract")["documents"]
    # progress while the stages worked: the last update of a training stage's progress artifact is 100%
    assert max(data("pretrain-progress", "progress")) == 100.0 and data("download-progress", "progress")


def test_lineage_reaches_the_warc_files(first_run, env):
    result = crawl2chat("artifacts", "lineage", "rl", env=env)
    assert result.returncode == 0, result.stderr
    for stage in STAGES:
        if stage != "evaluate":  # evaluate reads the models; it is downstream of rl, not upstream
            assert f"{stage}/" in result.stdout
    assert "zyte-aeb-part1.warc.gz" in result.stdout
    assert crawl2chat("artifacts", "verify", env=env).returncode == 0


def test_second_run_reuses_everything_and_a_changed_setting_rebuilds_downstream_only(first_run, source, env):
    store = first_run
    before = {s: latest(store, s) for s in RUN}
    again = crawl2chat("run", "--preset", "tiny", "--source", str(source), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s: latest(store, s) for s in RUN} == before
    assert all(len(store.versions(s)) == RUNS_PER_STAGE.get(s, 1) for s in STAGES)  # nothing rebuilt

    changed = crawl2chat("run", "--preset", "tiny", "--source", str(source), "--set", "rl.kl_coef=0.1", env=env)
    assert changed.returncode == 0, changed.stderr[-3000:]
    after = {s: latest(store, s) for s in RUN}
    downstream = ("rl", "evaluate")  # rl and the evaluation of its model
    assert {s: v for s, v in after.items() if s not in downstream} == \
        {s: v for s, v in before.items() if s not in downstream}
    assert after["rl"] != before["rl"] and len(store.versions("rl")) == 2
    assert len(store.versions("evaluate")) == 4  # the rl model's evaluation, downstream of rl, re-ran too


def test_user_errors_are_logged_without_their_traceback():
    """Prefect logs a failed task's exception with its traceback; a StageError's one-line fix must not drown."""
    from flows.tasks import NoTracebackForUserErrors
    from stages.common import StageError

    def record(exc: Exception) -> logging.LogRecord:
        try:
            raise exc
        except Exception:
            return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed: %r", (exc,),
                                     sys.exc_info())

    user, bug = record(StageError("set crawl=CC-MAIN-2024-22")), record(KeyError("x"))
    assert NoTracebackForUserErrors().filter(user) and user.exc_info is None
    assert "set crawl=CC-MAIN-2024-22" in user.getMessage()
    assert NoTracebackForUserErrors().filter(bug) and bug.exc_info is not None  # a bug keeps its traceback
    assert any(isinstance(f, NoTracebackForUserErrors) for f in logging.getLogger("prefect.task_runs").filters)


def test_ctrl_c_stops_the_run_at_once_and_leaves_no_server(env, tmp_path):
    """Ctrl-C reaches the terminal's whole process group. The run's temporary Prefect server must not be in it
    (Prefect's own was, so it died first and the run spent two minutes on connection errors, then exited 1)."""
    import select
    import signal
    import time

    run_env = {**env, "CRAWL2CHAT_ROOT": str(tmp_path / "artifacts")}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--until", "pretrain"],
                            cwd=REPO, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group, as a terminal's foreground job is
    out, deadline = b"", time.monotonic() + 600
    try:
        while b"step 10/" not in out and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                out += proc.stdout.read1(65536)
        assert b"step 10/" in out, out[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        t0 = time.monotonic()
        rest, _ = proc.communicate(timeout=120)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    after = rest.decode(errors="replace")
    assert proc.returncode == 130, after[-3000:]
    assert "interrupted:" in after and "run the same command again" in after
    assert "Error logging to API" not in after and "Connection refused" not in after, after[-3000:]
    assert seconds < 60, seconds  # it took 136 s with Prefect's temporary server; about 5 s now
    # no process of this run is left (the temporary server leads a session of its own: the group kill missed it)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"CRAWL2CHAT_ROOT={run_env['CRAWL2CHAT_ROOT']}".encode() in environ:
            left.append(pid)
    assert not left, left
