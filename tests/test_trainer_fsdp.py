"""The trainer's FSDP2 ranks (k15/trainer/worker.py) in real processes: gloo on CPU, and NCCL with
bf16 mixed precision on 2 GPUs where there are 2. The same batch on 1 and 2 ranks gives the same
loss and gradients; splitting a minibatch into more micro-batches does not change its gradient; a
checkpoint saved by 2 ranks resumes on 1 with the same weights."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_lib
import random
import traceback

import pyarrow as pa
import pytest
import torch
from omegaconf import OmegaConf

from k15.config import AlgoConfig, ModelConfig, TrainerConfig
from k15.sync.gloo import free_port

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not TWO_GPUS, reason="needs 2 CUDA GPUs"))]


def batch_table(seed: int = 0, groups: int = 3, k: int = 4) -> pa.Table:
    """Groups of k samples of random lengths: prompt and response tokens, policy versions, rewards."""
    rng = random.Random(seed)
    rows = {"prompt_tokens": [], "response_tokens": [], "versions": [], "reward": []}
    for _ in range(groups):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 9))]
        for _ in range(k):
            n = rng.randrange(5, 40)
            rows["prompt_tokens"].append(prompt)
            rows["response_tokens"].append([rng.randrange(3, 250) for _ in range(n)])
            rows["versions"].append([0] * n)
            rows["reward"].append(float(rng.random() < 0.5))
    return pa.table(rows)


def make_worker(device: str, micro_batch_tokens: int, unsharded_grad_accumulation: bool = False):
    from k15.trainer.worker import TrainerWorker

    if device.startswith("cuda"):  # Qwen2-0.5B's shape, bf16 compute over fp32 master weights
        model = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(conf_dir() / "model/qwen2_0p5b.yaml"))
    else:
        model = OmegaConf.structured(ModelConfig)  # the small default
    trainer = OmegaConf.structured(TrainerConfig(micro_batch_tokens=micro_batch_tokens, minibatches_per_iter=1,
                                                 lr=1e-3, mixed_precision=device.startswith("cuda"),
                                                 unsharded_grad_accumulation=unsharded_grad_accumulation,
                                                 logprob_impl="fused" if device.startswith("cuda") else "torch"))
    algo = OmegaConf.structured(AlgoConfig(samples_per_prompt=4))
    return TrainerWorker(model, trainer, algo, temperature=1.0, seed=0, device=device)


def conf_dir():
    """The installed configs (conf/ installs as k15.conf)."""
    from pathlib import Path

    import k15.conf

    return Path(k15.conf.__file__).parent


def full_tensors(named) -> dict[str, torch.Tensor]:
    """Copies (a one-rank full_tensor() is the live tensor itself); every rank must call this
    (gathering a shard is a collective)."""
    out = {}
    for name, t in named:
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = t.detach().float().cpu().clone()
    return out


def job_gradients(rank, world, device, micro_batch_tokens, out_dir):
    return one_step_gradients(make_worker(device, micro_batch_tokens))


def job_gradients_unsharded(rank, world, device, micro_batch_tokens, out_dir):
    """With trainer.unsharded_grad_accumulation: reduced once, after the last micro-batch."""
    return one_step_gradients(make_worker(device, micro_batch_tokens, unsharded_grad_accumulation=True))


def one_step_gradients(worker):
    """One RL step on the shared batch; the loss and the gradient just before the optimizer step."""
    captured = {}
    step = worker._step

    def capture_then_step(opt):
        captured.update(full_tensors((n, p.grad) for n, p in worker.model.named_parameters()))
        return step(opt)

    worker._step = capture_then_step
    metrics = worker.train_iteration(batch_table())
    return {"loss": metrics["loss"], "trained_tokens": metrics["trained_tokens"], "grads": captured}


def job_save(rank, world, device, micro_batch_tokens, out_dir):
    worker = make_worker(device, micro_batch_tokens)
    worker.train_iteration(batch_table())
    worker.save_state(str(out_dir / "ckpt"))
    return {"weights": full_tensors(worker.model.named_parameters()), "version": worker.version}


def job_load(rank, world, device, micro_batch_tokens, out_dir):
    worker = make_worker(device, micro_batch_tokens)
    version = worker.load_state(str(out_dir / "ckpt"))
    return {"weights": full_tensors(worker.model.named_parameters()), "version": version}


def job_bad_token(rank, world, device, micro_batch_tokens, out_dir):
    """A response token outside the vocabulary (untrusted rollout data): the error names the sample."""
    worker = make_worker(device, micro_batch_tokens)
    table = batch_table()
    responses = table.column("response_tokens").to_pylist()
    responses[5][-1] = 10**6
    table = table.set_column(table.schema.get_field_index("response_tokens"), "response_tokens", pa.array(responses))
    try:
        worker.train_iteration(table)
    except ValueError as e:
        return {"error": str(e), "version": worker.version}
    return {"error": None, "version": worker.version}


JOBS = {"gradients": job_gradients, "gradients_unsharded": job_gradients_unsharded, "save": job_save,
        "load": job_load, "bad_token": job_bad_token}


def _rank_main(rank, world, port, device, job, micro_batch_tokens, out_dir, results):
    import io

    import torch.distributed as dist

    try:
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        result = JOBS[job](rank, world, f"cuda:{rank}" if device == "cuda" else "cpu", micro_batch_tokens, out_dir)
        buf = io.BytesIO()
        torch.save(result, buf)
        results.put((rank, True, buf.getvalue() if rank == 0 else b""))
        dist.destroy_process_group()
    except Exception:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(world: int, device: str, job: str, out_dir, micro_batch_tokens: int = 4096, timeout_s: float = 600):
    """Rank 0's result of `job` run by `world` processes; fails at once if a rank raises or dies."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, device, job, micro_batch_tokens, out_dir, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        import time

        deadline = time.monotonic() + timeout_s
        while len(got) < world:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue_lib.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"rank process died with exit code {dead[0].exitcode}"
                assert time.monotonic() < deadline, f"{job} did not finish in {timeout_s}s"
                continue
            assert ok, f"rank {rank} failed:\n{payload}"
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    import io

    return torch.load(io.BytesIO(got[0]), weights_only=False)


