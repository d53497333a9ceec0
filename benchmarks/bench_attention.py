"""Packed causal attention on 32k-token micro-batches: FlashAttention-2 against cuDNN, through k15's
own custom ops (k15/models/attention.py: `flash_varlen`, `cudnn_varlen`), Qwen2-0.5B's heads (14
query, 2 KV, dim 64), per layer. Micro-batches from the packing benchmark's mix (median 512, up to
8k), packed first-fit decreasing: the fullest, then ones whose longest document is near 300, 900,
1500, 2500 and 4000 tokens. Errors are against an fp32 per-document reference on the first.

    python benchmarks/bench_attention.py        # on a GPU with cudnn-frontend installed
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import long_tail_lengths  # noqa: E402

from k15.models.attention import cudnn_varlen, flash_varlen  # noqa: E402
from k15.trainer.packing import document_bounds, plan_bins  # noqa: E402

T, HQ, HK, D = 32768, 14, 2, 64
SCALE = D ** -0.5


def run(varlen, q, k, v, grad, bounds, longest, backward=True):
    if not backward:
        with torch.no_grad():
            return [varlen(q, k, v, bounds, longest, SCALE)]
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = varlen(qq, kk, vv, bounds, longest, SCALE)
    out.backward(grad)
    return [out, qq.grad, kk.grad, vv.grad]


def reference(q, k, v, grad, edges):
    qq, kk, vv = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (qq, kk, vv)), is_causal=True,
                                                    scale=SCALE, enable_gqa=True).transpose(0, 1)
                     for a, b in zip(edges, edges[1:])])
    out.backward(grad.float())
    return [out, qq.grad, kk.grad, vv.grad]


def milliseconds(fn, reps=10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")
    import cudnn

    print(f"{torch.cuda.get_device_name()}, cuDNN {cudnn.backend_version()}, torch {torch.__version__}")
    lengths = long_tail_lengths(3000, median=512, cap=8192)
    bins = [[lengths[i] for i in b] for b in plan_bins(lengths, T)]
    # the fullest, then for each target the micro-batch whose longest document comes closest to it
    picks = [bins[0]] + [min(bins, key=lambda b: abs(max(b) - target)) for target in (300, 900, 1500, 2500, 4000)]
    print(f"{'micro-batch':<34}{'kernel':<8}{'first ms':>9}{'fwd ms':>8}{'bwd ms':>8}{'fwd TF/s':>9}{'bwd TF/s':>9}"
          f"  rel. error out/dq/dk/dv vs fp32")
    for n, docs in enumerate(picks):
        docs = docs + ([T - sum(docs)] if sum(docs) < T else [])
        bounds, longest = document_bounds(docs)
        edges, bounds = bounds.tolist(), bounds.cuda()
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v, grad = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (HQ, HK, HK, HQ))
        want = reference(q, k, v, grad, edges) if n == 0 else None
        fwd_flops = sum(2 * s * s * HQ * D for s in docs)  # causal QK^T and PV
        for name, varlen in (("flash", flash_varlen), ("cudnn", cudnn_varlen)):
            t0 = time.perf_counter()
            got = run(varlen, q, k, v, grad, bounds, longest)
            torch.cuda.synchronize()
            first = 1e3 * (time.perf_counter() - t0)
            fwd = milliseconds(lambda: run(varlen, q, k, v, grad, bounds, longest, backward=False))
            bwd = milliseconds(lambda: run(varlen, q, k, v, grad, bounds, longest)) - fwd
            errors = (" ".join(f"{((a.float() - b).norm() / b.norm()).item():.1e}" for a, b in zip(got, want))
                      if want else "")
            label = f"{len(docs)} documents, longest {longest}"
            print(f"{label:<34}{name:<8}{first:>9.1f}{fwd:>8.3f}{bwd:>8.3f}{fwd_flops / fwd / 1e9:>9.0f}"
                  f"{2.5 * fwd_flops / bwd / 1e9:>9.0f}  {errors}", flush=True)


if __name__ == "__main__":
    main()
