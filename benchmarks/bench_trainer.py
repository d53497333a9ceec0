"""Trainer throughput on one GPU: tokens/s, model FLOPs utilisation (MFU) and peak memory of the
trainer's own hot path (k15/trainer/worker.py: packed micro-batches through the FSDP2-wrapped
policy, the fused log-prob kernels, AdamW on fp32 master weights), for

  packed:        long-tail samples (p99/median >= 8, median 1k, up to 32k) packed into micro-batches
                 of 32k tokens, one optimizer step per micro-batch (bf16 compute, compiled norms
                 and MLP, no activation checkpointing); packed_eager: the same, not compiled;
  packed_short:  the same with the packing benchmark's lengths (median 512, up to 8k);
  long:          one 128k-token sample (activation checkpointing on).

    python benchmarks/bench_trainer.py --out /tmp/trainer     # on a GPU; prints a table, writes trainer.json

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


def make_worker(micro_tokens: int, checkpointing: bool, compile_layers: bool):
    from k15.config import AlgoConfig, TrainerConfig
    from k15.trainer.worker import TrainerWorker

    trainer = OmegaConf.structured(TrainerConfig(micro_batch_tokens=micro_tokens, mixed_precision=True,
                                                 activation_checkpointing=checkpointing, compile=compile_layers,
                                                 logprob_impl="fused", lr=1e-5))
    return TrainerWorker(model_cfg(max(micro_tokens, 4096)), trainer, OmegaConf.structured(AlgoConfig),
                         temperature=1.0, seed=0, device="cuda")


def long_tail_lengths(n: int, median: int, cap: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(cap, max(64, int(median * math.exp(rng.gauss(0, 1.1))))) for _ in range(n)]


def flops_of(batch, layer_params: int, head_params: int, hidden: int, layers: int) -> float:
    """Model FLOPs of one training step on a packed micro-batch (filler documents excluded)."""
    from k15.trainer.packing import IGNORE

    starts = (batch.position_ids == 0).nonzero().flatten().tolist() + [batch.num_tokens]
    docs = [b - a for a, b in zip(starts, starts[1:])]
    filler = 0 if batch.num_documents == len(docs) else docs[-1]  # pad_to_budget appends one
    tokens = batch.num_tokens - filler
    trained = int((batch.targets != IGNORE).sum())
    attention = sum(6 * s * s * hidden * layers for s in (docs[:-1] if filler else docs))
    return 6 * layer_params * tokens + 6 * head_params * trained + attention, tokens


def run_case(name: str, micro_tokens: int, lengths: list[int], steps: int, warmup: int, checkpointing: bool,
             compile_layers: bool, profile: bool = False, phases: bool = False) -> dict:
    from tqdm import tqdm

    from k15.trainer.packing import Sample

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    worker = make_worker(micro_tokens, checkpointing, compile_layers)
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
    need = warmup + steps
    micros = (micros * math.ceil(need / len(micros)))[:need]
    opt = worker._optimizer(1e-5)
    worker.policy.train()
    base = torch.cuda.memory_allocated()
    times, times_by_phase, flops, tokens = [], [], 0.0, 0
    for i, micro in enumerate(tqdm(micros, desc=name, mininterval=5)):
        profiler = torch.profiler.profile() if profile and i == warmup else None
        if profiler:
            profiler.__enter__()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logp = worker._logprobs(micro)
        loss = -logp.sum() / max(micro.num_trained, 1)
        if phases:  # the extra synchronisations cost a little: off for the headline numbers
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        worker._backward(loss, logp)
        if phases:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        worker._step(opt)
        torch.cuda.synchronize()
        if profiler:
            profiler.__exit__(None, None, None)
            print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=50))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            times_by_phase.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            f, t = flops_of(micro, layer_params, head_params, hidden, layers)
            flops, tokens = flops + f, tokens + t
    seconds = sum(times)
    result = {"case": name, "micro_batch_tokens": micro_tokens, "steps": steps,
              "activation_checkpointing": checkpointing, "compile": compile_layers,
              "seconds_per_step": seconds / steps, "median_step_seconds": sorted(times)[len(times) // 2],
              "forward_backward_optimizer_seconds": [sum(p[j] for p in times_by_phase) / steps for j in range(3)]
              if phases else None,
              "tokens_per_s": tokens / seconds,
              "mfu": flops / seconds / PEAK_BF16, "padding_waste": 1 - tokens / (steps * micro_tokens),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
              "state_memory_gib": base / 2**30}
    del worker, opt
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--packed-tokens", type=int, default=32768)
    ap.add_argument("--long-tokens", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cases", default="packed_eager,packed,packed_short,long")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation, recompilation)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of the first timed step")
    ap.add_argument("--phases", action="store_true", help="time forward, backward and optimizer apart")
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
    for name in args.cases.split(","):
        c = cases[name]
        steps = args.steps if name.startswith("packed") else max(2, args.steps // 3)
        try:
            results.append(run_case(name, steps=steps, warmup=args.warmup, profile=args.profile, phases=args.phases,
                                    **c))
        except torch.OutOfMemoryError as e:
            results.append({"case": name, "error": f"out of memory: {str(e)[:200]}"})
        print(json.dumps(results[-1]), flush=True)
    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}, Qwen2-0.5B shape (494M parameters), bf16 compute / fp32 master weights, FSDP2 on 1 GPU")
    print(f"{'case':<18}{'tokens/step':>12}{'s/step':>9}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}{'waste':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<18}{r['error']}")
            continue
        print(f"{r['case']:<18}{r['micro_batch_tokens']:>12}{r['seconds_per_step']:>9.3f}{r['tokens_per_s']:>11.0f}"
              f"{r['mfu']:>7.1%}{r['peak_memory_gib']:>10.1f}{r['padding_waste']:>7.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainer.json").write_text(json.dumps({"gpu": gpu, "date": time.strftime("%Y-%m-%d"),
                                                  "results": results}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
