"""rl on 2 CPU ranks with ZeRO 1 (stages/lm/launch.py): GRPO with the verifier on the seeded arithmetic.

build() with CRAWL2CHAT_NPROC=2 starts two gloo ranks through the deepspeed launcher; the parent commits rank 0's
stats. Each rank samples its own prompts of every rollout batch and writes its own rollout files: the artifact
must hold both ranks' files, every group on one rank, no prompt twice in a step, and the stats must count the
rows of both.
"""

import pyarrow.ipc as ipc
import pytest

from stages import rl
from stages.artifacts import ArtifactStore
from stages.common import build
from stages.lm import launch
from stages.lm.checkpoint import load_model
from test_rl_verifiable import chat  # noqa: F401  (the fixture: a random-init depth-1 chat model)

WORLD = 2
# 3 rollout batches of 4 prompts (2 a rank) x 3 completions; tiny replies: the run is mostly process start-up
CFG = rl.Config(reward="verifier", arithmetic_max=20, arithmetic_train=30, val_prompts=4, format_reward=0.5,
                steps=3, prompts_per_step=4, group_size=3, max_new_tokens=8, lr=1e-4, warmup_steps=1,
                precision="fp32", zero_stage=1)


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("CRAWL2CHAT_NPROC", str(WORLD))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's torch threads: 2 ranks on 2 shared cores
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "CRAWL2CHAT_HOSTFILE", "CRAWL2CHAT_LAUNCHER"):
        monkeypatch.delenv(var, raising=False)


def test_grpo_on_two_ranks_keeps_every_rollout(chat, two_ranks, tmp_path):  # noqa: F811
    store = ArtifactStore(tmp_path / "store")
    res = build(rl, CFG, [chat], store)
    s = res.stats
    assert not res.reused and s["world_size"] == WORLD and s["method"] == "grpo"
    assert s["rollouts"] == CFG.steps * CFG.prompts_per_step * CFG.group_size  # the batch counts all ranks

    files = sorted((res.artifact.path / "rollouts").glob("*.arrow"))
    assert [f.name for f in files] == [f"step_{step:06d}_rank_{rank:03d}.arrow"
                                       for step in range(CFG.steps) for rank in range(WORLD)]
    rows = [r for f in files for r in ipc.open_file(str(f)).read_all().to_pylist()]
    assert len(rows) == s["rollouts"]
    for step in range(CFG.steps):
        mine = [r for r in rows if r["step"] == step]
        prompts = {rank: {r["prompt"] for r in mine if r["rank"] == rank} for rank in range(WORLD)}
        # each rank rolled out its own prompts_per_step / WORLD prompts, all group_size samples of each on that rank
        assert all(len(p) == CFG.prompts_per_step // WORLD for p in prompts.values()), prompts
        assert not prompts[0] & prompts[1]
        assert all(sum(r["prompt"] == p for r in mine) == CFG.group_size for p in prompts[0] | prompts[1])
        # the stats average over both ranks' rollouts, not rank 0's alone
        assert s["train_reward_by_step"][step] == pytest.approx(sum(r["reward"] for r in mine) / len(mine))
        assert s["train_kl_by_step"][step] == pytest.approx(sum(r["kl"] for r in mine) / len(mine))
    assert all(r["kl"] == pytest.approx(0, abs=1e-6) for r in rows if r["step"] == 0)  # policy == reference
    assert len(s["curve"]) == CFG.steps  # GRPO: one optimizer step per rollout batch

    assert store.versions("rl") == [res.artifact.version]  # one model, committed once
    model, meta, _ = load_model(res.artifact.path)
    assert meta["stage"] == "rl" and model.cfg.n_layer == 1
    assert not (res.artifact.path / "checkpoints").exists() and not launch.launch_dir(res.artifact).exists()
