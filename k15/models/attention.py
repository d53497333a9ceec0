"""Attention within each document of a packed row, as a Hugging Face attention implementation.

`use_packed_attention(model)` switches a transformers model to it. The trainer then passes
`cu_seqlens` (document boundaries, from `document_bounds(position_ids)`) and `max_seqlen` to the
model's forward; transformers hands them to every layer's attention. On CUDA in bf16/fp16 it is
PyTorch's FlashAttention varlen kernel (work grows with the sum of squared document lengths, with
no mask in memory); elsewhere, causal SDPA one document at a time. No [T x T] mask is built.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NAME = "k15_packed"


def document_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32 [documents + 1]: start of each document, then the row's length) and the
    longest document, for one packed row whose positions restart at 0 for each document."""
    row = position_ids.reshape(-1)
    starts = (row == 0).nonzero().flatten()
    bounds = torch.cat([starts, torch.tensor([row.numel()], device=row.device)]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


@torch.compiler.disable  # an opaque kernel call; compiled layers break the graph around it
def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seqlens=None,
                     max_seqlen=None, **kwargs):
    """query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None), causal per document."""
    if cu_seqlens is None:
        raise ValueError(f"the {NAME!r} attention needs cu_seqlens= and max_seqlen= in the model's forward "
                         f"(k15.models.attention.document_bounds)")
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got batch size {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = _flash_varlen(q, k, v, cu_seqlens, max_seqlen, scaling)
    else:
        out = torch.empty_like(q)
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds, bounds[1:]):
            doc = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # [heads, s, D]
            out[a:b] = F.scaled_dot_product_attention(*doc, is_causal=True, scale=scaling,
                                                      enable_gqa=True).transpose(0, 1)
    return out[None], None


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    """torch.nn.attention.varlen across PyTorch versions: older ones (2.11) say causal with
    `is_causal` and want as many KV heads as query heads (repeated here); newer ones take a window
    and `enable_gqa`."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_parameters()
    extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, **extra)


@functools.cache
def _varlen_parameters():
    """varlen_attn's keyword names, read once (this runs in every layer, forward and backward)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return inspect.signature(varlen_attn).parameters


def _no_mask(*args, **kwargs):
    return None  # the documents' bounds travel as cu_seqlens, not as a mask


def use_packed_attention(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    model.set_attn_implementation(NAME)
