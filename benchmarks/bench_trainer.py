"""Trainer throughput on one GPU: tokens/s, model FLOPs utilisation (MFU) and peak memory of the
trainer's own hot path (k15/trainer/worker.py, `_policy_step` and `_step` as train_iteration runs
them: packed micro-batches through the FSDP2-wrapped policy and the fused log-prob kernels, the
mirror-descent loss, backward, AdamW on fp32 master weights), for

  packed:        long-tail samples (p99/median >= 8, median 1k, up to 32k) packed into micro-batches
                 of 32k tokens (bf16 compute, compiled decoder layers, no activation
                 checkpointing); packed_eager: the same, not compiled;
  packed_short:  the same with the packing benchmark's lengths (median 512, up to 8k);
  long:          one 128k-token sample (activation checkpointing on).

    python benchmarks/bench_trainer.py --out /tmp/trainer     # on a GPU; prints a table, writes trainer.json
    python benchmarks/bench_trainer.py --cases packed_short:4 --profile   # 4 micro-batches per optimizer
                                                              # step; where one micro-batch's time goes
    python benchmarks/bench_trainer.py --cases packed_short:4@cudnn,packed_short:4@flash  # attention kernels
    python benchmarks/bench_trainer.py --steps 16 --warmup 16 --unsharded-grads --cases packed_short:4,packed:4
                                           # as cluster=gpu trains (trainer.unsharded_grad_accumulation)

The attention kernel (trainer.attention, k15/models/attention.py) is --attention, or a case's @suffix.

MFU counts model FLOPs only (recomputation by activation checkpointing is not credited):
6 x (decoder matmul parameters) per token, 6 x (LM head) per trained token, and causal attention
6 x s^2 x hidden per document of s tokens per layer (forward QK^T and PV, 3x for backward), over
989 TFLOP/s, the H100/H200 dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

PEAK_BF16 = 989.4e12


def model_cfg(max_position: int):
    from k15.config import ModelConfig

    repo = Path(__file__).resolve().parents[1]
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(repo / "conf/model/qwen2_0p5b.yaml"),
                           {"max_position": max_position})


def make_worker(micro_tokens: int, checkpointing: bool, compile_layers: bool, attention: str, unsharded: bool):
    from k15.config import AlgoConfig, TrainerConfig
    from k15.trainer.worker import TrainerWorker

    trainer = OmegaConf.structured(TrainerConfig(micro_batch_tokens=micro_tokens, mixed_precision=True,
                                                 activation_checkpointing=checkpointing, compile=compile_layers,
                                                 logprob_impl="fused", lr=1e-5, attention=attention,
                                                 unsharded_grad_accumulation=unsharded))
    return TrainerWorker(model_cfg(max(micro_tokens, 4096)), trainer, OmegaConf.structured(AlgoConfig),
                         temperature=1.0, seed=0, device="cuda")


def long_tail_lengths(n: int, median: int, cap: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(cap, max(64, int(median * math.exp(rng.gauss(0, 1.1))))) for _ in range(n)]


def flops_of(batch, layer_params: int, head_params: int, hidden: int, layers: int) -> float:
    """Model FLOPs of one training step on a packed micro-batch (filler documents excluded)."""
    bounds = batch.cu_seqlens.tolist()
    docs = [b - a for a, b in zip(bounds, bounds[1:])]
    filler = 0 if batch.num_documents == len(docs) else docs[-1]  # pad_to_budget appends one
    tokens = batch.num_tokens - filler
    trained = batch.num_trained
    attention = sum(6 * s * s * hidden * layers for s in (docs[:-1] if filler else docs))
    return 6 * layer_params * tokens + 6 * head_params * trained + attention, tokens


KERNEL_GROUPS = [  # (group, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "cudnn", "fmha", "sdpa")),
    ("LM head (k15 Triton)", ("_fwd_ws_kernel", "_fwd_kernel", "_grad_logits", "_target_logit", "_lse_", "_dhidden",
                              "_dweight", "_combine", "_finalize")),
    ("GEMM (cuBLAS)", ("gemm", "nvjet", "sm90_xmma", "cutlass", "Kernel2", "splitKreduce")),
    ("fused elementwise (Inductor)", ("triton_",)),
    ("optimizer", ("multi_tensor", "adam", "fused_adam")),
    ("FSDP copies, casts", ("copy", "cast", "chunk_cat", "split_with_sizes", "CatArray", "foreach_copy")),
    ("NCCL", ("nccl",)),
]


def is_kernel(event) -> bool:
    """A kernel or copy on the GPU, not a user range the profiler also draws there (Optimizer.step#...)."""
    name = getattr(event, "key", None) or event.name
    return (event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
            and "#" not in name)


def kernel_table(profiler, wall_ms: float) -> list[tuple[str, float]]:
    """CUDA time of one profiled step by kernel group, and the top kernels: where the step goes."""
    groups: dict[str, float] = {}
    kernels = []
    for e in profiler.key_averages():
        ms = e.self_device_time_total / 1e3
        if ms <= 0 or not is_kernel(e):
            continue
        name = e.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k.lower() in name for k in keys)), "other elementwise")
        groups[group] = groups.get(group, 0.0) + ms
        kernels.append((ms, e.count, group, e.key[:90]))
    busy = sum(groups.values())
    print(f"\none step: {wall_ms:.1f} ms wall, {busy:.1f} ms of kernels, {wall_ms - busy:.1f} ms with the GPU idle")
    for g, ms in sorted(groups.items(), key=lambda x: -x[1]):
        print(f"  {g:<32}{ms:>9.1f} ms {ms / wall_ms:>6.1%}")
    print("top kernels (ms, calls, name):")
    for ms, n, _, key in sorted(kernels, reverse=True)[:20]:
        print(f"  {ms:>8.2f} {n:>5}  {key}")
    print("top kernels outside GEMM, attention and the head:")
    for ms, n, _, key in sorted(k for k in kernels if k[2] not in ("GEMM (cuBLAS)", "attention",
                                                                   "LM head (k15 Triton)"))[::-1][:20]:
        print(f"  {ms:>8.2f} {n:>5}  {key}")
    idle_gaps(profiler)
    return sorted(groups.items(), key=lambda x: -x[1])


