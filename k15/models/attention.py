"""Attention within each document of a packed row, as a Hugging Face attention implementation.

`use_packed_attention(model, backend)` switches a transformers model to it. The trainer then passes
`cu_seqlens` (document boundaries, made with each packed batch, k15/trainer/packing.py) and
`max_seqlen` to the model's forward; transformers hands them to every layer's attention. On CUDA in
bf16/fp16 it is a varlen kernel as a custom op (work grows with the sum of squared document lengths,
no mask in memory, KV heads shared, traceable by torch.compile):
- "cudnn": cuDNN's fused attention on packed (THD) tensors, through NVIDIA's cudnn-frontend
  (`pip install nvidia-cudnn-frontend`): 1.3-1.4x FlashAttention-2 on an H100 at head dim 64 for
  documents of thousands of tokens, slower than it where all are short (benchmarks/RESULTS.md);
- "flash": FlashAttention-2's varlen kernels, in every CUDA build of PyTorch;
- "auto": per micro-batch, cuDNN where its longest document has at least CUDNN_MIN_LONGEST tokens
  and cudnn-frontend is installed, else FlashAttention-2.
Elsewhere (CPU, fp32) it is causal SDPA one document at a time. No [T x T] mask is built.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

NAME = "k15_packed"
BACKENDS = ("auto", "cudnn", "flash")
CUDNN_MIN_LONGEST = 1024  # below, FlashAttention-2 was as fast or faster on an H100 (RESULTS.md)


def resolve_backend(backend: str) -> str:
    """What `backend` (trainer.attention) runs on CUDA: "cudnn", "flash", or "auto" (both, chosen
    per micro-batch; cudnn-frontend installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"trainer.attention must be one of {', '.join(BACKENDS)}, got {backend!r}")
    has_cudnn = importlib.util.find_spec("cudnn") is not None
    if backend == "cudnn" and not has_cudnn:
        raise ValueError("trainer.attention=cudnn needs NVIDIA's cudnn-frontend: pip install nvidia-cudnn-frontend "
                         "(or trainer.attention=flash)")
    return "flash" if backend == "auto" and not has_cudnn else backend


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seqlens=None,
                     max_seqlen=None, backend="flash", **kwargs):
    """query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None), causal per document."""
    if cu_seqlens is None:
        raise ValueError(f"the {NAME!r} attention needs cu_seqlens= and max_seqlen= in the model's forward "
                         f"(a k15.trainer.packing.PackedBatch carries them)")
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got batch size {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        use_cudnn = backend == "cudnn" or (backend == "auto" and max_seqlen >= CUDNN_MIN_LONGEST)
        varlen = cudnn_varlen if use_cudnn else flash_varlen
        out = varlen(q, k, v, cu_seqlens, max_seqlen, scale)
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


def _save_for_backward(ctx, inputs, output):  # both ops: (q, k, v, cu_seqlens, max_seqlen, scale) -> (out, lse)
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward_through(backward_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None
    return backward


_flash_varlen_fwd.register_autograd(_backward_through(_flash_varlen_bwd), setup_context=_save_for_backward)


def flash_varlen(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal attention within each document: q [T, H, D], k/v [T, H_kv, D] (H a multiple of
    H_kv), cu_seqlens int32 on the same GPU -> [T, H, D]."""
    return _flash_varlen_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen, scale)[0]


# cuDNN's fused attention on packed tensors (cudnn-frontend's torch ops), wrapped as one custom op
# like FlashAttention above. cuDNN builds an execution plan per (documents, longest document),
# 0.1-0.2 s each: zero-length filler documents and a power-of-two longest document keep that to a few
# plans per run instead of one per micro-batch.
def _cudnn_bounds(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> tuple[torch.Tensor, int]:
    pad = -(cu_seqlens.numel() - 1) % 16
    if pad:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_full((pad,), total)])
    return cu_seqlens, max(256, 1 << (max(max_seqlen, 1) - 1).bit_length())


@torch.library.custom_op("k15::cudnn_varlen", mutates_args=())
def _cudnn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    import cudnn.sdpa.fwd.torch_op  # noqa: F401  registers torch.ops.cudnn.sdpa_fwd / sdpa_bwd

    cu, longest = _cudnn_bounds(cu_seqlens, max_seqlen, q.shape[0])
    out, stats = torch.ops.cudnn.sdpa_fwd(q, k, v, scale, is_causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                          max_seqlen_q=longest, max_seqlen_kv=longest, return_lse=True)
    return out, stats[:, :, 0]  # log-sum-exp [T, H]


@_cudnn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("k15::cudnn_varlen_backward", mutates_args=())
def _cudnn_varlen_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from cudnn.sdpa.fwd.torch_op import thd_lse_to_padded

    cu, longest = _cudnn_bounds(cu_seqlens, max_seqlen, q.shape[0])
    # cuDNN's backward on packed tensors takes the log-sum-exp padded to [documents, H, longest, 1]
    dq, dk, dv = torch.ops.cudnn.sdpa_bwd(grad, q, k, v, out, thd_lse_to_padded(lse, cu, longest), scale,
                                          is_causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                          max_seqlen_kv=longest,
                                          is_deterministic=torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv


@_cudnn_varlen_bwd.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_cudnn_varlen_fwd.register_autograd(_backward_through(_cudnn_varlen_bwd), setup_context=_save_for_backward)


def cudnn_varlen(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """flash_varlen's contract, on cuDNN's fused attention (needs cudnn-frontend)."""
    return _cudnn_varlen_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen, scale)[0]


def use_packed_attention(model, backend: str = "auto") -> str:
    """Switch `model` to packed attention on `backend`'s CUDA kernels; returns resolve_backend's answer."""
    from transformers import AttentionInterface

    kernel = resolve_backend(backend)
    # transformers takes any implementation named "...flash..." for its own FlashAttention path
    name = NAME if kernel == "flash" else f"{NAME}_{kernel}"
    AttentionInterface.register(name, functools.partial(packed_attention, backend=kernel))
    # No mask function is registered: transformers then builds no mask at all. With one (even one
    # returning None) it scans the position ids for packed documents and makes the host wait for
    # the GPU at every forward; the documents' bounds travel as cu_seqlens instead.
    model.set_attn_implementation(name)
    return kernel