def assert_close_relative(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).norm() / b[name].norm().clamp(min=1e-12)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol}"


@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_give_the_loss_and_gradients_of_one(device, tmp_path):
    one = run_ranks(1, device, "gradients", tmp_path, micro_batch_tokens=128)
    two = run_ranks(2, device, "gradients", tmp_path, micro_batch_tokens=128)
    assert one["trained_tokens"] == two["trained_tokens"] > 0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5 if device == "cpu" else 1e-3)
    assert any(g.abs().sum() > 0 for g in one["grads"].values())
    assert_close_relative(two["grads"], one["grads"], rtol=1e-5 if device == "cpu" else 2e-3)


def test_more_micro_batches_give_the_same_gradient(tmp_path):
    """Micro-batches of 64 tokens (several per minibatch) accumulate to the gradient of one 4096-token micro-batch."""
    many = run_ranks(1, "cpu", "gradients", tmp_path, micro_batch_tokens=64)
    one = run_ranks(1, "cpu", "gradients", tmp_path, micro_batch_tokens=4096)
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert_close_relative(many["grads"], one["grads"], rtol=1e-5)


def test_unsharded_accumulation_gives_the_same_gradient(tmp_path):
    """trainer.unsharded_grad_accumulation: 2 ranks of 64-token micro-batches, reduced once per step,
    give the gradient of one rank with one 4096-token micro-batch."""
    many = run_ranks(2, "cpu", "gradients_unsharded", tmp_path, micro_batch_tokens=64)
    one = run_ranks(1, "cpu", "gradients", tmp_path, micro_batch_tokens=4096)
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert_close_relative(many["grads"], one["grads"], rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_saved_on_two_ranks_resumes_on_one(device, tmp_path):
    saved = run_ranks(2, device, "save", tmp_path)
    assert (tmp_path / "ckpt" / "shards" / ".metadata").is_file()
    assert (tmp_path / "ckpt" / "model" / "config.json").is_file()
    loaded = run_ranks(1, device, "load", tmp_path)
    assert loaded["version"] == saved["version"] == 1
    assert loaded["weights"].keys() == saved["weights"].keys()
    for name, t in saved["weights"].items():
        assert torch.equal(loaded["weights"][name], t), name


def test_a_token_outside_the_vocabulary_is_named_before_any_step(tmp_path):
    result = run_ranks(1, "cpu", "bad_token", tmp_path)
    assert result["error"] is not None and "sample 5" in result["error"] and "1000000" in result["error"]
    assert result["version"] == 0