def idle_gaps(profiler, top: int = 12) -> None:
    """Where the GPU waits: gaps between consecutive kernels (any stream) with the kernels around them."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in profiler.events() if is_kernel(e))
    gaps, end, last = [], None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append(((start - end) / 1e3, last[:50], name[:50]))
        if end is None or stop > end:
            end, last = stop, name
    total = sum(g for g, _, _ in gaps)
    print(f"GPU idle between kernels: {total:.1f} ms in {len(gaps)} gaps; "
          f"{sum(g for g, _, _ in gaps if g > 0.05):.1f} ms in gaps over 50 us. Largest (ms, after -> before):")
    for g, a, b in sorted(gaps, reverse=True)[:top]:
        print(f"  {g:>7.2f}  {a} -> {b}")


def run_case(name: str, micro_tokens: int, lengths: list[int], steps: int, warmup: int, checkpointing: bool,
             compile_layers: bool, attention: str, unsharded: bool = False, accumulate: int = 1,
             profile: bool = False, phases: bool = False) -> dict:
    from tqdm import tqdm

    from k15.trainer.packing import Sample

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    worker = make_worker(micro_tokens, checkpointing, compile_layers, attention, unsharded)
    hf = worker.model
    hidden, layers = hf.config.hidden_size, hf.config.num_hidden_layers
    head_params = hf.lm_head.weight.numel()
    layer_params = sum(p.numel() for n, p in hf.model.layers.named_parameters() if p.dim() == 2)
    rng = random.Random(1)
    vocab = hf.config.vocab_size
    samples = []
    for i, n in enumerate(lengths):  # a 64-token prompt, the rest response (trained)
        tokens = [rng.randrange(vocab) for _ in range(n)]
        p = min(64, n - 1)
        samples.append(Sample(tokens, [False] * (p - 1) + [True] * (n - p), i))
    micros = worker._micro_batches(samples)
    random.Random(2).shuffle(micros)  # first-fit decreasing puts the longest documents first
    warmup = math.ceil(warmup / accumulate) * accumulate  # whole optimizer steps
    # profiled (untimed): the last micro-batch of one more accumulation, so it includes an optimizer step
    profiled = warmup + steps + accumulate - 1 if profile else -1
    n_timed = steps + (accumulate if profile else 0)
    micros = (micros * math.ceil(n_timed / len(micros)))[:n_timed]
    # the warm-up cycles through the timed micro-batches: one-off work per shape (compilation,
    # cuDNN's plans) is done before the window, as it is after a run's first minutes
    micros = [micros[i % len(micros)] for i in range(warmup)] + micros
    # counted here: reading the bounds back inside the window would synchronise every micro-batch
    costs = [flops_of(m, layer_params, head_params, hidden, layers) for m in micros]
    k = worker.algo.samples_per_prompt
    rewards = torch.randint(0, 2, (math.ceil(len(samples) / k) * k,), device="cuda").float()
    with torch.no_grad():  # pi_theta_i's log-probs, computed before the steps as train_iteration does
        old = {id(m): worker._logprobs(m) for m in micros}
    opt = worker._optimizer(1e-5)
    worker.policy.train()
    base = torch.cuda.memory_allocated()
    # The timed window runs micro-batches back to back as the trainer does (the host queues the next
    # one while the GPU finishes the last; it waits only where the trainer does): one wall-clock
    # time for the window, per-micro-batch times from CUDA events. --phases synchronises inside.
    marks, phase_times, flops, tokens, kernels = [], [], 0.0, 0, None
    for i, micro in enumerate(tqdm(micros, desc=name, mininterval=5)):
        timed = warmup <= i < warmup + steps
        if i == warmup:
            torch.cuda.synchronize()
            plans_before = cudnn_plans()
            window_start = time.perf_counter()
        if timed:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        profiler = torch.profiler.profile() if i == profiled else None
        if profiler:
            torch.cuda.synchronize()
            profiler.__enter__()
            t0 = time.perf_counter()
        if phases:
            torch.cuda.synchronize()
            p0 = time.perf_counter()
        last = (i + 1) % accumulate == 0
        worker._policy_step(micro, old[id(micro)], rewards, last)  # forward, mirror-descent loss, backward
        if phases:
            torch.cuda.synchronize()
            p1 = time.perf_counter()
        if last:
            worker._step(opt)
        if phases and timed:
            torch.cuda.synchronize()
            phase_times.append((p1 - p0, time.perf_counter() - p1))
        if profiler:
            torch.cuda.synchronize()
            profiler.__exit__(None, None, None)
            kernels = kernel_table(profiler, 1e3 * (time.perf_counter() - t0))
        if timed:
            f, t = costs[i]
            flops, tokens = flops + f, tokens + t
        if i == warmup + steps - 1:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - window_start
    times = sorted(a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:]))
    result = {"case": name, "micro_batch_tokens": micro_tokens, "steps": steps, "micro_batches_per_optimizer_step":
              accumulate, "activation_checkpointing": checkpointing, "compile": compile_layers,
              "attention": worker.policy.attention, "unsharded_grad_accumulation": unsharded,
              "cudnn_plans_before_after_window": [plans_before, cudnn_plans()],
              "compiled_graphs": compiled_graphs(),
              "profile_ms_by_kernel_group": dict(kernels) if kernels else None,
              "seconds_per_step": seconds / steps, "median_step_seconds": times[len(times) // 2],
              "policy_step_optimizer_seconds": [sum(p[j] for p in phase_times) / len(phase_times)
                                                for j in range(2)] if phases else None,
              "tokens_per_s": tokens / seconds,
              "mfu": flops / seconds / PEAK_BF16, "padding_waste": 1 - tokens / (steps * micro_tokens),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
              "state_memory_gib": base / 2**30}
    del worker, opt
    return result


def cudnn_plans() -> int:
    """Execution plans cuDNN's attention has built so far in this process (0.1-0.2 s each)."""
    ops = sys.modules.get("cudnn.sdpa.fwd.torch_op")
    return len(ops._graph_cache) if ops else 0


