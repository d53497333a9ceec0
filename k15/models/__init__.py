"""Model and tokenizer loading: a local Hugging Face directory or the small default."""

from __future__ import annotations

import torch

from k15.models.model import ModelNotFoundError, build_default_model, load_pretrained
from k15.models.tokenizer import load_tokenizer

__all__ = ["ModelNotFoundError", "load_policy", "load_policy_tokenizer", "load_tokenizer"]


def load_policy_tokenizer(model_cfg):
    """The tokenizer named by the config, else the model directory's, else the shipped one."""
    path = model_cfg.get("tokenizer") or model_cfg.get("path")
    return load_tokenizer(path)


def load_policy(model_cfg, tokenizer, seed: int):
    """The policy to train or serve: `model.path` if set, else the default Qwen2-style model."""
    if model_cfg.get("path"):
        return load_pretrained(model_cfg.path, dtype=getattr(torch, model_cfg.dtype))
    vocab = ((len(tokenizer) + 31) // 32) * 32  # pad the embedding to a multiple of 32
    if model_cfg.get("vocab_size"):
        if model_cfg.vocab_size < len(tokenizer):
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        vocab = model_cfg.vocab_size
    return build_default_model(
        vocab_size=vocab, hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads,
        intermediate_size=model_cfg.intermediate_size, max_position=model_cfg.max_position,
        seed=seed, eos_token_id=tokenizer.eos_token_id,
    )
