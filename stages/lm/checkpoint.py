"""Model artifacts on disk: `model.safetensors` (weights) + `model.json` (GPTConfig and metadata) + the tokenizer.

Every model artifact (base, chat, reward model, policy) carries its own copy of the tokenizer it was trained
with, so evaluation, chat and export need nothing but the model artifact. Weights are safetensors: loading
them never unpickles anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stages.common import StageError
from stages.lm.gpt import GPT, GPTConfig

WEIGHTS = "model.safetensors"
META = "model.json"
TOKENIZER = "tokenizer.model"


def save_model(model: GPT, out_dir: Path, tokenizer_path: Path, meta: dict | None = None,
               extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights (+ extra tensors such as a reward head), config, metadata and the tokenizer into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
    save_file(tensors, str(out_dir / WEIGHTS))
    (out_dir / META).write_text(json.dumps({"config": model.cfg.to_dict(), **(meta or {})}, indent=2))
    if tokenizer_path.resolve() != (out_dir / TOKENIZER).resolve():
        shutil.copyfile(tokenizer_path, out_dir / TOKENIZER)


def load_meta(model_dir: Path) -> dict:
    path = Path(model_dir) / META
    if not path.exists():
        raise StageError(f"{model_dir} holds no model ({META} missing): pass a pretrain, sft, reward_model or "
                         f"rl artifact")
    return json.loads(path.read_text())


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict, dict[str, torch.Tensor]]:
    """(model, metadata, extra tensors that are not GPT weights, e.g. a reward head)."""
    meta = load_meta(model_dir)
    model = GPT(GPTConfig(**meta["config"]))
    tensors = load_file(str(Path(model_dir) / WEIGHTS), device=str(device))
    own = set(model.state_dict())
    model.load_state_dict({k: v for k, v in tensors.items() if k in own})
    return model.to(device), meta, {k: v for k, v in tensors.items() if k not in own}
