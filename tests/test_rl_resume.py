"""PPO resumes in the middle of a rollout batch exactly.

PPO takes ppo_epochs x ppo_minibatches optimizer steps per rollout batch, so a checkpoint can fall between two
minibatches of one batch. Their old log-probabilities, values and advantages came from weights that no longer
exist after the next step, so stages/rl.Rollouts keeps the unused minibatches in its state. The test crashes a
run (an exception, in this process) one step after such a checkpoint and after the next batch was already
sampled, re-runs it into the same staging directory, and compares it with an uninterrupted run: the same
losses, rollouts, stats and weights file, bit for bit (one process, one thread, the same seeded sampling: no
reduction is reordered, so no float tolerance is needed). A resume that sampled a fresh batch instead of
finishing the old one would train on other rollouts and differ.
"""

import json
from types import SimpleNamespace

import pytest

from stages import rl
from stages.artifacts import Artifact, sha256_file
from stages.common import StageError
from stages.lm import trainer
from test_rl_methods import FAST, rollout_rows, world  # noqa: F401  (world: the digits chat model and data)

# 2 rollout batches x (2 epochs x 2 minibatches) = 8 optimizer steps; a checkpoint every 3 steps lands after
# step 3, one minibatch before the end of the first batch (and after step 6, mid-way through the second)
CFG = rl.Config(method="ppo", reward="verifier", steps=2, prompts_per_step=4, group_size=4, lr=3e-3, ppo_epochs=2,
                ppo_minibatches=2, kl_coef=0.01, **{**FAST, "checkpoint_every": 3})
CRASH_AT = 4  # 0-based: the first step of the second batch, sampled but not trained, so after checkpoint 3


class Crash(Exception):
    pass


def metrics(path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "lr")} for r in rows]  # not tokens_per_s: a timing


def test_ppo_resumes_mid_batch_like_an_uninterrupted_run(world, tmp_path, monkeypatch):  # noqa: F811
    straight = rl.run(CFG, world["chat"], world["problems"], out=Artifact("rl", "straight", tmp_path / "a"))
    expected = metrics(tmp_path / "a")
    assert [m["step"] for m in expected] == list(range(1, 9))
    assert len({m["loss"] for m in expected}) == 8  # every minibatch trains on something different

    real_step = trainer.train_step

    def crashing_step(engine, micro_batches, loss_fn, cfg, step, total, count_fn=None):
        if step == CRASH_AT:
            raise Crash(f"crash before optimizer step {step + 1}")
        return real_step(engine, micro_batches, loss_fn, cfg, step, total, count_fn=count_fn)

    out = Artifact("rl", "crash", tmp_path / "b")
    monkeypatch.setattr(trainer, "train_step", crashing_step)
    with pytest.raises(Crash):
        rl.run(CFG, world["chat"], world["problems"], out=out)
    monkeypatch.undo()
    assert (out.path / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert [m["step"] for m in metrics(out.path)] == [1, 2, 3, 4]
    assert (out.path / "rollouts" / "step_000001_rank_000.arrow").exists()  # sampled before the crash

    resumed = rl.run(CFG, world["chat"], world["problems"], out=out)
    assert metrics(out.path) == expected  # JSON floats round-trip exactly: bitwise-equal losses
    assert rollout_rows(out.path) == rollout_rows(tmp_path / "a")
    for key in ("train_reward_by_step", "train_kl_by_step", "train_accuracy_by_step", "ppo_clip_frac",
                "ppo_approx_kl", "val_accuracy_after", "val_kl_to_reference", "rollouts"):
        assert resumed[key] == straight[key], key
    assert sha256_file(out.path / "model.safetensors") == sha256_file(tmp_path / "a" / "model.safetensors")


def test_rollout_state_needs_the_same_ranks_and_enough_prompts(tmp_path):
    """Each rank holds its own part of a rollout batch: a checkpoint of 2 ranks cannot resume on 1; the batch's
    prompts_per_step prompts must exist and split evenly over the ranks."""
    source = SimpleNamespace(train=[[1, 2]] * 3)  # 3 training prompts
    with pytest.raises(StageError, match="3 training prompts for prompts_per_step=4"):
        rl.Rollouts(rl.Config(prompts_per_step=4, ppo_minibatches=1), None, None, source, None, tmp_path)
    with pytest.raises(StageError, match="prompts_per_step=3 does not split over 2 ranks"):
        rl.Rollouts(rl.Config(prompts_per_step=3), None, None, source, None, tmp_path, rank=0, world=2)
    one = rl.Rollouts(rl.Config(prompts_per_step=2), None, None, source, None, tmp_path, rank=0, world=1)
    two_ranks = {"step": 1, "ranks": [{"pending": [], "monitor": []}] * 2}
    with pytest.raises(StageError, match="written by 2 rank.*resume with the same number of ranks"):
        one.load_state_dict(two_ranks)
