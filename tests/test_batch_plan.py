"""One version means one model on any hardware (stages/lm/trainer.plan_batch, stages/lm/memory.py).

batch_size counts all ranks, so the ranks and the micro batch only change speed; "auto" precision enters the
version as resolved; on a GPU a preflight estimate of memory picks the micro batch or fails before step 1. The
GPU cases run here on a CPU: the device's size is what plan_batch asks memory.budget_bytes, so a test gives it
an H100's or an H200's, and the d20 model is built on the meta device (shapes only, no 2 GB of weights).
"""

import dataclasses

import pytest
import torch

from stages import pretrain
from stages.artifacts import plan_version
from stages.common import StageError, recipe_dict
from stages.lm import memory, trainer
from stages.lm.gpt import GPT, GPTConfig

GiB = 2**30
H100, H200 = 79.6 * GiB, 139.8 * GiB  # what torch.cuda.mem_get_info reports as their totals


@pytest.fixture
def ranks(monkeypatch):
    def set_world(world: int):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
    return set_world


@pytest.fixture
def gpu_of(monkeypatch):
    """Pretend to be on a GPU of `total` bytes (bf16-capable)."""
    def pretend(total: float):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(memory, "budget_bytes", lambda device=None: total * (1 - memory.FREE_FRACTION))
        monkeypatch.setattr(trainer, "device", lambda: torch.device("cpu"))
    return pretend


def d20() -> GPT:
    with torch.device("meta"):
        return GPT(GPTConfig.from_depth(20, 65536, 2048))


def test_d20_batch_is_cut_to_fit_the_gpu_and_kept(ranks, gpu_of):
    """The d20 preset's batch of 256 on 8 GPUs: its old micro batch of 32 needs ~128 GiB by the estimate, which
    neither GPU holds; 16 fits both, with 2 accumulated micro batches, so the global batch stays 256."""
    ranks(8)
    model = d20()
    assert memory.training_bytes(model, 32, 0, 8, bf16=True) > 0.9 * H200
    assert memory.training_bytes(model, 16, 0, 8, bf16=True) < 0.9 * H100
    for total in (H100, H200):
        gpu_of(total)
        cfg = trainer.plan_batch(pretrain.Config(depth=20, seq_len=2048, batch_size=256, precision="bf16"), model)
        assert (cfg.micro_batch_size, cfg.grad_accum) == (16, 2)
        assert cfg.micro_batch_size * cfg.grad_accum * 8 == 256


def test_a_small_gpu_gets_a_smaller_micro_batch_and_more_accumulation(ranks, gpu_of):
    ranks(8)
    gpu_of(40 * GiB)  # an A100 40 GB: 36 GiB to use
    cfg = trainer.plan_batch(pretrain.Config(depth=20, seq_len=2048, batch_size=256, precision="bf16"), d20())
    assert (cfg.micro_batch_size, cfg.grad_accum) == (4, 8)


def test_preflight_fails_before_step_1_naming_the_setting(ranks, gpu_of):
    ranks(8)
    gpu_of(H100)
    with pytest.raises(StageError, match="micro_batch_size=32 needs about 128 GiB.*lower micro_batch_size"):
        trainer.plan_batch(pretrain.Config(depth=20, seq_len=2048, batch_size=256, micro_batch_size=32,
                                           precision="bf16"), d20())
    gpu_of(8 * GiB)  # not even one sequence: the weights and AdamW state alone are ~10 GiB
    with pytest.raises(StageError, match="not even one sequence.*zero_stage=3"):
        trainer.plan_batch(pretrain.Config(depth=20, seq_len=2048, batch_size=256, precision="bf16"), d20())
    # ZeRO-3 shards weights, gradients and optimizer state 8 ways: then one sequence fits
    cfg = trainer.plan_batch(pretrain.Config(depth=20, seq_len=2048, batch_size=256, precision="bf16",
                                             zero_stage=3), d20())
    assert cfg.micro_batch_size >= 1


def test_zero_partitioning_lowers_the_estimate():
    model = d20()
    stages = [memory.training_bytes(model, 1, z, 8, bf16=True) for z in (0, 1, 2, 3)]
    assert stages == sorted(stages, reverse=True) and len(set(stages)) == 4


def test_batch_is_planned_exactly_on_a_cpu(ranks):
    ranks(2)
    cfg = trainer.plan_batch(trainer.TrainConfig(batch_size=16))
    assert (cfg.micro_batch_size, cfg.grad_accum) == (8, 1)
    cfg = trainer.plan_batch(trainer.TrainConfig(batch_size=16, micro_batch_size=2))
    assert (cfg.micro_batch_size, cfg.grad_accum) == (2, 4)
    with pytest.raises(StageError, match="batch_size=15 does not split over 2 ranks"):
        trainer.plan_batch(trainer.TrainConfig(batch_size=15))
    with pytest.raises(StageError, match="micro_batch_size=3 does not divide the 8 sequences"):
        trainer.plan_batch(trainer.TrainConfig(batch_size=16, micro_batch_size=3))
    with pytest.raises(StageError, match="grad_accum=2 is derived.*set batch_size"):
        trainer.plan_batch(trainer.TrainConfig(batch_size=16, grad_accum=2))


def version(cfg) -> str:
    return plan_version(pretrain.NAME, pretrain.CODE_VERSION, recipe_dict(cfg.resolved()), [])


def test_ranks_and_micro_batch_stay_out_of_the_version_and_the_batch_enters_it():
    cfg = pretrain.Config(batch_size=16)
    assert version(cfg) == version(dataclasses.replace(cfg, micro_batch_size=4))
    assert version(cfg) != version(dataclasses.replace(cfg, batch_size=32))


def test_resolved_precision_enters_the_version(gpu_of):
    auto = pretrain.Config(precision="auto")
    on_cpu = version(auto)
    assert on_cpu == version(dataclasses.replace(auto, precision="fp32"))  # auto is fp32 here
    gpu_of(H100)
    assert auto.resolved().precision == "bf16"
    assert version(auto) == version(dataclasses.replace(auto, precision="bf16")) != on_cpu


def test_zero3_counts_parameters_and_mfu_before_partitioning(tmp_path, monkeypatch):
    """ZeRO-3 leaves each rank only its shard of every parameter (an empty tensor on one rank), so counting after
    deepspeed.initialize gave params ~0 and an MFU far too low. A made-up peak FLOP/s makes MFU appear on CPU."""
    from docs_fixture import build_shards
    from stages.common import build

    monkeypatch.setattr(pretrain, "peak_flops", lambda: 1e12)
    store, _, tok, shards = build_shards(tmp_path, 640)
    cfg = pretrain.Config(depth=1, aspect_ratio=32, head_dim=32, seq_len=64, steps=3, lr=3e-3, warmup_steps=1,
                          batch_size=4, eval_sequences=4, sample_prompts=("Once",), sample_tokens=2,
                          zero_stage=3, precision="fp32")
    s = build(pretrain, cfg, [shards.artifact, tok.artifact], store).stats
    model = GPT(GPTConfig.from_depth(1, 640, 64, 32, 32))
    assert s["params"] == model.num_params() > 0
    assert s["flops_per_token"] == model.flops_per_token()
    assert s["mfu"] == pytest.approx(s["tokens_per_s"] * model.flops_per_token() / 1e12)
