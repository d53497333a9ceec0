"""Attention within each document of a packed row, as a Hugging Face attention implementation.

`use_packed_attention(model)` switches a transformers model to it. The trainer then passes
`cu_seqlens` (document boundaries, made with each packed batch, k15/trainer/packing.py) and
`max_seqlen` to the model's forward; transformers hands them to every layer's attention. On CUDA in
bf16/fp16 it is FlashAttention-2's varlen kernel as a custom op (work grows with the sum of squared
document lengths, no mask in memory, KV heads shared, traceable by torch.compile); elsewhere, causal
SDPA one document at a time. No [T x T] mask is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "k15_packed"


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seqlens=None,
                     max_seqlen=None, **kwargs):
    """query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None), causal per document."""
    if cu_seqlens is None:
        raise ValueError(f"the {NAME!r} attention needs cu_seqlens= and max_seqlen= in the model's forward "
                         f"(a k15.trainer.packing.PackedBatch carries them)")
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got batch size {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = flash_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
    else:
        out = _sdpa_per_document(q, k, v, cu_seqlens, scale)
    return out[None], None


@torch.compiler.disable  # a Python loop over documents: compiled layers break the graph around it
def _sdpa_per_document(q, k, v, cu_seqlens, scale):
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        doc = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # [heads, s, D]
        out[a:b] = F.scaled_dot_product_attention(*doc, is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


# FlashAttention-2's varlen kernels (in every CUDA build of PyTorch) as one custom op, so that
# torch.compile traces whole decoder layers around it (rotary, residuals and norms fused) and
# grouped-query K/V go in as they are: the kernel shares each KV head across its query heads, where
# torch.nn.attention.varlen in PyTorch 2.11 wants the KV heads repeated first.
@torch.library.custom_op("k15::flash_varlen", mutates_args=())
def _flash_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0,
                                                       True, False, scale=scale)[:2]
    return out, lse


@_flash_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # lse: [H, T]


@torch.library.custom_op("k15::flash_varlen_backward", mutates_args=())
def _flash_varlen_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    no_dropout = torch.zeros(2, dtype=torch.uint64, device=q.device), torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(grad, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen,
                                                          max_seqlen, 0.0, True, *no_dropout, scale=scale)
    return dq, dk, dv


@_flash_varlen_bwd.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _flash_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _flash_varlen_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_flash_varlen_fwd.register_autograd(_flash_backward, setup_context=_flash_setup)


def flash_varlen(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal attention within each document: q [T, H, D], k/v [T, H_kv, D] (H a multiple of
    H_kv), cu_seqlens int32 on the same GPU -> [T, H, D]."""
    return _flash_varlen_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen, scale)[0]


def _no_mask(*args, **kwargs):
    return None  # the documents' bounds travel as cu_seqlens, not as a mask


def use_packed_attention(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    model.set_attn_implementation(NAME)
