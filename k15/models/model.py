"""Model loading: a local Hugging Face causal-LM directory, or the small default built from a config."""

from __future__ import annotations

from pathlib import Path

import torch


class ModelNotFoundError(FileNotFoundError):
    pass


def build_default_model(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                        num_kv_heads: int, intermediate_size: int, max_position: int, seed: int,
                        eos_token_id: int):
    """A randomly initialised Qwen2-style transformer (the embedded default)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position,
        tie_word_embeddings=True, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        bos_token_id=eos_token_id, use_cache=True,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model directory {path} has no config.json (not a Hugging Face model)")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
