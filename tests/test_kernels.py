"""Fused log-prob and mirror-descent kernels (k15.kernels) against their references.

On a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set here, before the
kernels are imported) at tiny sizes; on CUDA the same checks run on the GPU, plus larger ones.
Every check draws fresh random inputs and compares with a float64 oracle by relative Frobenius
error, forward and backward, including ragged vocabularies and ignored positions.

Note: the Triton interpreter truncates fp32->bf16 casts (the GPU rounds to nearest), so bf16
gradients on the CPU path are held to a looser tolerance than on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from k15.algo.loss import mirror_descent_loss  # noqa: E402
from k15.kernels import (  # noqa: E402
    fused_logprobs,
    fused_mirror_descent_loss,
    reference_logprobs,
    reference_mirror_descent_loss,
)

DEV = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# relative-error tolerances against float64 for (logp, entropy, gradients)
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.float16: (1e-4, 1e-4, 2e-3),
    torch.bfloat16: (1e-4, 1e-4, 3e-3 if CUDA else 8e-3),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def oracle(h, w, t, g, temperature, ignore_index=-100):
    """float64 logp, entropy and gradients of sum(g * logp)."""
    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    logits = (hd @ wd.t()) / temperature
    lsm = torch.log_softmax(logits, -1)
    ign = (t < 0) | (t == ignore_index)
    logp = torch.where(ign, 0.0, lsm.gather(1, t.clamp(min=0)[:, None]).squeeze(1))
    ent = torch.where(ign, 0.0, -(lsm.exp() * lsm).sum(-1)).detach()
    (logp * g.double()).sum().backward()
    return logp.detach(), ent, hd.grad, wd.grad


def make_inputs(N, V, H, dtype, scale=3.0, ignore_frac=0.2, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    h = torch.randn(N, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) * scale / H**0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=gen)
    t[torch.rand(N, generator=gen) < ignore_frac] = -100
    g = torch.randn(N, generator=gen)
    return h.to(DEV), w.to(DEV), t.to(DEV), g.to(DEV)


def small_config(chunk_rows, scratch_bytes, dtype=torch.float32, tma=None, ws=True):
    from k15.kernels.logprobs import Config, _default_config

    base = _default_config(DEV, dtype)
    return Config(
        fwd=base.fwd,
        bwd=base.bwd,
        group_m=base.group_m,
        tma=base.tma if tma is None else tma,
        ws=ws,
        fwd_group=base.fwd_group,
        splits=3,
        chunk_rows=chunk_rows,
        scratch_bytes=scratch_bytes,
    )


def check_logprobs(N, V, H, dtype, temperature=1.0, config=None, ignore_frac=0.2, scale=3.0):
    h, w, t, g = make_inputs(N, V, H, dtype, scale=scale, ignore_frac=ignore_frac)
    h.requires_grad_()
    w.requires_grad_()
    logp, ent = fused_logprobs(h, w, t, temperature=temperature, return_entropy=True, impl="triton", config=config)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    (logp * g).sum().backward()
    lp_ref, ent_ref, dh_ref, dw_ref = oracle(h, w, t, g, temperature)
    tl, te, tg = TOL[dtype]
    errs = {
        "logp": rel(logp, lp_ref),
        "entropy": rel(ent, ent_ref),
        "dh": rel(h.grad, dh_ref),
        "dw": rel(w.grad, dw_ref),
    }
    assert errs["logp"] < tl and errs["entropy"] < te, errs
    assert errs["dh"] < tg and errs["dw"] < tg, errs
    ign = (t < 0).nonzero().squeeze(1)
    assert (logp[ign] == 0).all() and (h.grad[ign] == 0).all(), "ignored positions must get 0 and no gradient"
    return errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logprobs_ragged_vocab_ignored(dtype):
    # V = 300 and H = 80 are multiples of neither the vocabulary tile nor the K tile
    check_logprobs(N=70, V=300, H=80, dtype=dtype, temperature=0.7)


@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
def test_logprobs_chunked_backward(ignore_frac):
    # tiny chunks and scratch: several row chunks (dWeight accumulated across them), several
    # vocabulary slices (dHidden accumulated across them), a ragged last slice; with ignored rows
    # the valid rows are gathered chunk by chunk, without them the chunks are views
    elt = 4
    cfg = small_config(chunk_rows=24, scratch_bytes=24 * 64 * elt + 24 * 48 * 4 + 24 * 48 * elt)
    check_logprobs(N=61, V=200, H=48, dtype=torch.float32, temperature=1.3, config=cfg, ignore_frac=ignore_frac)


@pytest.mark.parametrize("ws", [True, False])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.25])
def test_logprobs_tma_path(ignore_frac, ws):
    # the tensor-descriptor kernels (the CUDA default for 16-bit inputs), forced on: on CPU they run
    # under the interpreter with fp16 (its bf16 dot is unreliable); with ignored rows the forward
    # gathers valid rows chunk by chunk. ws: the persistent warp-specialized kernels (several units
    # per program here: the interpreter counts 4 "multiprocessors") or the plain TMA kernels
    dtype = torch.bfloat16 if CUDA else torch.float16
    cfg = small_config(chunk_rows=24, scratch_bytes=24 * 64 * 2 + 24 * 48 * 4 + 24 * 48 * 2, dtype=dtype, tma="force",
                       ws=ws)
    check_logprobs(N=61, V=200, H=48, dtype=dtype, temperature=0.9, config=cfg, ignore_frac=ignore_frac)


def test_balanced_splits():
    from k15.kernels.logprobs import _balanced_splits

    # Qwen2.5-7B head at N = 131072 with 128x256 tiles on 132 SMs: 33 splits of 18 tiles, 256 units each
    assert _balanced_splits(1024, 594, 132) == 33
    for n_blocks, v_tiles, progs in ((1, 3, 4), (7, 100, 132), (64, 594, 132), (300, 1000, 114)):
        sp = _balanced_splits(n_blocks, v_tiles, progs)
        tps = -(-v_tiles // sp)
        assert 1 <= sp <= v_tiles and -(-v_tiles // tps) == sp


def test_logprobs_repeated_targets_no_ignored():
    # every position valid (no row gather) and runs of equal targets (the dWeight target-term kernel)
    h, w, t, g = make_inputs(50, 130, 64, torch.float32, ignore_frac=0.0)
    t = t % 5
    h.requires_grad_()
    w.requires_grad_()
    logp = fused_logprobs(h, w, t, impl="triton")
    (logp * g).sum().backward()
    lp_ref, _, dh_ref, dw_ref = oracle(h, w, t, g, 1.0)
    assert rel(logp, lp_ref) < 1e-5
    assert rel(h.grad, dh_ref) < 1e-5 and rel(w.grad, dw_ref) < 1e-5


def test_forward_only_matches_and_saves_nothing():
    h, w, t, _ = make_inputs(40, 150, 64, torch.float16)
    with torch.no_grad():
        lp0, ent0 = fused_logprobs(h, w, t, return_entropy=True, impl="triton")
    assert not lp0.requires_grad and lp0.grad_fn is None
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp1 = fused_logprobs(h2, w2, t, impl="triton")
    assert lp1.grad_fn is not None
    assert torch.equal(lp0, lp1.detach()), "old log-probs must equal new ones bit for bit (Delta = 0)"
    lp_ref, ent_ref, _, _ = oracle(h, w, t, torch.zeros(len(t), device=DEV), 1.0)
    assert rel(lp0, lp_ref) < 1e-4 and rel(ent0, ent_ref) < 1e-4


@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
def test_valid_rows_from_the_caller_give_the_same_result(ignore_frac):
    """A packed batch hands over its trained rows (made on the host): the kernels must then give
    bit for bit what they find themselves, forward, forward-only and backward."""
    h, w, t, g = make_inputs(48, 130, 32, torch.bfloat16, ignore_frac=ignore_frac)
    rows = (t >= 0).nonzero().squeeze(1)
    results = []
    for valid_rows in (None, rows):
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp = fused_logprobs(h2, w2, t, impl="triton", valid_rows=valid_rows)
        (logp * g).sum().backward()
        with torch.no_grad():
            old = fused_logprobs(h, w, t, impl="triton", valid_rows=valid_rows)
        results.append((logp.detach(), old, h2.grad, w2.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="valid_rows"):
        fused_logprobs(h, w, t, impl="triton", valid_rows=rows[None])


def test_all_ignored():
    h, w, t, g = make_inputs(8, 100, 32, torch.float32, ignore_frac=1.1)
    h.requires_grad_()
    w.requires_grad_()
    logp = fused_logprobs(h, w, t, impl="triton")
    (logp * g).sum().backward()
    assert (logp == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


def test_only_one_input_needs_grad():
    h, w, t, g = make_inputs(30, 120, 32, torch.float32)
    w.requires_grad_()
    (fused_logprobs(h, w, t, impl="triton") * g).sum().backward()
    _, _, _, dw_ref = oracle(h, w, t, g, 1.0)
    assert rel(w.grad, dw_ref) < 1e-5


def test_reference_matches_oracle():
    h, w, t, g = make_inputs(30, 90, 32, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    logp, ent = reference_logprobs(h, w, t, temperature=0.9, return_entropy=True)
    (logp * g).sum().backward()
    lp_ref, ent_ref, dh_ref, dw_ref = oracle(h, w, t, g, 0.9)
    assert rel(logp, lp_ref) < 1e-5 and rel(ent, ent_ref) < 1e-5
    assert rel(h.grad, dh_ref) < 1e-5 and rel(w.grad, dw_ref) < 1e-5


def packed_batch(num_groups, k, V, H, dtype, max_len=9, gen=None):
    """A packed batch: per sequence some prompt tokens (seq_id -1) then its response tokens."""
    seq_ids, S = [], num_groups * k
    for s in range(S):
        seq_ids += [-1] * int(torch.randint(0, 4, (1,), generator=gen))
        seq_ids += [s] * int(torch.randint(1, max_len, (1,), generator=gen))
    seq_ids += [-1] * 3  # padding
    N = len(seq_ids)
    h = torch.randn(N, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) * 3.0 / H**0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=gen)
    rewards = torch.randint(0, 2, (S,), generator=gen).float()
    return h.to(DEV), w.to(DEV), t.to(DEV), torch.tensor(seq_ids).to(DEV), rewards.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mirror_descent_loss(dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    k, tau, temp = 4, 0.3, 0.8
    h, w, t, seq_ids, rewards = packed_batch(3, k, V=257, H=64, dtype=dtype, gen=gen)
    with torch.no_grad():
        old = fused_logprobs(h, w, t, temperature=temp, impl="triton")
    # at the first step of an iteration Delta = 0 exactly; perturb old log-probs to exercise Delta != 0
    old = old + 0.05 * torch.randn(old.shape, generator=gen).to(DEV)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats, aux = fused_mirror_descent_loss(
        hk, wk, t, old, seq_ids, rewards, k, tau, temperature=temp, return_aux=True, impl="triton"
    )
    loss.backward()
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    loss_r, stats_r = reference_mirror_descent_loss(hr, wr, t, old, seq_ids, rewards, k, tau, temperature=temp)
    loss_r.backward()
    tg = TOL[dtype][2]
    assert abs(loss.item() - loss_r.item()) <= 1e-4 * max(1.0, abs(loss_r.item())), (loss.item(), loss_r.item())
    assert stats.num_tokens == stats_r.num_tokens == int((seq_ids >= 0).sum())
    assert abs(stats.mean_log_ratio - stats_r.mean_log_ratio) < 1e-4
    assert rel(hk.grad, hr.grad) < tg and rel(wk.grad, wr.grad) < tg, (rel(hk.grad, hr.grad), rel(wk.grad, wr.grad))
    prompt = (seq_ids < 0).nonzero().squeeze(1)
    assert (hk.grad[prompt] == 0).all() and (aux["logp"][prompt] == 0).all()


def test_fused_loss_first_step_gradient_is_policy_gradient():
    # with old == new (Delta = 0) every token of sequence j gets -(r_j - rbar)/(k * groups)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    k, tau = 2, 0.5
    h, w, t, seq_ids, rewards = packed_batch(2, k, V=130, H=32, dtype=torch.float32, gen=gen)
    with torch.no_grad():
        old = fused_logprobs(h, w, t, impl="triton")
    logp = fused_logprobs(h, w, t, impl="triton").detach().requires_grad_()
    loss, stats = mirror_descent_loss(logp, old, seq_ids, rewards, k, tau)
    loss.backward()
    assert stats.mean_log_ratio == 0.0
    # old_logp=None: the fused loss takes old = new (detached) and gives the same loss and gradient
    hk = h.clone().requires_grad_()
    loss2, stats2 = fused_mirror_descent_loss(hk, w, t, None, seq_ids, rewards, k, tau, impl="triton")
    assert stats2.mean_log_ratio == 0.0 and abs(loss2.item() - loss.item()) < 1e-6
    adv = rewards - rewards.view(-1, k).mean(1, keepdim=True).expand(-1, k).reshape(-1)
    expect = torch.where(seq_ids >= 0, -adv[seq_ids.clamp(min=0)] / rewards.numel(), 0.0)
    assert torch.allclose(logp.grad, expect, atol=1e-6)


def test_strided_and_misaligned_inputs():
    # hidden as a row-strided view of a wider buffer, starting 1 element in (not 16-byte aligned):
    # the TMA path must step aside for the pointer kernels, and results stay exact
    dtype = torch.bfloat16 if CUDA else torch.float16
    _, w, t, g = make_inputs(45, 150, 48, dtype)
    big = torch.randn(45, 48 + 9, device=DEV).to(dtype)
    h = big[:, 1:49].detach().requires_grad_()  # a leaf view: stride 57, offset 1
    w.requires_grad_()
    cfg = small_config(chunk_rows=16, scratch_bytes=16 * 64 * 2 + 16 * 48 * 6, dtype=dtype, tma="force")
    logp = fused_logprobs(h, w, t, impl="triton", config=cfg)
    (logp * g).sum().backward()
    lp_ref, _, dh_ref, dw_ref = oracle(h, w, t, g, 1.0)
    tol = TOL[dtype]
    assert rel(logp, lp_ref) < tol[0] and rel(h.grad, dh_ref) < tol[2] and rel(w.grad, dw_ref) < tol[2]


def test_bad_arguments():
    h, w, t, _ = make_inputs(10, 50, 16, torch.float32, ignore_frac=0.0)
    with pytest.raises(ValueError):
        fused_logprobs(h, w, t, temperature=0.0, impl="triton")
    bad = t.clone()
    bad[3] = 50
    with pytest.raises(ValueError):
        fused_logprobs(h, w, bad, impl="triton")
    with pytest.raises(ValueError):
        fused_logprobs(h, w.double(), t, impl="triton")


def test_reference_impl_dispatch():
    h, w, t, g = make_inputs(20, 70, 16, torch.float32)
    a = fused_logprobs(h, w, t, impl="reference")
    b = reference_logprobs(h, w, t)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        fused_logprobs(h, w, t, impl="nope")


def test_import_is_lazy():
    code = "import sys, k15.kernels; assert 'triton' not in sys.modules, 'k15.kernels imported triton'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ------------------------------------------------------------------------------------------------
# CUDA only: bf16 at sizes where the tiles are full-sized, and a chunked 2-D backward
# ------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_logprobs_medium(dtype):
    check_logprobs(N=1500, V=5003, H=384, dtype=dtype, temperature=0.9, scale=4.0)


@needs_cuda
@pytest.mark.parametrize("tma,ws", [(False, False), (True, False), (True, True)])
def test_cuda_logprobs_chunked_2d_backward(tma, ws):
    # pointer, plain TMA and warp-specialized kernels; 4 row chunks, several vocabulary slices and a
    # ragged last one
    cfg = small_config(512, 512 * 1024 * 2 + 512 * 256 * 4, dtype=torch.bfloat16, tma=tma, ws=ws)
    check_logprobs(N=2000, V=7001, H=256, dtype=torch.bfloat16, config=cfg, scale=6.0)


@needs_cuda
def test_cuda_fused_loss_memory_bounded():
    # 16k tokens x 32k vocab: the logits alone would be 1 GiB in bf16; the fused path must stay far below
    gen = torch.Generator().manual_seed(0)
    N, V, H, k = 16384, 32768, 512, 4
    h = torch.randn(N, H, generator=gen).bfloat16().cuda().requires_grad_()
    w = (torch.randn(V, H, generator=gen) * 4 / H**0.5).bfloat16().cuda().requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).cuda()
    seq_ids = (torch.arange(N) // 512).cuda()
    rewards = torch.randint(0, 2, (N // 512,), generator=gen).float().cuda()
    old = torch.zeros(N, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = fused_mirror_descent_loss(h, w, t, old, seq_ids, rewards, k, 1.0)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (N + V) * H * 2
    assert extra < grads + (600 << 20), f"peak {extra / 2**20:.0f} MiB above inputs"
