"""Pre-training survives a hard kill: exact resume, safe checkpoint loading, LR schedules, logging.

The resume test runs `python -m stages.pretrain` in subprocesses, as a crashed job would be re-run: one
uninterrupted run, and one on a fresh store that SIGKILLs itself after a checkpoint and is then started again.
The resumed steps must repeat the uninterrupted run's losses bit for bit, and give the same weights file.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from docs_fixture import build_shards
from stages import pretrain
from stages.artifacts import ArtifactStore, sha256_file
from stages.common import StageError
from stages.lm import trainer
from stages.lm.data import TokenLoader
from stages.lm.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
N = 5  # checkpoint_every; the runs train 2N steps
# depth 1, width 32, two heads of 16, 64-token context: a few ms a step, so the runs are mostly start-up.
# compile=true checks that a CPU run notes and ignores it (the flag is part of both runs' recipe).
SETTINGS = dict(depth=1, aspect_ratio=32, head_dim=16, seq_len=64, steps=2 * N, checkpoint_every=N,
                batch_size=4, lr=3e-3, warmup_steps=2, eval_sequences=8, sample_tokens=2,
                sample_prompts='["Once"]', precision="fp32", compile="true")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store holding a tokenizer and token shards with `latest` aliases, to be copied per run."""
    tmp = tmp_path_factory.mktemp("resume")
    build_shards(tmp, 640)
    return tmp / "store"


def run_pretrain(root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.pretrain", "--root", str(root), "--input", "tokenize_shards",
           "--input", "train_tokenizer"]
    for key, value in SETTINGS.items():
        cmd += ["--set", f"{key}={value}"]
    # Not this process's rendezvous: an engine built earlier in the test session (trainer sets RANK,
    # MASTER_PORT... in os.environ) holds that port; the child picks its own, as a fresh job does.
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # one intra-op thread: fast on a shared 2-core machine, and the same reduction order in every run
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**clean, "OMP_NUM_THREADS": "1", **(env or {})})


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_sigkill_repeats_the_losses_bit_for_bit(template, tmp_path):
    straight_root, crash_root = tmp_path / "straight", tmp_path / "crash"
    shutil.copytree(template, straight_root)
    shutil.copytree(template, crash_root)

    straight = run_pretrain(straight_root)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "compile=true ignored" in straight.stderr  # CPU run: noted, not applied
    version = ArtifactStore(straight_root).resolve("pretrain/latest")[1]
    done = straight_root / "pretrain" / version
    expected = metrics(done / "metrics.jsonl")
    assert [m["step"] for m in expected] == list(range(1, 2 * N + 1))

    # Killed by SIGKILL two steps after checkpoint N: steps N+1, N+2 are in metrics.jsonl but not in any
    # checkpoint, so the resume must also cut the log back to step N.
    crashed = run_pretrain(crash_root, {trainer.KILL_ENV: str(N + 2)})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    staging = ArtifactStore(crash_root).staging_path("pretrain", version)  # same recipe, same version
    assert (staging / "checkpoints" / "latest").read_text().strip() == f"step_{N:07d}"
    assert [m["step"] for m in metrics(staging / "metrics.jsonl")] == list(range(1, N + 3))
    assert not (crash_root / "pretrain" / version / "model.safetensors").exists()  # nothing was committed

    resumed = run_pretrain(crash_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {N}" in resumed.stderr and "resumed from" in resumed.stderr
    got = metrics(crash_root / "pretrain" / version / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(1, 2 * N + 1))
    # floats survive JSON exactly (repr round-trips), so == here is bitwise equality of the float32 losses
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in got] == [m[key] for m in expected], key
    assert sha256_file(crash_root / "pretrain" / version / "model.safetensors") == \
        sha256_file(done / "model.safetensors")

    # DeepSpeed's TensorBoard monitor wrote our per-step scalars into the artifact
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(done / "tensorboard" / "pretrain"))
    events.Reload()
    assert {"Train/loss", "Train/lr", "Train/grad_norm"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("Train/loss")
    assert [e.step for e in losses] == list(range(1, 2 * N + 1))
    assert losses[-1].value == pytest.approx(expected[-1]["loss"])
    # the resumed run's steps N+1, N+2 were logged twice (before the kill and after the resume): shown once
    events = EventAccumulator(str(crash_root / "pretrain" / version / "tensorboard" / "pretrain"))
    events.Reload()
    losses = events.Scalars("Train/loss")
    assert [e.step for e in losses] == list(range(1, 2 * N + 1))
    assert [e.value for e in losses] == pytest.approx([m["loss"] for m in expected])


# ---- in-process: a tiny engine over the same shards -------------------------------------------------------
def shards_of(store: Path) -> Path:
    s = ArtifactStore(store)
    return s.get(*s.resolve("tokenize_shards/latest")).path


def tiny_fit(shards: Path, ckpt_dir: Path, total: int, zero_stage: int = 0) -> list[dict]:
    """A fresh seeded model and engine trained to `total` steps (resuming from ckpt_dir if it has a checkpoint)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, 640, 32, 32, 16, 1))
    cfg = trainer.plan_batch(trainer.TrainConfig(batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=1,
                                                 zero_stage=zero_stage, precision="fp32"))
    engine = trainer.make_engine(model, cfg)
    loader = TokenLoader(shards, "train", 32, 2, seed=0, device=engine.device)
    return trainer.fit(engine, cfg, total, loader, lambda eng, b: eng(*b), ckpt_dir)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_every_zero_stage_resumes_exactly_from_weights_only_files(template, tmp_path, zero_stage):
    """ZeRO 1-3 put loss scalers, a stage enum and fragment maps into their files: the allowlist covers them."""
    shards = shards_of(template)
    # two steps straight; checkpoint_every=1 leaves a checkpoint after step 1 (none after the last step)
    straight = tiny_fit(shards, tmp_path / "a" / "checkpoints", 2, zero_stage)
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text() == "step_0000001"
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    resumed = tiny_fit(shards, tmp_path / "b" / "checkpoints", 2, zero_stage)
    assert [m["step"] for m in resumed] == [2]  # b has no metrics.jsonl of step 1: only the resumed step
    assert resumed[0]["loss"] == straight[1]["loss"] and resumed[0]["grad_norm"] == straight[1]["grad_norm"]


class Payload:
    """Unpickling this creates `path`: a stand-in for code an attacker's checkpoint would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_swapped_checkpoint_is_refused_not_unpickled(template, tmp_path):
    shards = shards_of(template)
    ckpt = tmp_path / "run" / "checkpoints"
    tiny_fit(shards, ckpt, 2)
    model_file = ckpt / "step_0000001" / "mp_rank_00_model_states.pt"
    assert model_file.exists()
    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, model_file)
    with pytest.raises(StageError, match="refused rather than unpickled") as e:
        tiny_fit(shards, ckpt, 2)
    assert str(ckpt) in str(e.value)
    assert not marker.exists()
    # the payload is live: an unrestricted load (what DeepSpeed's own engine does) would have run it
    torch.load(model_file, weights_only=False)
    assert marker.exists()


