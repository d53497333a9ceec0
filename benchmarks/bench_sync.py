"""Weight broadcast benchmark (issue 4): a Qwen2.5-7B-shaped bf16 model from a trainer process on
GPU 0 into the live parameters of a PyTorch rollout engine on GPU 1, over NCCL through CuPy.

One run, both processes in step (an NCCL barrier before and after each timed broadcast):
  raw        one broadcast of all the bytes as one flat buffer (the link's speed; the reference)
  per-tensor one broadcast per tensor, straight from and into the parameters
  k15 <B>    k15.sync.nccl: buckets of B MiB, packing and unpacking overlapped with sending,
             loaded into the engine's live parameters (TorchEngine.receive_weights)
then checks that the engine's weights are bit-identical to the trainer's (torch.equal against the
raw broadcast of the trainer's packed weights, and per-tensor checksums) and that greedy
generation from both ends matches token for token.

    python benchmarks/bench_sync.py --out /tmp/sync        # needs 2 GPUs and CuPy
    python benchmarks/bench_sync.py --layers 4 --reps 3    # a quicker, smaller model
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k15.rollout.engine import GenerationRequest, SamplingParams  # noqa: E402
from k15.rollout.torch_engine import TorchEngine  # noqa: E402
from k15.sync.nccl import NcclWeightSender, new_nccl_group, tensors_checksum  # noqa: E402

MiB = 1 << 20


def qwen25_7b_shaped(layers: int, seed: int, device: str):
    """Qwen2.5-7B's shapes (339 tensors at 28 layers), random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rope_theta=1e6, tie_word_embeddings=False, eos_token_id=151643)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def barrier(end):
    """Both ends leave together: a 4-byte broadcast on the communicator, then wait for it."""
    torch.cuda.synchronize()
    end.broadcast(end.staging(0), 4)
    end.comm_stream.synchronize()


def timed(end, fn, reps: int) -> list[float]:
    fn()  # warm-up: NCCL channels, allocator
    times = []
    for _ in range(reps):
        barrier(end)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        barrier(end)  # the sender's clock stops only when the receiver has everything too
        times.append(time.perf_counter() - start)
    return times


def greedy_tokens(engine, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 150000, (n,), generator=g).tolist() for n in (7, 19, 33, 50)]
    results = engine.generate([GenerationRequest(p) for p in prompts], SamplingParams(temperature=0.0, max_response_tokens=32))
    return [r.tokens for r in results]


def worker(rank: int, args, info, results):
    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
    model = qwen25_7b_shaped(args.layers, seed=100 + rank, device=device)  # the ends start different
    params = dict(model.named_parameters())
    meta = [(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in params.items()]
    total = sum(p.numel() * p.element_size() for p in params.values())
    out = {"rank": rank, "tensors": len(params), "bytes": total}
    engine = TorchEngine(model, eos_token_id=-1, pad_token_id=0, device=device)  # no eos: 32 tokens each
    buckets = [int(b) for b in args.buckets.split(",")]

    # One communicator per end (a unique id makes one); the bucket size can change between broadcasts.
    if rank == 0:
        end = NcclWeightSender(info, buckets[0] * MiB, device)
    else:
        engine.join_weight_group(info, 1, buckets[0] * MiB)
        end = engine._receiver

    # The flat buffer: on the trainer its packed weights, on the engine whatever arrives.
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    if rank == 0:
        offset = 0
        for p in params.values():
            n = p.numel() * p.element_size()
            flat[offset:offset + n].copy_(p.detach().reshape(-1).view(torch.uint8))
            offset += n
    out["raw"] = timed(end, lambda: end.broadcast(flat, total), args.reps)

    def per_tensor():
        for p in params.values():
            end.broadcast(p.data, p.numel() * p.element_size())
        end.comm_stream.synchronize()
    differ_before = None
    if rank == 1:  # before any weights arrive: the two ends differ (so the checks below can fail)
        offset, differ_before = 0, 0
        for p in params.values():
            n = p.numel() * p.element_size()
            differ_before += not torch.equal(flat[offset:offset + n], p.detach().reshape(-1).view(torch.uint8))
            offset += n
        out["tensors_differing_before"] = differ_before
    out["per-tensor"] = timed(end, per_tensor, args.reps)

    # Scramble the engine's weights so that the k15 broadcast has to deliver every byte.
    if rank == 1:
        with torch.no_grad():
            for p in params.values():
                p.zero_()
    for version, b in enumerate(buckets, start=1):
        end.bucket_bytes, end._staging = b * MiB, None
        if rank == 0:
            fn = lambda: end.send(params.items())  # noqa: E731
        else:
            fn = lambda version=version: engine.receive_weights(meta, version)  # noqa: E731
        out[f"k15 {b} MiB"] = timed(end, fn, args.reps)
    if rank == 1:  # every byte of the engine's live weights came through the k15 broadcasts
        offset, mismatched = 0, []
        for name, p in params.items():
            n = p.numel() * p.element_size()
            if not torch.equal(flat[offset:offset + n], p.detach().reshape(-1).view(torch.uint8)):
                mismatched.append(name)
            offset += n
        out["bit_mismatches"] = mismatched
    out["checksums"] = tensors_checksum(params.items())
    out["greedy"] = greedy_tokens(engine, seed=7)
    out["engine_version"] = engine.version
    out["peak_gib"] = torch.cuda.max_memory_allocated(device) / (1 << 30)
    results.put(out)
    end.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--buckets", default="256,64,1024", help="bucket sizes in MiB; the first is the engine's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("needs 2 CUDA GPUs")
    info = new_nccl_group(2)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, info, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    while len(got) < 2:
        try:
            r = results.get(timeout=1.0)
            got[r["rank"]] = r
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):  # its peer would wait on NCCL forever
                for p in procs:
                    p.kill()
                sys.exit("a broadcast process died; see its traceback above")
    for p in procs:
        p.join(timeout=60)
    send, recv = got[0], got[1]

    raw = statistics.median(recv["raw"])
    gb = send["bytes"] / 1e9
    rows = []
    for key in [k for k in recv if k == "raw" or k == "per-tensor" or k.startswith("k15")]:
        t = statistics.median(recv[key])
        rows.append((key, t * 1e3, gb / t, t / raw))
    checks = {
        "tensors": send["tensors"], "gigabytes": round(gb, 3),
        "tensors_differing_before": recv["tensors_differing_before"],
        "bit_identical": not recv["bit_mismatches"] and send["checksums"] == recv["checksums"],
        "bit_mismatches": recv["bit_mismatches"][:5],
        "greedy_match": send["greedy"] == recv["greedy"],
        "greedy_tokens": sum(len(t) for t in recv["greedy"]),
        "engine_version": recv["engine_version"],
        "peak_gib": [round(send["peak_gib"], 2), round(recv["peak_gib"], 2)],
    }
    print(f"\n{send['tensors']} tensors, {gb:.2f} GB, GPU 0 -> GPU 1 ({torch.cuda.get_device_name(0)}), "
          f"median of {args.reps}")
    print(f"{'method':<22}{'ms':>9}{'GB/s':>9}{'x raw':>8}")
    for name, ms, gbs, ratio in rows:
        print(f"{name:<22}{ms:>9.1f}{gbs:>9.0f}{ratio:>8.2f}")
    print(json.dumps(checks))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "sync.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "rows": rows,
             "checks": checks, "all_times": {k: v for k, v in recv.items() if k == "raw" or k == "per-tensor" or k.startswith("k15")}},
            indent=1))
    ok = checks["bit_identical"] and checks["greedy_match"] and checks["tensors_differing_before"] > 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
