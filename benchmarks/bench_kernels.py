"""GPU benchmark of per-token log-probs through the LM head: ours (k15.kernels) against naive
PyTorch, chunked PyTorch, Liger-Kernel's fused linear cross-entropy (reduction="none") and Apple's
Cut Cross-Entropy (default filtering and filter_eps=None).

One run: (1) checks every implementation against a float64 reference at a small N (logp, dHidden,
dWeight relative errors, for a random upstream gradient); (2) at each N times forward+backward
and forward-only (median of CUDA-event timings) and measures peak memory above the inputs, next to
one cuBLAS GEMM hidden @ weight.T of the same shape; (3) prints one table and writes JSON and
Markdown under --out.

    python benchmarks/bench_kernels.py --out /tmp/bench            # Qwen2.5-7B shapes, bf16
    python benchmarks/bench_kernels.py --sizes 8192 --impls ours,liger --reps 5

Liger-Kernel and cut-cross-entropy are optional imports; a missing one is reported, not fatal.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

GiB = float(1 << 30)
DEVICE = "cuda"


# --------------------------------------------------------------------------------------------------
# Implementations: each maps (h, w, t) -> logp [N] fp32 (differentiable when autograd is on)
# --------------------------------------------------------------------------------------------------


def naive_logprobs(h, w, t):
    logits = h @ w.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(1, t[:, None]).squeeze(1)


class _ChunkedLogprobs(torch.autograd.Function):
    """The usual hand-written chunked version: bf16 cuBLAS logits per row chunk, fp32 softmax,
    recomputed in backward; dWeight accumulated in fp32."""

    CHUNK = 8192

    @staticmethod
    def forward(ctx, h, w, t):
        out, lse = [], []
        for i in range(0, h.shape[0], _ChunkedLogprobs.CHUNK):
            logits = (h[i : i + _ChunkedLogprobs.CHUNK] @ w.t()).float()
            l = torch.logsumexp(logits, -1)
            out.append(logits.gather(1, t[i : i + _ChunkedLogprobs.CHUNK, None]).squeeze(1) - l)
            lse.append(l)
            del logits
        ctx.save_for_backward(h, w, t, torch.cat(lse))
        return torch.cat(out)

    @staticmethod
    def backward(ctx, g):
        h, w, t, lse = ctx.saved_tensors
        dh = torch.empty_like(h)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        C = _ChunkedLogprobs.CHUNK
        for i in range(0, h.shape[0], C):
            hc = h[i : i + C]
            p = torch.exp((hc @ w.t()).float() - lse[i : i + C, None])
            gl = -p * g[i : i + C, None]
            gl.scatter_add_(1, t[i : i + C, None], g[i : i + C, None].float())
            gl = gl.to(h.dtype)
            del p
            torch.mm(gl, w, out=dh[i : i + C])
            _acc_fp32(dw, gl.t(), hc)
            del gl
        return dh, dw.to(w.dtype), None


def _acc_fp32(acc, a, b):
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):
        acc.add_(torch.mm(a, b).float())


def chunked_logprobs(h, w, t):
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return _ChunkedLogprobs.forward(_NullCtx(), h, w, t)
    return _ChunkedLogprobs.apply(h, w, t)


class _NullCtx:
    def save_for_backward(self, *a):
        pass


def liger_logprobs(h, w, t):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(h, w, t, reduction="none")


def cce_logprobs(h, w, t):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, t, reduction="none")


def cce_nofilter_logprobs(h, w, t):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, t, reduction="none", filter_eps=None)


def ours_logprobs(h, w, t, config=None):
    from k15.kernels import fused_logprobs

    return fused_logprobs(h, w, t, impl="triton", config=config)


IMPLS = {
    "naive": naive_logprobs,
    "chunked": chunked_logprobs,
    "liger": liger_logprobs,
    "cce": cce_logprobs,
    "cce_nofilter": cce_nofilter_logprobs,
    "ours": ours_logprobs,
}


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def make_inputs(N, H, V, dtype, seed, scale):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(N, H, device=DEVICE, generator=gen, dtype=torch.float32).to(dtype)
    w = (torch.randn(V, H, device=DEVICE, generator=gen, dtype=torch.float32) * (scale / math.sqrt(H))).to(dtype)
    t = torch.randint(0, V, (N,), device=DEVICE, generator=gen)
    g = torch.randn(N, device=DEVICE, generator=gen, dtype=torch.float32)
    return h, w, t, g


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


# Seconds of host idle before every timed repetition (--cooldown). Under sustained load the H100 sits at
# its power cap (700 W, clock reason "SW power cap") and runs ~5% slower than right after a short idle
# (measured 2026-11-23: ours fwd+bwd 835-854 ms back to back, 794-808 ms after 0.2-1 s idle; three
# GEMMs 611-628 vs 587-593 ms), so timings taken back to back and timings taken after a pause do not
# compare. 0 (default) keeps the historical protocol; a cooldown puts every timing, the reference
# GEMMs' included, in the same state.
COOLDOWN = 0.0


def cuda_time(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if COOLDOWN:
            time.sleep(COOLDOWN)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def peak_above(fn):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def adjacent_gemm(h, w, count):
    """Median time of `count` back-to-back cuBLAS GEMMs h @ w.T (NaN if the output does not fit)."""
    try:
        out = torch.empty(h.shape[0], w.shape[0], device=DEVICE, dtype=h.dtype)
    except torch.OutOfMemoryError:
        return float("nan")

    def run():
        for _ in range(count):
            torch.mm(h, w.t(), out=out)

    ms = cuda_time(run, reps=2)
    del out
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def fwd_bwd_step(impl, h, w, t, g):
    def step():
        logp = impl(h, w, t)
        dh, dw = torch.autograd.grad(logp, (h, w), grad_outputs=g)
        del dh, dw, logp

    return step


def fwd_step(impl, h, w, t):
    def step():
        with torch.no_grad():
            logp = impl(h, w, t)
        del logp

    return step


# --------------------------------------------------------------------------------------------------
# Correctness against float64
# --------------------------------------------------------------------------------------------------


def check_correctness(names, N, H, V, dtype, scale, log, extra=None):
    h, w, t, g = make_inputs(N, H, V, dtype, seed=1234, scale=scale)
    hd = h.double().requires_grad_()
    wd = w.double().requires_grad_()
    lp_ref = torch.log_softmax(hd @ wd.t(), -1).gather(1, t[:, None]).squeeze(1)
    dh_ref, dw_ref = torch.autograd.grad(lp_ref, (hd, wd), grad_outputs=g.double())
    lp_ref = lp_ref.detach()
    del hd, wd
    torch.cuda.empty_cache()
    rows = []
    todo = [(n, IMPLS[n]) for n in names] + list((extra or {}).items())
    for name, impl in todo:
        try:
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            logp = impl(hh, ww, t)
            dh, dw = torch.autograd.grad(logp, (hh, ww), grad_outputs=g)
            with torch.no_grad():
                lp_nograd = impl(h, w, t)
            row = dict(
                impl=name,
                logp=rel(logp.detach(), lp_ref),
                dh=rel(dh, dh_ref),
                dw=rel(dw, dw_ref),
                fwd_only_equal=bool(torch.equal(lp_nograd.float(), logp.detach().float())),
            )
            del hh, ww, logp, dh, dw, lp_nograd
        except Exception as e:  # noqa: BLE001
            row = dict(impl=name, error=f"{type(e).__name__}: {e}"[:300])
            log(traceback.format_exc())
        rows.append(row)
        log(json.dumps(row))
        gc.collect()
        torch.cuda.empty_cache()
    floor = dict(
        impl="(bf16 rounding of the exact gradient)",
        logp=0.0,
        dh=rel(dh_ref.to(dtype), dh_ref),
        dw=rel(dw_ref.to(dtype), dw_ref),
    )
    rows.append(floor)
    return rows


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def bench_size(names, N, H, V, dtype, scale, reps, log):
    res = dict(N=N, H=H, V=V)
    h, w, t, g = make_inputs(N, H, V, dtype, seed=N, scale=scale)
    flops = 2.0 * N * H * V
    try:
        out = torch.empty(N, V, device=DEVICE, dtype=dtype)
        gemm_ms = cuda_time(lambda: torch.mm(h, w.t(), out=out), reps=max(reps, 5))
        del out
    except torch.OutOfMemoryError:
        gemm_ms = float("nan")
    res["gemm_ms"] = gemm_ms
    res["gemm_tflops"] = flops / gemm_ms / 1e9
    log(f"N={N}: cuBLAS GEMM {gemm_ms:.2f} ms ({res['gemm_tflops']:.0f} TFLOP/s)")
    gc.collect()
    torch.cuda.empty_cache()
    res["impls"] = {}
    for name in names:
        impl = IMPLS[name]
        r = {}
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        for kind, mk in (("fwd_bwd", lambda: fwd_bwd_step(impl, hh, ww, t, g)), ("fwd", lambda: fwd_step(impl, h, w, t))):
            try:
                step = mk()
                r[kind + "_peak_gib"] = peak_above(step)  # also the warm-up (compilation, autotuning)
                # the GEMM reference again, right before this timing: the card's clocks drift with its
                # temperature over a run (about 5% seen), so this one shares the timed code's state
                r[kind + "_gemm_adj_ms"] = adjacent_gemm(h, w, 3 if kind == "fwd_bwd" else 1)
                r[kind + "_ms"] = cuda_time(step, reps=reps, warmup=0)
            except torch.OutOfMemoryError:
                r[kind + "_ms"] = "OOM"
                r[kind + "_peak_gib"] = "OOM"
            except Exception as e:  # noqa: BLE001
                r[kind + "_ms"] = f"error: {type(e).__name__}"
                log(traceback.format_exc())
            gc.collect()
            torch.cuda.empty_cache()
        if isinstance(r.get("fwd_bwd_ms"), float):
            r["fwd_bwd_x3gemm"] = r["fwd_bwd_ms"] / (3 * gemm_ms)
            r["fwd_bwd_x3gemm_adj"] = r["fwd_bwd_ms"] / r["fwd_bwd_gemm_adj_ms"]
        if isinstance(r.get("fwd_ms"), float):
            r["fwd_x1gemm"] = r["fwd_ms"] / gemm_ms
            r["fwd_x1gemm_adj"] = r["fwd_ms"] / r["fwd_gemm_adj_ms"]
        res["impls"][name] = r
        log(f"  {name}: {json.dumps(r)}")
        del hh, ww
    return res


# --------------------------------------------------------------------------------------------------
# Tuning our kernels: forward configurations, and the backward's pieces on one (chunk, slice) block
# --------------------------------------------------------------------------------------------------

FWD_CFGS = [
    (256, 128, 64, 8, 3),
    (256, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 128, 64, 4, 3),
]
BWD_CFGS = [
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (256, 128, 64, 8, 4),
]


def tune(N, H, V, dtype, scale, reps, log, fwd_cfgs=None, bwd_cfgs=None, splits_list=(None,), tmas=(True, False),
         do_bwd=True):
    import triton

    from k15.kernels.logprobs import (
        LOG2E,
        Config,
        _desc,
        _grad_logits_kernel,
        _grad_logits_tma_kernel,
        logprobs_forward,
    )

    out = dict(N=N)
    h, w, t, g = make_inputs(N, H, V, dtype, seed=7, scale=scale)
    buf = torch.empty(N, V, device=DEVICE, dtype=dtype)
    gemm_ms = cuda_time(lambda: torch.mm(h, w.t(), out=buf), reps=5)
    del buf
    torch.cuda.empty_cache()
    flops = 2.0 * N * H * V
    log(f"[tune] N={N} cuBLAS {gemm_ms:.2f} ms {flops / gemm_ms / 1e9:.0f} TFLOP/s")
    out["gemm_ms"] = gemm_ms
    out["fwd"] = []
    todo = [(cfg, sp, tma) for tma in tmas for cfg in (fwd_cfgs or FWD_CFGS) for sp in splits_list]
    for cfg, sp, tma in todo:
        if True:
            try:
                c = Config(fwd=cfg, splits=sp, tma=tma)
                ms = cuda_time(lambda: logprobs_forward(h, w, t, config=c), reps=reps)
                r = dict(cfg=cfg, splits=sp, tma=tma, ms=ms, x_gemm=ms / gemm_ms, tflops=flops / ms / 1e9)
            except Exception as e:  # noqa: BLE001
                r = dict(cfg=cfg, splits=sp, tma=tma, error=f"{type(e).__name__}: {e}"[:200])
            out["fwd"].append(r)
            log(f"[tune] fwd {json.dumps(r)}")
    if not do_bwd:
        return out
    # backward pieces on one block of the size used at N = 131072
    nc, vs = min(N, 16384), 9216
    hc, ws = h[:nc], w[:vs]
    G = torch.empty(nc, vs, device=DEVICE, dtype=dtype)
    lse2 = torch.full((nc,), 20.0, device=DEVICE)
    cc = torch.randn(nc, device=DEVICE)
    tg = t[:nc].to(torch.int32)
    bflops = 2.0 * nc * vs * H
    out["bwd"] = []
    for cfg in bwd_cfgs or BWD_CFGS:
        for gm, pers in ((16, False), (8, True), (16, True)):  # pers: the TMA kernel
            BM, BN, BK, wp, st = cfg
            tiles = triton.cdiv(nc, BM) * triton.cdiv(vs, BN)
            args = (hc, ws, tg, lse2, cc, G, nc, vs, H, hc.stride(0), ws.stride(0), G.stride(0), LOG2E)
            meta = dict(UPCAST=False, PRECISION="ieee", EVEN_K=H % BK == 0, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                        GROUP_M=gm, num_warps=wp, num_stages=st)

            def run():
                if pers:
                    _grad_logits_tma_kernel[(tiles,)](_desc(hc, (BM, BK)), _desc(ws, (BN, BK)), tg, lse2, cc, G, nc,
                                                      vs, H, G.stride(0), LOG2E, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                                      GROUP_M=gm, num_warps=wp, num_stages=st)
                else:
                    _grad_logits_kernel[(tiles,)](*args, **meta)
            try:
                ms = cuda_time(run, reps=max(reps, 5))
                r = dict(cfg=cfg, group_m=gm, tma=pers, ms=ms, tflops=bflops / ms / 1e9)
            except Exception as e:  # noqa: BLE001
                r = dict(cfg=cfg, group_m=gm, tma=pers, error=f"{type(e).__name__}: {e}"[:200])
            out["bwd"].append(r)
            log(f"[tune] grad-logits block {nc}x{vs}: {json.dumps(r)}")
    L = torch.empty(nc, vs, device=DEVICE, dtype=dtype)
    acc = torch.zeros(nc, H, device=DEVICE, dtype=torch.float32)
    dws = torch.zeros(vs, H, device=DEVICE, dtype=dtype)
    pieces = {
        "cuBLAS logits block h_c @ W_s^T": lambda: torch.mm(hc, ws.t(), out=L),
        "cuBLAS dH acc fp32 += G @ W_s": lambda: _acc_fp32(acc, G, ws),
        "cuBLAS dW_s += G^T @ h_c (bf16)": lambda: torch.addmm(dws, G.t(), hc, out=dws),
    }
    for k, fn in pieces.items():
        ms = cuda_time(fn, reps=max(reps, 5))
        log(f"[tune] {k}: {ms:.3f} ms {bflops / ms / 1e9:.0f} TFLOP/s")
        out[k] = ms
    return out


def fmt(x, spec):
    return format(x, spec) if isinstance(x, float) else str(x)


def table(results, checks, meta):
    lines = []
    lines.append(f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; dtype {meta['dtype']}; "
                 f"H={meta['H']}, V={meta['V']}; logits scale {meta['scale']}; {meta['date']}"
                 + (f"; {meta['cooldown_s']} s idle before every timed repetition" if meta.get("cooldown_s") else ""))
    lines.append("")
    lines.append("Correctness against float64 at N=%d (relative Frobenius error; random upstream gradient):" % meta["check_n"])
    lines.append("")
    lines.append("| impl | logp | dHidden | dWeight | no-grad logp == grad logp |")
    lines.append("|---|---|---|---|---|")
    for c in checks:
        if "error" in c:
            lines.append(f"| {c['impl']} | {c['error']} | | | |")
        else:
            lines.append(f"| {c['impl']} | {c['logp']:.1e} | {c['dh']:.2e} | {c['dw']:.2e} | {c.get('fwd_only_equal', '')} |")
    lines.append("")
    lines.append("x GEMM: against the GEMM timed once per size before all implementations; (adj.): against the")
    lines.append("GEMMs timed right before that implementation's own timing (3 back to back for fwd+bwd).")
    lines.append("")
    lines.append("| N | impl | fwd+bwd ms | x 3 GEMM | (adj.) | peak GiB above inputs | fwd-only ms | x 1 GEMM | (adj.) "
                 "| fwd peak GiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        lines.append(f"| {res['N']} | cuBLAS GEMM h@W^T | {res['gemm_ms']:.1f} (x3 = {3 * res['gemm_ms']:.1f}) | "
                     f"{res['gemm_tflops']:.0f} TFLOP/s | | | | | | |")
        for name, r in res["impls"].items():
            lines.append(
                f"| {res['N']} | {name} | {fmt(r.get('fwd_bwd_ms'), '.1f')} | {fmt(r.get('fwd_bwd_x3gemm'), '.2f')} | "
                f"{fmt(r.get('fwd_bwd_x3gemm_adj'), '.2f')} | {fmt(r.get('fwd_bwd_peak_gib'), '.2f')} | "
                f"{fmt(r.get('fwd_ms'), '.1f')} | {fmt(r.get('fwd_x1gemm'), '.2f')} | {fmt(r.get('fwd_x1gemm_adj'), '.2f')} | "
                f"{fmt(r.get('fwd_peak_gib'), '.2f')} |"
            )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8192,32768,131072")
    ap.add_argument("--H", type=int, default=3584)
    ap.add_argument("--V", type=int, default=152064)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--check-n", type=int, default=2048)
    ap.add_argument("--scale", type=float, default=4.0, help="std of the logits (weights scaled so)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--cooldown", type=float, default=0.0,
                    help="seconds of idle before every timed repetition (same power state for all timings)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tune", default="", help="comma-separated N values: sweep our kernels' configs there")
    ap.add_argument("--tune-only", action="store_true")
    ap.add_argument("--tune-fwd", default="", help='JSON list of forward configs, e.g. [[256,128,64,8,3]]')
    ap.add_argument("--tune-splits", default="auto")
    ap.add_argument("--tune-tma", default="1,0")
    ap.add_argument("--tune-no-bwd", action="store_true")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    global COOLDOWN
    COOLDOWN = args.cooldown
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "bench_kernels.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    dtype = getattr(torch, args.dtype)
    names = [n for n in args.impls.split(",") if n]
    import triton

    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        dtype=args.dtype,
        H=args.H,
        V=args.V,
        scale=args.scale,
        check_n=args.check_n,
        cooldown_s=args.cooldown,
        date=time.strftime("%Y-%m-%d"),
        argv=sys.argv,
    )
    for mod in ("liger_kernel", "cut_cross_entropy"):
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001
            log(f"{mod} unavailable: {e}")
    if args.tune:
        fwd_cfgs = [tuple(c) for c in json.loads(args.tune_fwd)] if args.tune_fwd else None
        splits = [None if x == "auto" else int(x) for x in args.tune_splits.split(",")]
        tuned = [tune(int(n), args.H, args.V, dtype, args.scale, args.reps, log, fwd_cfgs=fwd_cfgs, splits_list=splits,
                      tmas=[x == "1" for x in args.tune_tma.split(",")], do_bwd=not args.tune_no_bwd)
                 for n in args.tune.split(",")]
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump(tuned, f, indent=1)
        if args.tune_only:
            return
    checks = []
    if not args.skip_check:
        from k15.kernels.logprobs import Config

        # ours again with the chunking it uses at N=131072 (8 row chunks, 18 vocabulary slices of 8448
        # per chunk): the bf16 accumulation of dWeight across row chunks is exercised at the check size
        n = args.check_n
        forced = Config(chunk_rows=max(1, n // 8), scratch_bytes=(n // 8) * args.H * 4 + (n // 8) * 8448 * 2)
        extra = {"ours (chunked as at 128k)": lambda h, w, t: ours_logprobs(h, w, t, config=forced)} if "ours" in names else {}
        checks = check_correctness(names, args.check_n, args.H, args.V, dtype, args.scale, log, extra)
    results = []
    for N in [int(s) for s in args.sizes.split(",") if s]:
        results.append(bench_size(names, N, args.H, args.V, dtype, args.scale, args.reps, log))
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump(dict(meta=meta, checks=checks, results=results), f, indent=1)
    md = table(results, checks, meta)
    with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
        f.write(md + "\n")
    print()
    print(md)


if __name__ == "__main__":
    main()
