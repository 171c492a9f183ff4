"""GPU-only paths: bf16 training through DeepSpeed, flash attention through SDPA, torch.compile.

Skipped without CUDA (dev and CI machines have none); run them on a GPU machine with `pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_model():
    from stages.lm.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=1024, seq_len=256, n_layer=2, n_embd=256, n_head=4, n_kv_head=2))


def test_flash_attention_runs_our_shapes_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = small_model().cuda().to(torch.bfloat16)
    x = torch.randint(0, 1024, (4, 256), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash attention cannot take these inputs
        flash = model(x).float()
    with sdpa_kernel(SDPBackend.MATH):
        math_ = model(x).float()
    assert (flash - math_).abs().max() < 0.1  # bf16 rounding only


def test_bf16_logits_follow_fp32():
    model = small_model().cuda()
    x = torch.randint(0, 1024, (2, 128), device="cuda")
    fp32 = model(x)
    bf16 = model.to(torch.bfloat16)(x).float()
    assert torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0) > 0.999


def test_deepspeed_bf16_training_step_learns():
    from stages.lm import trainer

    model = small_model()
    cfg = trainer.plan_batch(trainer.TrainConfig(steps=20, batch_size=4, lr=3e-3, warmup_steps=2, precision="auto"),
                             model)
    assert trainer.use_bf16(cfg) == torch.cuda.is_bf16_supported() and cfg.micro_batch_size == 4
    engine = trainer.make_engine(model, cfg)
    x = torch.randint(0, 1024, (4, 129), device=engine.device)
    losses = [trainer.train_step(engine, [(x[:, :-1], x[:, 1:])], lambda e, b: e(*b), cfg, s, 20)["loss"]
              for s in range(20)]
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0] - 1.0  # memorises one batch


def test_compiled_model_matches_eager():
    model = small_model().cuda()
    x = torch.randint(0, 1024, (2, 128), device="cuda")
    eager = model(x)
    compiled = torch.compile(model)(x)
    assert (eager - compiled).abs().max() < 1e-3
