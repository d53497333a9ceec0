"""Model merging (paper 2.4): a weighted average of two or more checkpoints of one architecture."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# config.json fields that say nothing about the shapes or the computation
_BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures_version"}


class IncompatibleCheckpoints(ValueError):
    pass


def architecture(path: Path) -> dict:
    """The config.json of a Hugging Face checkpoint, without its bookkeeping fields."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise IncompatibleCheckpoints(f"{path} has no config.json (not a Hugging Face checkpoint)")
    return {k: v for k, v in json.loads(config.read_text()).items() if k not in _BOOKKEEPING}


def check_compatible(paths: list[Path]) -> None:
    """Every checkpoint has the first one's architecture; the error names the first field that differs."""
    first = architecture(paths[0])
    for path in paths[1:]:
        other = architecture(path)
        for key in sorted(first.keys() | other.keys()):
            if first.get(key) != other.get(key):
                raise IncompatibleCheckpoints(
                    f"cannot merge {paths[0]} and {path}: architectures differ in config.json field "
                    f"{key!r} ({first.get(key)!r} vs {other.get(key)!r})")


def merge_state_dicts(state_dicts: list[dict], weights: list[float]) -> dict:
    """sum_i w_i * theta_i per tensor, in fp32, cast back to each tensor's dtype."""
    if len(state_dicts) != len(weights) or len(weights) < 2:
        raise ValueError(f"merging needs one weight per checkpoint and at least two, got {len(weights)} weights "
                         f"for {len(state_dicts)} checkpoints")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"merge weights must sum to 1, got {weights} (sum {sum(weights):g})")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(keys):
            missing = sorted(set(keys) ^ set(sd))[:3]
            raise IncompatibleCheckpoints(f"checkpoint {i} has different tensors (e.g. {missing})")
    merged = {}
    for key in keys:
        tensors = [sd[key] for sd in state_dicts]
        if len({t.shape for t in tensors}) != 1:
            raise IncompatibleCheckpoints(f"tensor {key!r} has shapes {[tuple(t.shape) for t in tensors]}")
        merged[key] = sum(w * t.float() for w, t in zip(weights, tensors)).to(tensors[0].dtype)
    return merged


def _saved_dtype(path: Path) -> torch.dtype:
    config = json.loads((path / "config.json").read_text())
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")


def merge_checkpoints(paths: list[str | Path], weights: list[float], output: Path) -> Path:
    """Average the checkpoints at `paths` into a Hugging Face directory `output` (with the first
    checkpoint's tokenizer), loadable by `model.path=`."""
    from k15.models.model import load_pretrained
    from k15.models.tokenizer import load_tokenizer

    paths = [Path(p) for p in paths]
    check_compatible(paths)
    models = [load_pretrained(p, dtype=_saved_dtype(p)) for p in paths]
    merged = merge_state_dicts([m.state_dict() for m in models], list(weights))
    models[0].load_state_dict(merged)
    output.mkdir(parents=True, exist_ok=True)
    models[0].save_pretrained(output)
    load_tokenizer(paths[0]).save_pretrained(output)
    return output