def compiled_graphs() -> int:
    """Graphs torch.compile built so far in this process (recompilations included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--packed-tokens", type=int, default=32768)
    ap.add_argument("--long-tokens", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cases", default="packed_eager,packed,packed_short,long")
    ap.add_argument("--warmup", type=int, default=4, help="untimed micro-batches first, cycling through the timed ones (compilation, cuDNN's plans)")
    ap.add_argument("--attention", default="auto", help="trainer.attention: auto | cudnn | flash")
    ap.add_argument("--unsharded-grads", action="store_true", help="trainer.unsharded_grad_accumulation")
    ap.add_argument("--profile", action="store_true", help="after the timed window, profile one more optimizer step's last micro-batch: "
                    "time by kernel group, top kernels, GPU idle gaps")
    ap.add_argument("--phases", action="store_true",
                    help="time the policy step (forward, loss, backward) and the optimizer apart")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_trainer.py needs a CUDA GPU")
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29577", rank=0, world_size=1)
    # Long-tail document lengths (p99/median >= 8): a long-CoT mix (median 1k, up to the whole
    # micro-batch) and the packing benchmark's (median 512, up to 8k: benchmarks/packing.py).
    long_cot = long_tail_lengths(3000, median=1024, cap=args.packed_tokens)
    shorter = long_tail_lengths(3000, median=512, cap=8192)
    for name, lengths in (("long-CoT mix", long_cot), ("packing-benchmark mix", shorter)):
        q = sorted(lengths)
        print(f"{name}: median {q[len(q) // 2]}, p99 {q[int(0.99 * len(q))]}, "
              f"p99/median {q[int(0.99 * len(q))] / q[len(q) // 2]:.1f}")
    packed = dict(micro_tokens=args.packed_tokens, checkpointing=False)
    long = dict(micro_tokens=args.long_tokens, lengths=[args.long_tokens], checkpointing=True)
    cases = {
        "packed_eager": dict(packed, lengths=long_cot, compile_layers=False),
        "packed": dict(packed, lengths=long_cot, compile_layers=True),
        "packed_short": dict(packed, lengths=shorter, compile_layers=True),
        "long": dict(long, compile_layers=True),
    }
    results = []
    for spec in args.cases.split(","):
        spec, _, attention = spec.partition("@")  # "packed:4@flash": FlashAttention-2
        name, _, acc = spec.partition(":")  # "packed:4": 4 micro-batches per optimizer step
        accumulate = int(acc or 1)
        c = cases[name]
        steps = args.steps if name.startswith("packed") else max(2, args.steps // 3)
        steps = math.ceil(steps / accumulate) * accumulate
        try:
            results.append(run_case(name, steps=steps, warmup=args.warmup, profile=args.profile, phases=args.phases,
                                    accumulate=accumulate, attention=attention or args.attention,
                                    unsharded=args.unsharded_grads, **c))
        except torch.OutOfMemoryError as e:
            results.append({"case": name, "error": f"out of memory: {str(e)[:200]}"})
        print(json.dumps(results[-1]), flush=True)
    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}, Qwen2-0.5B shape (494M parameters), bf16 compute / fp32 master weights, FSDP2 on 1 GPU")
    print(f"{'case':<18}{'attention':>10}{'micro/opt':>10}{'tokens/micro':>13}{'s/micro':>9}{'tokens/s':>11}{'MFU':>7}"
          f"{'peak GiB':>10}{'waste':>7}{'graphs':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<18}{r['error']}")
            continue
        print(f"{r['case']:<18}{r['attention']:>10}{r['micro_batches_per_optimizer_step']:>10}{r['micro_batch_tokens']:>13}"
              f"{r['seconds_per_step']:>9.3f}{r['tokens_per_s']:>11.0f}{r['mfu']:>7.1%}{r['peak_memory_gib']:>10.1f}"
              f"{r['padding_waste']:>7.1%}{r['compiled_graphs']:>8}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainer.json").write_text(json.dumps({"gpu": gpu, "date": time.strftime("%Y-%m-%d"),
                                                  "results": results}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
