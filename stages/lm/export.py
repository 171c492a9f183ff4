"""Export a model artifact as a Hugging Face Llama directory: LlamaForCausalLM weights + config + LlamaTokenizer.

    crawl2chat export sft/latest --format hf --out exports/chat-hf
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer as T; \
        m = AutoModelForCausalLM.from_pretrained('exports/chat-hf'); t = T.from_pretrained('exports/chat-hf')"

Our GPT (stages/lm/gpt.py) is Hugging Face's Llama layout under another prefix: the same module names, the same
RMSNorm, SwiGLU, grouped-query attention and RoPE in the rotate_half layout (cos/sin halves duplicated), no
biases, untied embeddings. So export renames tensors (`layers.0...` -> `model.layers.0...`) and writes the
matching LlamaConfig; tests/test_export.py checks that transformers' logits equal ours.

The tokenizer files are the SentencePiece model itself plus the settings that make LlamaTokenizer encode text
to the same ids as SentencePiece: no prefix space (our tokenizer has add_dummy_prefix=False) and the
special tokens at their fixed ids. One difference remains: Hugging Face matches the text of *every* special
token (e.g. a literal "<|bos|>" becomes id 1), SentencePiece only the chat markers. Our data stages escape
such literals before encoding, so ids agree on everything the model was trained on.

A reward model exports its trunk (a causal LM); the scalar reward head has no Llama equivalent and is left
out (reported in the returned stats).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm

from stages.common import StageError
from stages.lm.chat import MARKERS, ROLES

if TYPE_CHECKING:  # torch loads inside export_hf only: train_tokenizer uses write_hf_tokenizer without it
    import torch

    from stages.lm.gpt import GPT, GPTConfig

HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

# The one chat format of stages/lm/chat.py as a Jinja template, so `tokenizer.apply_chat_template` renders
# <|bos|> (<|role|> content <|end|>)* [<|assistant|>] exactly as ChatTokenizer.render_prompt does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in [" + ", ".join(f"'{r}'" for r in ROLES) + "] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def write_hf_tokenizer(model_file: Path, out_dir: Path, model_max_length: int | None = None) -> None:
    """Copy a SentencePiece model into out_dir with the tokenizer_config.json and special_tokens_map.json that
    LlamaTokenizer.from_pretrained(out_dir) needs to give the same ids as SentencePiece."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    special = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "pad_token": sp.pad_id()}
    if min(special.values()) < 0 or any(sp.piece_to_id(m) == sp.unk_id() for m in MARKERS):
        raise StageError(f"{model_file} lacks unk/bos/eos/pad or the chat markers {list(MARKERS)}: "
                         f"re-train it with stages.train_tokenizer, which reserves them")
    names = {key: sp.id_to_piece(i) for key, i in special.items()}
    specials = {**{sp.id_to_piece(i): i for i in special.values()}, **{m: sp.piece_to_id(m) for m in MARKERS}}

    out_dir.mkdir(parents=True, exist_ok=True)
    if Path(model_file).resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(model_file, out_dir / "tokenizer.model")  # copyfile: not the artifact's read-only mode
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **names,
        "additional_special_tokens": list(MARKERS),
        # Pinning every special token to its SentencePiece id, so no loader appends them as new tokens.
        "added_tokens_decoder": {str(i): {"content": piece, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False}
                                 for piece, i in sorted(specials.items(), key=lambda kv: kv[1])},
        # Training data starts every document and conversation with <|bos|> (tokenize_shards, chat.py) and
        # ends documents with <|eos|>; a prompt should look like the start of one.
        "add_bos_token": True,
        "add_eos_token": False,
        # Our SentencePiece model has add_dummy_prefix=False: no "▁" in front of the text. legacy=False is
        # transformers' non-legacy handling of text after special tokens (no extra prefix there either).
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,  # decode must give the text back as it was (lossless tokenizer)
        "sp_model_kwargs": {},
        "chat_template": CHAT_TEMPLATE,
        "padding_side": "right",
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {**names, "additional_special_tokens": list(MARKERS)}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def hf_config(cfg: GPTConfig, bos: int, eos: int, pad: int) -> dict:
    """transformers' LlamaConfig for a GPTConfig, as the JSON its from_pretrained reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x reads rope_theta; 5.x reads rope_parameters (and moves a bare rope_theta there).
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,  # GPT._init's std; only used if someone re-initialises layers
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict under Hugging Face's names: everything but lm_head lives under `model.`."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v.detach().float().cpu().contiguous()
            for k, v in model.state_dict().items()}


def export_hf(model_dir: Path, out_dir: Path) -> dict:
    """Write the model artifact in model_dir as a Hugging Face Llama directory out_dir; returns what it wrote."""
    from safetensors.torch import save_file

    from stages.lm.checkpoint import TOKENIZER, load_model

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StageError(f"{out_dir} is a file: give --out a folder (new or existing) to write the export into")
    model, meta, extra = load_model(model_dir)  # raises "pass a pretrain, sft, reward_model or rl artifact"
    if not (model_dir / TOKENIZER).exists():
        raise StageError(f"{model_dir} has no {TOKENIZER}: the artifact is incomplete; re-run the stage that made it")
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / TOKENIZER))
    if sp.get_piece_size() > model.cfg.vocab_size:
        raise StageError(f"{model_dir}: the tokenizer has {sp.get_piece_size()} pieces but the model only "
                         f"{model.cfg.vocab_size} embeddings; the artifact mixes two tokenizers, re-run its stage")
    end = sp.piece_to_id("<|end|>")

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model)
    # {"format": "pt"}: the safetensors metadata transformers expects of PyTorch checkpoints.
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.cfg, sp.bos_id(), sp.eos_id(), sp.pad_id())
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Documents end with <|eos|>, chat replies with <|end|>: generation stops at either.
    generation = {"bos_token_id": sp.bos_id(), "eos_token_id": [sp.eos_id(), end], "pad_token_id": sp.pad_id()}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_hf_tokenizer(model_dir / TOKENIZER, out_dir, model_max_length=model.cfg.seq_len)
    return {"stage": meta.get("stage"), "out": str(out_dir), "parameters": model.num_params(),
            "tensors": len(tensors), "left_out": sorted(extra),
            "files": sorted(["model.safetensors", "config.json", "generation_config.json", *HF_TOKENIZER_FILES])}