# ---- schedules and the generated DeepSpeed config ----------------------------------------------------------
def test_lr_schedules():
    cosine = trainer.TrainConfig(lr=1.0, warmup_steps=10, min_lr_frac=0.1)
    wsd = trainer.TrainConfig(lr=1.0, warmup_steps=10, min_lr_frac=0.1, schedule="wsd", decay_frac=0.2)
    at = {s: (trainer.lr_at(s, 100, cosine), trainer.lr_at(s, 100, wsd)) for s in (0, 4, 9, 10, 55, 79, 80, 90, 99)}
    for s in (0, 4, 9):  # the same linear warm-up: (step + 1) / warmup_steps
        assert at[s][0] == at[s][1] == pytest.approx((s + 1) / 10)
    assert at[10][0] == pytest.approx(1.0) and at[55][0] == pytest.approx(0.55)  # half-way down the cosine
    assert at[90][0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(80 / 90 * torch.pi)).item()))
    # wsd: stable at the peak until the last 20 steps, then linear to 0.1 at step 100
    assert at[10][1] == at[55][1] == at[79][1] == at[80][1] == 1.0
    assert at[90][1] == pytest.approx(0.55) and at[99][1] == pytest.approx(0.1 + 0.9 / 20)
    assert trainer.lr_at(100, 100, wsd) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule must be cosine or wsd"):
        trainer.TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="decay_frac"):
        trainer.TrainConfig(schedule="wsd", decay_frac=1.5)


def test_deepspeed_config_is_generated(tmp_path):
    for stage in (0, 1, 2, 3):
        cfg = trainer.ds_config(pretrain.Config(zero_stage=stage, micro_batch_size=4, grad_accum=2))
        assert cfg["zero_optimization"] == {"stage": stage}
        assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
        assert cfg["bf16"] == {"enabled": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
        assert "tensorboard" not in cfg  # no log directory given
    planned = trainer.plan_batch(pretrain.Config(batch_size=8))
    cfg = trainer.ds_config(planned, tmp_path / "tb", job_name="pretrain")
    assert cfg["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "pretrain"}
    no_tb = dataclasses.replace(planned, tensorboard=False)
    assert "tensorboard" not in trainer.ds_config(no_tb, tmp_path / "tb")
    bf16 = dataclasses.replace(planned, precision="bf16")
    assert trainer.ds_config(bf16)["bf16"] == {"enabled": True}
    with pytest.raises(ValueError, match="plan_batch"):  # the batch must be cut for this world first
        trainer.ds_config(pretrain.Config())
