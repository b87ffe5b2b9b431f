"""A Janus policy's directories, local files only (``JanusPolicy.from_pretrained`` / ``save_pretrained`` /
``from_adapters``): a plain Hugging Face Janus directory (safetensors, tokenizer with its chat template, the
understanding encoder's image mean / std), or, for a LoRA policy, its adapters beside the ``model`` section that
names the base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from policy.config import PolicyConfig
from policy.janus_chat import chat_template_of
from policy.lora import ADAPTERS_FILE
from policy.persist import CONFIG_FILE, FORMAT
from policy.tokenizer import load_tokenizer

PREPROCESSOR_FILE = "preprocessor_config.json"  # image_mean / image_std of the understanding encoder


def read_janus_dir(path: str, tokenizer_path: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """The parts of a local Janus checkpoint (safetensors only), as ``JanusPolicy(**parts)`` takes them: the
    model (its text vocabulary grown when the tokenizer holds more tokens: the project's special tokens), the
    tokenizer, ``image_mean`` / ``image_std`` from ``preprocessor_config.json`` (default 0.5: pixels to [-1, 1])
    and the chat template."""
    from transformers import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                          use_safetensors=True)
    tok = load_tokenizer(tokenizer_path or path)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
        model.config.text_config.vocab_size = len(tok)
    pre = Path(path) / PREPROCESSOR_FILE
    norm = json.loads(pre.read_text()) if pre.is_file() else {}
    return {"model": model, "tokenizer": tok, "image_mean": norm.get("image_mean") or (0.5,) * 3,
            "image_std": norm.get("image_std") or (0.5,) * 3,
            "chat_template": chat_template_of(tok, tokenizer_path or path)}


def write_janus_dir(policy, directory: Path) -> None:
    """What :func:`read_janus_dir` loads back (``model.janus_path``)."""
    policy.model.save_pretrained(directory)
    policy.tokenizer.chat_template = policy.chat_template  # saved as chat_template.jinja, read back as its own
    policy.tokenizer.save_pretrained(directory)
    norm = {"image_mean": policy.image_mean, "image_std": policy.image_std}
    (directory / PREPROCESSOR_FILE).write_text(json.dumps(norm))


def write_adapters(policy, directory: Path) -> None:
    """A LoRA policy: ``adapters.safetensors`` (its trainable tensors) and ``config.json`` (the ``model``
    section, naming the base)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in policy.trainable_state_dict().items()},
              str(directory / ADAPTERS_FILE))
    meta = {"format": FORMAT, "policy": policy.cfg.model_dump(mode="json")}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def read_adapters(directory: Path) -> tuple[PolicyConfig, dict[str, torch.Tensor]]:
    """What :func:`write_adapters` wrote: the ``model`` section and the adapter tensors."""
    cfg = PolicyConfig(**json.loads((directory / CONFIG_FILE).read_text())["policy"])
    return cfg, load_file(str(directory / ADAPTERS_FILE))
