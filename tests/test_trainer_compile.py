"""trainer.compile on CUDA: decoder layers compiled whole (k15/trainer/policy.py), around the
FlashAttention or cuDNN attention custom op, give the eager policy's log-probs and gradients, and micro-batches with new
document lengths reuse the compiled graphs instead of compiling new ones."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from k15.config import AlgoConfig, ModelConfig, TrainerConfig
from k15.sync.gloo import free_port
from k15.trainer.packing import Sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlashAttention, Inductor)")


@pytest.fixture
def one_rank():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def worker(compile_layers: bool, attention: str):
    from k15.trainer.worker import TrainerWorker

    model = OmegaConf.structured(ModelConfig(hidden_size=256, num_layers=3, num_heads=8, num_kv_heads=2,
                                             intermediate_size=512, max_position=1024))
    trainer = OmegaConf.structured(TrainerConfig(micro_batch_tokens=1024, mixed_precision=True, compile=compile_layers,
                                                 logprob_impl="fused", attention=attention))
    return TrainerWorker(model, trainer, OmegaConf.structured(AlgoConfig), temperature=1.0, seed=0, device="cuda")


def micro_batches(w, seed: int):
    rng = random.Random(seed)
    samples = []
    for i in range(rng.randrange(3, 9)):
        n = rng.randrange(8, 300)
        samples.append(Sample([rng.randrange(3, 250) for _ in range(n)], [j >= 4 for j in range(n - 1)], i))
    return w._micro_batches(samples)


def logp_and_grads(w, micro):
    w.policy.zero_grad(set_to_none=True)
    logp = w._logprobs(micro)
    (-(logp * torch.linspace(0.5, 1.5, logp.numel(), device=logp.device)).sum()).backward()
    grads = {n: p.grad.full_tensor().float().clone() for n, p in w.model.named_parameters()}
    return logp.detach().float(), grads


@pytest.mark.parametrize("attention", ["flash", pytest.param("cudnn", marks=pytest.mark.skipif(
    importlib.util.find_spec("cudnn") is None, reason="needs cudnn-frontend (pip install nvidia-cudnn-frontend)"))])
def test_compiled_layers_match_eager_and_do_not_recompile_for_new_lengths(one_rank, attention):
    from torch._dynamo.utils import counters

    eager, compiled = worker(False, attention), worker(True, attention)
    for seed in range(4):  # four micro-batches of different document lengths
        for micro in micro_batches(eager, seed):
            want_logp, want = logp_and_grads(eager, micro)
            got_logp, got = logp_and_grads(compiled, micro)
            torch.testing.assert_close(got_logp, want_logp, rtol=0, atol=0.05)
            for name, g in want.items():
                err = ((got[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
                assert err < 3e-2, f"{name}: relative gradient error {err:.2e}"
        if seed == 1:
            graphs = counters["stats"]["unique_graphs"]
    # the first two layouts may compile (the second marks the bounds dynamic); later ones must not
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("attention", ["flash", pytest.param("cudnn", marks=pytest.mark.skipif(
    importlib.util.find_spec("cudnn") is None, reason="needs cudnn-frontend (pip install nvidia-cudnn-frontend)"))])
def test_rl_micro_batch_never_makes_the_host_wait_for_the_gpu(one_rank, attention):
    """Forward, mirror-descent loss, backward and the optimizer step as train_iteration runs them:
    the host must stay ahead of the GPU. One synchronisation per micro-batch leaves the GPU idle
    while the host queues what follows (it cost the step up to 10% once the attention got faster)."""
    w = worker(True, attention)
    micros = micro_batches(w, 0)
    rewards = torch.randint(0, 2, (16,), device="cuda").float()
    with torch.no_grad():
        old = [w._logprobs(m) for m in micros]
    opt = w._optimizer(1e-5)
    for _ in range(2):  # compilation, cuDNN's plans and the optimizer's state are made once, before
        for j, (m, o) in enumerate(zip(micros, old)):
            w._policy_step(m, o, rewards, last=j == len(micros) - 1)
        w._step(opt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [w._policy_step(m, o, rewards, last=j == len(micros) - 1) for j, (m, o) in enumerate(zip(micros, old))]
        norm = w._step(opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum(s.num_tokens for s in stats) == sum(m.num_trained for m in micros) and norm.isfinite()
