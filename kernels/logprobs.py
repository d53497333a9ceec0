"""Fused log-probs of sampled tokens from the last hidden states and the LM head, in Triton.

    logp[i] = log softmax(hidden @ weight.T / temperature)[i, targets[i]]

without ever holding the [N, V] logits. The pure-PyTorch specification is kernels/logprobs_ref.py.

Forward (`_fwd_ws_kernel` on Hopper for 16-bit inputs; `_fwd_tma_kernel` with TMA but without warp
specialization; `_fwd_kernel` with pointer loads otherwise): the work is (block of BLOCK_M rows, split
of the vocabulary) units. A unit streams its split's vocabulary tiles, computes each [BLOCK_M, BLOCK_N]
logits tile with tl.dot (fp32 accumulation) and folds it into an online log-sum-exp (base 2) and,
optionally, sum p*z for the entropy; `_target_logit_kernel` gets the target logit as a dot product.
Per-split partials ([splits, N] floats) are combined on the host. `_fwd_ws_kernel` is persistent (one
program per SM walks its units as one loop of tiles, in an L2-friendly grouped order, with the split
count chosen so that every program gets the same number of tiles) and warp-specialized (Triton's
`tl.range(..., warp_specialize=True)`: TMA loads in producer warps, so loads run during the epilogue
and across unit switches). Cost: one GEMM of hidden @ weight.T (measured at 1.0x cuBLAS on an H100)
and no memory beyond a few floats per row. Ignored positions (negative target / ignore_index) are
skipped: rows are gathered through an index (pointer kernel) or copied chunk by chunk into a small
buffer (TMA kernels).

Defaults (H100, bf16, measured with benchmarks/bench_kernels.py and the experiments in
benchmarks/RESULTS.md): forward and backward tiles 128x256x64, 8 warps, 3 stages, warp-specialized;
forward unit groups of 12 row blocks, vocabulary splits from `_balanced_splits` (33 at N = 131072);
backward GROUP_M 8, blocks of 16896 rows x 8448 columns (504 MiB scratch). K15_KERNELS_WS=0 runs the
plain TMA kernels with their own best tiles (`_PLAIN_TMA`); if Triton cannot build the warp-specialized
kernels (see `_ws_failed`) the plain ones run with the configured tiles. fp32 inputs use smaller tiles
and 3xTF32 dots (fp32-accurate). Environment overrides for tuning: see `_env_overrides`; K15_KERNELS_PROFILE=1 prints
backward phases.

Backward, exact (no gradient filtering). With c_i = dL/dlogp_i / T, the logits gradient is
G = c * (onehot(t) - softmax). It is split as G = G' + c*(1-p_t)*onehot(t), where G' is G with the
target entry zeroed. For a chunk of rows and a slice of the vocabulary at a time,
`_grad_logits_ws_kernel` (persistent, warp-specialized, TMA store; or `_grad_logits_(tma_)kernel`)
recomputes the logits tile by tile and writes G' (input dtype) to a bounded scratch block; cuBLAS then
does dHidden_chunk += G' @ W_slice (accumulated in fp32 across the vocabulary slices) and
dWeight_slice += G'^T @ hidden_chunk. The target term, which carries most of the gradient's
magnitude, is added in fp32 at the end (`_finalize_dh_kernel`, `_dw_target_kernel`), so it is never
rounded to bf16 before the final store. Total cost: the recompute GEMM plus the two gradient GEMMs,
with scratch of about `scratch_bytes` (default 504 MiB).
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
import triton
import triton.language as tl

from .logprobs_ref import IGNORE_INDEX, ignored_mask

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


# Integer arguments that follow the batch's row count. Triton would compile a new variant of a kernel
# each time one of them changes between "divisible by 16" and not (a stall of seconds in the middle
# of training); they only bound masks and loops, so nothing is lost by not specializing on them.
_ROW_COUNTS = ["n", "part_stride", "n_blocks", "tiles_per_split", "num_splits", "num_progs", "row0"]


def _jit_row_counts(fn):
    """triton.jit, not specializing on the row-count arguments that `fn` has."""
    params = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[a for a in _ROW_COUNTS if a in params])


@triton.jit
def _lse_tile_update(acc, m_i, s_i, e_i, vt, V, scale2, ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold one [BLOCK_M, BLOCK_N] tile of raw logits into the running (max, sum 2^.., sum p*z)."""
    if (vt + 1) * BLOCK_N > V:  # ragged last tile: columns past V drop out
        acc = tl.where(((vt * BLOCK_N + tl.arange(0, BLOCK_N)) < V)[None, :], acc, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(acc, 1))
    alpha = tl.exp2((m_i - m_new) * scale2)
    p = tl.exp2(acc * scale2 - (m_new * scale2)[:, None])
    s_i = s_i * alpha + tl.sum(p, 1)
    if ENTROPY:
        e_i = e_i * alpha + tl.sum(p * acc, 1)
    return m_new, s_i, e_i


@_jit_row_counts
def _fwd_kernel(
    h_ptr,
    w_ptr,
    rows_ptr,
    m_ptr,
    s_ptr,
    e_ptr,
    n,
    V,
    K,
    stride_hn,
    stride_wv,
    scale2,
    tiles_per_split,
    num_splits,
    HAS_ROWS: tl.constexpr,
    ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per (row block, vocabulary split): online max / sum of 2^(z*scale2) / sum of p*z over the
    split's vocabulary tiles (pointer loads; rows may be gathered through rows_ptr)."""
    pid = tl.program_id(0)
    pid_m = pid // num_splits
    split = pid - pid_m * num_splits

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    idx = tl.minimum(offs_m, n - 1)  # clamp instead of masking: no masks in the inner loop
    if HAS_ROWS:
        rows = tl.load(rows_ptr + idx).to(tl.int64)
    else:
        rows = idx.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hn + offs_k[None, :]

    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # running max of the raw logits (acc units)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    e_i = tl.zeros((BLOCK_M,), tl.float32)
    num_v_tiles = tl.cdiv(V, BLOCK_N)
    vt0 = split * tiles_per_split
    vt1 = tl.minimum(vt0 + tiles_per_split, num_v_tiles)
    for vt in range(vt0, vt1):
        n_idx = tl.minimum(vt * BLOCK_N + tl.arange(0, BLOCK_N), V - 1).to(tl.int64)
        b_ptrs = w_ptr + n_idx[None, :] * stride_wv + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs + k)
                b = tl.load(b_ptrs + k)
            else:
                kmask = (offs_k + k) < K
                a = tl.load(a_ptrs + k, mask=kmask[None, :], other=0.0)
                b = tl.load(b_ptrs + k, mask=kmask[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        m_i, s_i, e_i = _lse_tile_update(acc, m_i, s_i, e_i, vt, V, scale2, ENTROPY, BLOCK_N)

    out = split * n + offs_m
    tl.store(m_ptr + out, m_i * scale2, mask=m_mask)
    tl.store(s_ptr + out, s_i, mask=m_mask)
    if ENTROPY:
        tl.store(e_ptr + out, e_i * scale2, mask=m_mask)


@_jit_row_counts
def _fwd_tma_kernel(
    h_desc,
    w_desc,
    m_ptr,
    s_ptr,
    e_ptr,
    n,
    part_stride,
    V,
    K,
    scale2,
    tiles_per_split,
    num_splits,
    ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """_fwd_kernel with TMA (tensor-descriptor) loads of contiguous rows (CUDA, Hopper)."""
    pid = tl.program_id(0)
    pid_m = pid // num_splits
    split = pid - pid_m * num_splits
    off_m = pid_m * BLOCK_M
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    e_i = tl.zeros((BLOCK_M,), tl.float32)
    num_v_tiles = tl.cdiv(V, BLOCK_N)
    vt0 = split * tiles_per_split
    vt1 = tl.minimum(vt0 + tiles_per_split, num_v_tiles)
    for vt in range(vt0, vt1):
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, K, BLOCK_K):
            a = h_desc.load([off_m, k])
            b = w_desc.load([vt * BLOCK_N, k])
            acc = tl.dot(a, b.T, acc)
        m_i, s_i, e_i = _lse_tile_update(acc, m_i, s_i, e_i, vt, V, scale2, ENTROPY, BLOCK_N)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    out = split * part_stride + offs_m
    tl.store(m_ptr + out, m_i * scale2, mask=m_mask)
    tl.store(s_ptr + out, s_i, mask=m_mask)
    if ENTROPY:
        tl.store(e_ptr + out, e_i * scale2, mask=m_mask)


@triton.jit
def _unit_coords(unit, num_splits, n_blocks, GROUP: tl.constexpr):
    """(row block, split) of work unit `unit`: units come in groups of GROUP row blocks x all splits,
    row-fastest inside a group, so the programs running at one time share a few row blocks and a few
    vocabulary slices and both operands stay in L2."""
    per_group = GROUP * num_splits
    g = unit // per_group
    first_m = g * GROUP
    gsize = tl.minimum(n_blocks - first_m, GROUP)
    r = unit - g * per_group
    return first_m + r % gsize, r // gsize


@_jit_row_counts
def _fwd_ws_kernel(
    h_desc,
    w_desc,
    m_ptr,
    s_ptr,
    e_ptr,
    n,
    part_stride,
    V,
    K,
    scale2,
    tiles_per_split,
    num_splits,
    n_blocks,
    num_progs,
    ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    WS: tl.constexpr,
):
    """Persistent, warp-specialized _fwd_tma_kernel (Hopper). One program per SM walks the
    (row block, split) units pid, pid + num_progs, ... as one loop over vocabulary tiles. With
    warp_specialize Triton gives the TMA loads their own producer warps, so the loads of the next
    tile run during the log-sum-exp epilogue and across unit switches; the split count is chosen on
    the host so that every program gets the same number of tiles (no partial last wave). Measured
    on an H100 at N = 131072: 1.00-1.04x one cuBLAS GEMM, against 1.12-1.35x for _fwd_tma_kernel. (On
    Hopper, 256x128 tiles with warp specialization ran at 1.23x, and flattening the loop instead,
    tl.range(flatten=True), does not compile for this loop in Triton 3.6.)"""
    pid = tl.program_id(0)
    my_units = tl.cdiv(n_blocks * num_splits - pid, num_progs)
    k_tiles = tl.cdiv(K, BLOCK_K)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    e_i = tl.zeros((BLOCK_M,), tl.float32)
    for it in tl.range(0, my_units * tiles_per_split, warp_specialize=WS):
        ui = it // tiles_per_split
        j = it - ui * tiles_per_split  # tile within the unit
        pid_m, split = _unit_coords(pid + ui * num_progs, num_splits, n_blocks, GROUP)
        vt = split * tiles_per_split + j
        off_m = pid_m * BLOCK_M
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, k_tiles):
            a = h_desc.load([off_m, k * BLOCK_K])
            b = w_desc.load([vt * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        first = j == 0  # a new unit: restart the running statistics
        m_i = tl.where(first, -1.0e30, m_i)
        s_i = tl.where(first, 0.0, s_i)
        e_i = tl.where(first, 0.0, e_i)
        # tiles past V (the last split may be short) are masked out entirely by the ragged-tile mask
        m_i, s_i, e_i = _lse_tile_update(acc, m_i, s_i, e_i, vt, V, scale2, ENTROPY, BLOCK_N)
        if j == tiles_per_split - 1:
            offs_m = off_m + tl.arange(0, BLOCK_M)
            out = split * part_stride + offs_m
            tl.store(m_ptr + out, m_i * scale2, mask=offs_m < n)
            tl.store(s_ptr + out, s_i, mask=offs_m < n)
            if ENTROPY:
                tl.store(e_ptr + out, e_i * scale2, mask=offs_m < n)


@_jit_row_counts
def _target_logit_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    rows_ptr,
    out_ptr,
    n,
    K,
    stride_hn,
    stride_wv,
    scale2,
    HAS_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[i] = scale2 * <h[row_i], w[t_i]> in fp32 (the target logit, base-2 units)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    idx = tl.minimum(offs_m, n - 1)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + idx).to(tl.int64)
    else:
        rows = idx.to(tl.int64)
    t = tl.load(tgt_ptr + idx).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for k in range(0, K, BLOCK_K):
        kmask = (offs_k + k) < K
        a = tl.load(h_ptr + rows[:, None] * stride_hn + (k + offs_k)[None, :], mask=kmask[None, :], other=0.0)
        b = tl.load(w_ptr + t[:, None] * stride_wv + (k + offs_k)[None, :], mask=kmask[None, :], other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    tl.store(out_ptr + offs_m, tl.sum(acc, 1) * scale2, mask=m_mask)


@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of `tile` in grouped order: GROUP_M row blocks walk the columns
    together, so the weight tiles they share stay in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _grad_rows(offs_m, n, tgt_ptr, lse2_ptr, c_ptr):
    """The per-row inputs of the G' epilogue: (target column, lse2, c) of rows offs_m."""
    rows = tl.minimum(offs_m, n - 1)
    return tl.load(tgt_ptr + rows), tl.load(lse2_ptr + rows), tl.load(c_ptr + rows)


@triton.jit
def _grad_tile(acc, offs_n, tgt, lse2, c, scale2):
    """G' = -c * softmax of a tile of logits `acc` (fp32), 0 at each row's target."""
    g = -c[:, None] * tl.exp2(acc * scale2 - lse2[:, None])
    return tl.where(offs_n[None, :] == tgt[:, None], 0.0, g)


@_jit_row_counts
def _grad_logits_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    lse2_ptr,
    c_ptr,
    g_ptr,
    n,
    Vs,
    K,
    stride_hn,
    stride_wv,
    stride_gn,
    scale2,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """G'[i, j] = -c_i * softmax_ij for the chunk's rows and the slice's columns, 0 at the target."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(n, BLOCK_M), tl.cdiv(Vs, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, n - 1).to(tl.int64)
    cols = tl.minimum(offs_n, Vs - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hn + offs_k[None, :]
    b_ptrs = w_ptr + cols[None, :] * stride_wv + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k)
            b = tl.load(b_ptrs + k)
        else:
            kmask = (offs_k + k) < K
            a = tl.load(a_ptrs + k, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs + k, mask=kmask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    tgt, lse2, c = _grad_rows(offs_m, n, tgt_ptr, lse2_ptr, c_ptr)
    g = _grad_tile(acc, offs_n, tgt, lse2, c, scale2)
    mask = (offs_m < n)[:, None] & (offs_n < Vs)[None, :]
    g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gn + offs_n[None, :]
    tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=mask)


@_jit_row_counts
def _grad_logits_tma_kernel(
    h_desc,
    w_desc,
    tgt_ptr,
    lse2_ptr,
    c_ptr,
    g_ptr,
    n,
    Vs,
    K,
    stride_gn,
    scale2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """_grad_logits_kernel with TMA loads (CUDA, Hopper)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(n, BLOCK_M), tl.cdiv(Vs, BLOCK_N), GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        a = h_desc.load([pid_m * BLOCK_M, k])
        b = w_desc.load([pid_n * BLOCK_N, k])
        acc = tl.dot(a, b.T, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt, lse2, c = _grad_rows(offs_m, n, tgt_ptr, lse2_ptr, c_ptr)
    g = _grad_tile(acc, offs_n, tgt, lse2, c, scale2)
    mask = (offs_m < n)[:, None] & (offs_n < Vs)[None, :]
    g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gn + offs_n[None, :]
    tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=mask)


@_jit_row_counts
def _grad_logits_ws_kernel(
    h_desc,
    w_desc,
    g_desc,
    tgt_ptr,
    lse2_ptr,
    c_ptr,
    n,
    Vs,
    K,
    scale2,
    num_progs,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WS: tl.constexpr,
):
    """Persistent, warp-specialized _grad_logits_tma_kernel (Hopper): one program per SM loops over
    the tiles (grouped order), TMA loads in their own warps, G' written with a TMA store (async, and
    no per-element bounds masks). Measured on an H100: 0.94-1.06x the cuBLAS GEMM of the same block
    (1.10-1.15x in place in the backward), against 0.95-1.10x for _grad_logits_tma_kernel: a small
    gain, unlike the forward's."""
    num_pid_m = tl.cdiv(n, BLOCK_M)
    num_pid_n = tl.cdiv(Vs, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_progs, warp_specialize=WS):
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # the row inputs are loaded before the K loop, so their latency hides behind the matrix products
        tgt, lse2, c = _grad_rows(offs_m, n, tgt_ptr, lse2_ptr, c_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, k_tiles):
            a = h_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        g = _grad_tile(acc, offs_n, tgt, lse2, c, scale2)
        g_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], g.to(OUT_DTYPE))  # clipped at the edges


@_jit_row_counts
def _finalize_dh_kernel(
    acc_ptr,
    w_ptr,
    tgt_ptr,
    coef_ptr,
    rows_ptr,
    dh_ptr,
    row0,
    K,
    stride_acc,
    stride_wv,
    stride_dh,
    HAS_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dh[row] = acc[i] + coef_i * w[t_i], rounded once to dh's dtype (row = rows[i] or row0 + i)."""
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    t = tl.load(tgt_ptr + i).to(tl.int64)
    coef = tl.load(coef_ptr + i)
    a = tl.load(acc_ptr + i.to(tl.int64) * stride_acc + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + t * stride_wv + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = row0 + i.to(tl.int64)
    tl.store(dh_ptr + row * stride_dh + offs, (a + coef * w).to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_target_kernel(
    dw_ptr,
    h_ptr,
    perm_ptr,
    coef_ptr,
    run_end_ptr,
    tgt_sorted_ptr,
    K,
    stride_dw,
    stride_hn,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dw[v] += sum over tokens i with target v of coef_i * h[i], summed in fp32, rounded once.

    Tokens come sorted by target; one program per (sorted position, block of columns). The program
    at the first position of a run of equal targets sums the run, [r, run_end[r]); the others have
    run_end[r] == r and write nothing. (The grid is sized from the token count, so the host needs
    no count of distinct targets: no synchronisation.)
    """
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < K
    start = r
    end = tl.load(run_end_ptr + r)
    v = tl.load(tgt_sorted_ptr + r).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    for j0 in range(start, end, BLOCK_R):
        offs_r = j0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < end
        tok = tl.load(perm_ptr + offs_r, mask=rmask, other=0).to(tl.int64)
        coef = tl.load(coef_ptr + offs_r, mask=rmask, other=0.0)
        h = tl.load(h_ptr + tok[:, None] * stride_hn + offs[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += coef[:, None] * h.to(tl.float32)
    total = tl.sum(acc, 0)
    smask = offs < tl.where(end > start, K, 0)  # only a run's first position writes
    cur = tl.load(dw_ptr + v * stride_dw + offs, mask=smask, other=0.0).to(tl.float32)
    tl.store(dw_ptr + v * stride_dw + offs, (cur + total).to(dw_ptr.dtype.element_ty), mask=smask)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------


class Config:
    """Tile shapes and chunking. The defaults are chosen per device and dtype in `_default_config`."""

    def __init__(
        self,
        fwd=(128, 256, 64, 8, 3),  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        bwd=(128, 256, 64, 8, 3),
        group_m=8,  # grouped tile order of the backward's grad-logits kernel
        tma=True,  # TMA (tensor-descriptor) loads where possible (CUDA, 16-bit, K % 8 == 0)
        ws=True,  # with TMA: the persistent warp-specialized kernels (_fwd_ws_kernel, _grad_logits_ws_kernel)
        fwd_group=12,  # row blocks per group of the forward's persistent unit order
        splits=None,  # vocabulary splits of the forward; None: chosen from the grid size
        # backward blocks of 16896 rows x 8448 vocabulary columns (fp32 dHidden accumulator 242 MB +
        # G' 285 MB): on 132 SMs each launch is a whole number of waves (grad-logits 4356 tiles = 33,
        # dHidden 1848 = 14, dWeight 924 = 7 of 128x256) and 8448 divides V = 152064; measured 1.3%
        # faster at N = 131072 than 16384 x 9216 blocks
        chunk_rows=16896,  # rows per backward chunk
        scratch_bytes=504 << 20,  # budget for G' blocks and the fp32 dHidden chunk accumulator
    ):
        self.fwd = fwd
        self.bwd = bwd
        self.group_m = group_m
        self.tma = tma
        self.ws = ws
        self.fwd_group = fwd_group
        self.splits = splits
        self.chunk_rows = chunk_rows
        self.scratch_bytes = scratch_bytes

    def __repr__(self):
        return f"Config({self.__dict__})"


_INTERP_CONFIG = dict(fwd=(32, 64, 32, 4, 1), bwd=(32, 64, 32, 4, 1), group_m=4, fwd_group=2, tma=False)
# fp32 operands take twice the shared memory per tile: smaller tiles
_FP32_CONFIG = dict(fwd=(128, 128, 32, 8, 3), bwd=(128, 128, 32, 8, 3), group_m=8, tma=False)
# without warp specialization (K15_KERNELS_WS=0, or Triton could not build the WS kernels) the plain
# TMA kernels are fastest with these (H100, measured 2026-11-22)
_PLAIN_TMA = dict(fwd=(256, 128, 64, 8, 3), bwd=(128, 256, 64, 8, 3), group_m=16)


def _env_overrides() -> dict:
    """K15_KERNELS_{FWD,BWD}="BM,BN,BK,warps,stages", K15_KERNELS_{SPLITS,GROUP_M,FWD_GROUP,CHUNK_ROWS,
    SCRATCH_MB,WS}: override the CUDA defaults (for tuning runs)."""
    out = {}
    if os.environ.get("K15_KERNELS_WS", "1") == "0":
        out.update(_PLAIN_TMA, ws=False)
    for key in ("fwd", "bwd"):
        v = os.environ.get(f"K15_KERNELS_{key.upper()}")
        if v:
            out[key] = tuple(int(x) for x in v.split(","))
    for key, env in (("splits", "SPLITS"), ("group_m", "GROUP_M"), ("fwd_group", "FWD_GROUP"),
                     ("chunk_rows", "CHUNK_ROWS")):
        v = os.environ.get(f"K15_KERNELS_{env}")
        if v:
            out[key] = int(v)
    v = os.environ.get("K15_KERNELS_SCRATCH_MB")
    if v:
        out["scratch_bytes"] = int(v) << 20
    return out


def _default_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Config:
    if _interpret() or device.type != "cuda":
        return Config(**_INTERP_CONFIG)
    if dtype == torch.float32:
        return Config(**_FP32_CONFIG)
    return Config(**_env_overrides())


def _tma_aligned(*xs: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned base addresses and row strides."""
    return all(x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0 for x in xs)


def _use_tma(cfg: Config, x: torch.Tensor, w: torch.Tensor) -> bool:
    ok = x.dtype in (torch.bfloat16, torch.float16) and x.shape[1] % 8 == 0 and _tma_aligned(x, w)
    if cfg.tma == "force":  # tests: the TMA kernels also run under the interpreter (fp16 there)
        return ok
    return (
        ok
        and bool(cfg.tma)
        and x.is_cuda
        and not _interpret()
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


_WS_FAILED = False  # set when Triton could not build a warp-specialized kernel: plain TMA kernels from then on


def _use_ws(cfg: Config) -> bool:
    return bool(cfg.ws) and not _WS_FAILED


def _ws_failed(err: Exception) -> None:
    """Fall back to the plain TMA kernels if the warp-specialized one could not be built; anything
    else (and every error under the interpreter, which ignores warp specialization) is re-raised."""
    global _WS_FAILED
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    build_error = isinstance(err, (CompilationError, OutOfResources)) or (
        isinstance(err, RuntimeError) and "CUDA" not in str(err) and "out of memory" not in str(err)
    )
    if _interpret() or not build_error:
        raise err
    _WS_FAILED = True
    warnings.warn(f"k15.kernels: warp-specialized kernels unavailable ({type(err).__name__}: {str(err)[:200]}); "
                  "using the plain TMA kernels")


def _balanced_splits(n_blocks: int, v_tiles: int, progs: int, lo: int = 4, hi: int = 64) -> int:
    """Vocabulary splits for the persistent forward: the fewest splits (>= lo) that minimise the
    tiles of the busiest program, so that all `progs` programs finish together (at N = 131072 with
    128x256 tiles: 33 splits of 18 tiles, exactly 256 units per program)."""
    best = None
    for sp in range(lo, max(lo, min(hi, v_tiles)) + 1):
        tps = triton.cdiv(v_tiles, sp)
        sp_eff = triton.cdiv(v_tiles, tps)
        key = (triton.cdiv(n_blocks * sp_eff, progs) * tps, sp_eff)
        if best is None or key < best:
            best = key
    return best[1]


def _desc(x: torch.Tensor, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(x, list(block))


class _Prof:
    """Phase timing with CUDA events, on when K15_KERNELS_PROFILE=1 (prints a summary)."""

    def __init__(self, name):
        self.on = os.environ.get("K15_KERNELS_PROFILE", "0") == "1" and torch.cuda.is_available()
        self.name, self.ev, self.last = name, [], None

    def mark(self, label):
        if self.on:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.ev.append((label, e))

    def report(self):
        if not self.on or len(self.ev) < 2:
            return
        torch.cuda.synchronize()
        tot = {}
        for (_, a), (label, b) in zip(self.ev[:-1], self.ev[1:]):
            tot[label] = tot.get(label, 0.0) + a.elapsed_time(b)
        print(f"[k15.kernels profile] {self.name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in tot.items()), flush=True)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: 3xTF32 is accurate to fp32 level; plain "tf32" would not be exact.
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _check_inputs(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N,H] and [V,H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {hidden.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError("hidden, weight and targets must be on the same device")


def _check_temperature(temperature: float):
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _contig_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


def _valid_rows(targets: torch.Tensor, ignore_index: int, V: int, known: torch.Tensor | None = None):
    """(rows or None, compact targets int32). rows is None when every position is valid. `known`:
    the caller's valid rows (made on its host), taken as they are: no synchronisation."""
    if known is not None:
        if known.device != targets.device or known.dim() != 1:
            raise ValueError(f"valid_rows must be a 1-D index tensor on {targets.device}, got "
                             f"{tuple(known.shape)} on {known.device}")
        if known.numel() == targets.numel():
            return None, targets.to(torch.int32)
        return known, targets[known].to(torch.int32)
    ign = ignored_mask(targets, ignore_index)
    any_ignored, out_of_range = torch.stack([ign.any(), (targets >= V).any()]).tolist()  # one sync
    if out_of_range:
        raise ValueError(f"targets must be < vocabulary size {V} (or negative / ignore_index to ignore)")
    if not any_ignored:
        return None, targets.to(torch.int32)
    rows = (~ign).nonzero().squeeze(1)
    return rows, targets[rows].to(torch.int32)


def _forward(hidden, weight, tgt_c, rows, temperature, entropy, cfg: Config):
    """Run the forward kernel over the valid rows. Returns (lse2, t2, e_over_s or None), all [n] fp32,
    in base-2 units (lse2 = lse / ln 2, t2 = target logit / ln 2)."""
    n = tgt_c.numel()
    V, K = weight.shape
    dev = hidden.device
    if n == 0:
        z = torch.zeros(0, device=dev, dtype=torch.float32)
        return z, z, (z if entropy else None)
    BM, BN, BK, warps, stages = cfg.fwd
    n_blocks = triton.cdiv(n, BM)
    v_tiles = triton.cdiv(V, BN)
    sms = _num_sms(dev)
    tma = _use_tma(cfg, hidden, weight)
    ws = tma and _use_ws(cfg)
    # gathered rows: TMA cannot gather, so valid rows are copied chunk by chunk into a small buffer
    step = n if (rows is None or not tma) else min(n, cfg.chunk_rows)
    if cfg.splits is not None:
        splits = max(1, min(cfg.splits, v_tiles))
    elif ws:
        splits = _balanced_splits(triton.cdiv(step, BM), v_tiles, sms)
    else:
        # Measured on an H100 (Qwen2.5-7B head, bf16): 4 vocabulary splits are the sweet spot at
        # N = 8k..128k (1.12-1.15x one cuBLAS GEMM; 6-8 splits 1.17-1.6x, 2 splits 1.3x); small
        # batches get more splits so that the grid still covers every multiprocessor.
        splits = 4
        while n_blocks * splits < sms and splits < v_tiles:
            splits *= 2
        splits = min(splits, v_tiles)
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    part = torch.empty((3 if entropy else 2, splits, n), device=dev, dtype=torch.float32)
    m_p, s_p = part[0], part[1]
    e_p = part[2] if entropy else part[0]
    rows_arg = rows if rows is not None else tgt_c
    # the target logit first: its small kernel runs while the host prepares the main launch
    t2 = torch.empty(n, device=dev, dtype=torch.float32)
    tbm = 16
    tbk = min(256, triton.next_power_of_2(K))
    _target_logit_kernel[(triton.cdiv(n, tbm),)](
        hidden,
        weight,
        tgt_c,
        rows_arg,
        t2,
        n,
        K,
        hidden.stride(0),
        weight.stride(0),
        LOG2E / temperature,
        HAS_ROWS=rows is not None,
        BLOCK_M=tbm,
        BLOCK_K=tbk,
        num_warps=4,
    )
    if tma:
        w_desc = _desc(weight, (BN, BK))
        buf = None if rows is None else torch.empty((step, K), device=dev, dtype=hidden.dtype)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            if rows is None:
                src = hidden
            else:
                src = buf[: r1 - r0]
                torch.index_select(hidden, 0, rows[r0:r1], out=src)
            blocks = triton.cdiv(r1 - r0, BM)
            common = (m_p[:, r0:], s_p[:, r0:], e_p[:, r0:], r1 - r0, n, V, K, LOG2E / temperature, tiles_per_split,
                      splits)
            if ws:
                progs = min(blocks * splits, sms)
                try:
                    _fwd_ws_kernel[(progs,)](
                        _desc(src, (BM, BK)), w_desc, *common, blocks, progs, ENTROPY=entropy, BLOCK_M=BM,
                        BLOCK_N=BN, BLOCK_K=BK, GROUP=cfg.fwd_group, WS=True, num_warps=warps, num_stages=stages)
                except Exception as err:  # noqa: BLE001 -- compiler without Hopper warp specialization
                    _ws_failed(err)
                    return _forward(hidden, weight, tgt_c, rows, temperature, entropy, cfg)
            else:
                _fwd_tma_kernel[(blocks * splits,)](
                    _desc(src, (BM, BK)), w_desc, *common, ENTROPY=entropy, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                    num_warps=warps, num_stages=stages)
    else:
        _fwd_kernel[(n_blocks * splits,)](
            hidden,
            weight,
            rows_arg,
            m_p,
            s_p,
            e_p,
            n,
            V,
            K,
            hidden.stride(0),
            weight.stride(0),
            LOG2E / temperature,
            tiles_per_split,
            splits,
            HAS_ROWS=rows is not None,
            ENTROPY=entropy,
            UPCAST=_interpret() and hidden.dtype != torch.float32,
            PRECISION=_precision(hidden.dtype),
            EVEN_K=K % BK == 0,
            BLOCK_M=BM,
            BLOCK_N=BN,
            BLOCK_K=BK,
            num_warps=warps,
            num_stages=stages,
        )
    m = m_p.max(0).values
    wts = torch.exp2(m_p - m)
    s = (s_p * wts).sum(0)
    lse2 = m + torch.log2(s)
    e = (e_p * wts).sum(0) / s if entropy else None
    return lse2, t2, e


def _scatter(values: torch.Tensor, rows, N: int) -> torch.Tensor:
    if rows is None:
        return values
    out = torch.zeros(N, device=values.device, dtype=values.dtype)
    out[rows] = values
    return out


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    config: Config | None = None,
    valid_rows: torch.Tensor | None = None,
):
    """Forward only (no autograd, nothing saved): logp [N] fp32 (and entropy [N] fp32)."""
    _check_inputs(hidden, weight, targets)
    _check_temperature(temperature)
    cfg = config or _default_config(hidden.device, hidden.dtype)
    hidden, weight = _contig_rows(hidden), _contig_rows(weight)
    rows, tgt_c = _valid_rows(targets, ignore_index, weight.shape[0], valid_rows)
    lse2, t2, e2 = _forward(hidden, weight, tgt_c, rows, temperature, return_entropy, cfg)
    logp = _scatter((t2 - lse2) * LN2, rows, targets.numel())
    if not return_entropy:
        return logp
    ent = _scatter((lse2 - e2) * LN2, rows, targets.numel())
    return logp, ent


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

_HAS_ADDMM_OUT_DTYPE = None


def _addmm_fp32_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for a, b in bf16/fp16/fp32, accumulated in fp32."""
    global _HAS_ADDMM_OUT_DTYPE
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _HAS_ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _HAS_ADDMM_OUT_DTYPE = True
            return
        except (TypeError, RuntimeError):
            _HAS_ADDMM_OUT_DTYPE = False
    if acc.is_cuda:
        acc.add_(torch.mm(a, b))  # product rounded once to a's dtype: still close, slower
    else:
        acc.addmm_(a.float(), b.float())


def _backward(hidden, weight, tgt_c, rows, lse2, t2, grad_logp_c, temperature, need_dh, need_dw, cfg: Config):
    N, K = hidden.shape
    V = weight.shape[0]
    n = tgt_c.numel()
    dev, dtype = hidden.device, hidden.dtype
    dh = None
    dw = None
    if need_dh:
        dh = torch.zeros_like(hidden) if (rows is not None or n == 0) else torch.empty_like(hidden)
    if need_dw:
        dw = torch.zeros_like(weight) if n == 0 else torch.empty_like(weight)
    if n == 0:
        return dh, dw

    c = grad_logp_c.float() / temperature  # dL/dz_i = c_i * (onehot - p)
    # the target term c_i * (1 - p_t), computed from the forward's exact target logit
    coef_t = -c * torch.expm1((t2 - lse2) * LN2)
    scale2 = LOG2E / temperature

    BM, BN, BK, warps, stages = cfg.bwd
    elt = hidden.element_size()
    chunk = max(1, min(n, cfg.chunk_rows))
    acc_bytes = chunk * K * 4 if need_dh else 0
    gath_bytes = chunk * K * elt if rows is not None else 0
    g_budget = max(cfg.scratch_bytes - acc_bytes - gath_bytes, 1 << 20)
    vs = g_budget // (chunk * elt)
    vs = max(BN, (vs // BN) * BN)
    vs = min(vs, triton.cdiv(V, BN) * BN)
    ld = vs  # multiple of BN: aligned rows for cuBLAS
    g_buf = torch.empty(chunk * ld, device=dev, dtype=dtype)
    acc_buf = torch.empty((chunk, K), device=dev, dtype=torch.float32) if need_dh else None
    gath_buf = torch.empty((chunk, K), device=dev, dtype=dtype) if rows is not None else None
    upcast = _interpret() and dtype != torch.float32
    # (gathered chunks live in a fresh buffer: aligned; contiguous chunks are row slices of hidden)
    tma = _use_tma(cfg, hidden, weight)
    sms = _num_sms(dev)
    slice_starts = torch.arange(0, V, vs, device=dev, dtype=tgt_c.dtype)[:, None]
    prof = _Prof(f"backward n={n} V={V} K={K} chunk={chunk} slice={vs}")
    prof.mark("start")

    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        nc = r1 - r0
        if rows is None:
            h_c = hidden[r0:r1]
        else:
            h_c = gath_buf[:nc]
            torch.index_select(hidden, 0, rows[r0:r1], out=h_c)
            prof.mark("gather")
        if need_dh:
            acc = acc_buf[:nc]
            acc.zero_()
        tgt_rel = tgt_c[r0:r1] - slice_starts  # [slices, nc]: targets relative to each slice, one launch
        for si, v0 in enumerate(range(0, V, vs)):
            v1 = min(V, v0 + vs)
            vw = v1 - v0
            g = g_buf[: nc * ld].view(nc, ld)[:, :vw]
            tiles = triton.cdiv(nc, BM) * triton.cdiv(vw, BN)
            args = (h_c, weight[v0:v1], tgt_rel[si], lse2[r0:r1], c[r0:r1], g, nc, vw, K,
                    h_c.stride(0), weight.stride(0), g.stride(0), scale2)
            meta = dict(UPCAST=upcast, PRECISION=_precision(dtype), EVEN_K=K % BK == 0, BLOCK_M=BM,
                        BLOCK_N=BN, BLOCK_K=BK, GROUP_M=cfg.group_m, num_warps=warps, num_stages=stages)
            if tma and _use_ws(cfg):
                try:
                    progs = min(tiles, sms)
                    _grad_logits_ws_kernel[(progs,)](
                        _desc(h_c, (BM, BK)), _desc(weight[v0:v1], (BN, BK)), _desc(g, (BM, BN)), *args[2:5], nc, vw, K,
                        scale2, progs, OUT_DTYPE=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, BLOCK_M=BM,
                        BLOCK_N=BN, BLOCK_K=BK, GROUP_M=cfg.group_m, WS=True, num_warps=warps, num_stages=stages)
                except Exception as err:  # noqa: BLE001 -- compiler without Hopper warp specialization
                    _ws_failed(err)
            if tma and not _use_ws(cfg):
                _grad_logits_tma_kernel[(tiles,)](
                    _desc(h_c, (BM, BK)), _desc(weight[v0:v1], (BN, BK)), *args[2:9], g.stride(0), scale2,
                    BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=cfg.group_m, num_warps=warps, num_stages=stages)
            elif not tma:
                _grad_logits_kernel[(tiles,)](*args, **meta)
            prof.mark("grad-logits")
            if need_dh:
                _addmm_fp32_acc(acc, g, weight[v0:v1])
                prof.mark("dH gemm")
            if need_dw:
                _dw_slice_gemm(dw[v0:v1], g, h_c, first=r0 == 0)
                prof.mark("dW gemm")
        if need_dh:
            bk = min(1024, triton.next_power_of_2(K))
            _finalize_dh_kernel[(nc, triton.cdiv(K, bk))](
                acc,
                weight,
                tgt_c[r0:r1],
                coef_t[r0:r1],
                rows[r0:r1] if rows is not None else tgt_c,
                dh,
                r0,
                K,
                acc.stride(0),
                weight.stride(0),
                dh.stride(0),
                HAS_ROWS=rows is not None,
                BLOCK_K=bk,
            )
            prof.mark("finalize dH")
    if need_dw:
        _dw_add_target(dw, hidden, tgt_c, rows, coef_t)
        prof.mark("dW target term")
    prof.report()
    return dh, dw


def _dw_slice_gemm(dw_s, g, h_c, first: bool) -> None:
    """dw_s (+)= G'^T @ h_c (cuBLAS; the first row chunk writes, later ones accumulate)."""
    if first:
        torch.mm(g.t(), h_c, out=dw_s)
    else:
        torch.addmm(dw_s, g.t(), h_c, out=dw_s)


def _dw_add_target(dw, hidden, tgt_c, rows, coef_t):
    """dw[v] += sum_{i: t_i = v} coef_t[i] * hidden[row_i], in fp32 per row, one rounding. No host
    synchronisation: the runs of equal targets are found on the device."""
    K = hidden.shape[1]
    t_sorted, order = torch.sort(tgt_c.long(), stable=True)
    tok = order if rows is None else rows[order]
    coef_sorted = coef_t[order].contiguous()
    n = t_sorted.numel()
    idx = torch.arange(n, device=dw.device)
    is_start = torch.ones(n, dtype=torch.bool, device=dw.device)
    is_start[1:] = t_sorted[1:] != t_sorted[:-1]
    # run_end[j] for a run start j: the next run start after j (n after the last); j elsewhere
    starts_or_n = torch.where(is_start, idx, n)
    next_start = torch.full_like(idx, n)
    next_start[:-1] = starts_or_n.flip(0).cummin(0).values.flip(0)[1:]
    run_end = torch.where(is_start, next_start, idx)
    bk = min(1024, triton.next_power_of_2(K))
    _dw_target_kernel[(n, triton.cdiv(K, bk))](
        dw,
        hidden,
        tok.contiguous(),
        coef_sorted,
        run_end,
        t_sorted,
        K,
        dw.stride(0),
        hidden.stride(0),
        BLOCK_R=4,
        BLOCK_K=bk,
    )


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class FusedLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, return_entropy, config, valid_rows):
        _check_inputs(hidden, weight, targets)
        _check_temperature(temperature)
        cfg = config or _default_config(hidden.device, hidden.dtype)
        hidden, weight = _contig_rows(hidden), _contig_rows(weight)
        rows, tgt_c = _valid_rows(targets, ignore_index, weight.shape[0], valid_rows)
        lse2, t2, e2 = _forward(hidden, weight, tgt_c, rows, temperature, return_entropy, cfg)
        N = targets.numel()
        logp = _scatter((t2 - lse2) * LN2, rows, N)
        ent = _scatter((lse2 - e2) * LN2, rows, N) if return_entropy else None
        ctx.save_for_backward(hidden, weight, tgt_c, rows, lse2, t2)
        ctx.temperature = temperature
        ctx.cfg = cfg
        if ent is None:
            return logp
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, tgt_c, rows, lse2, t2 = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logp is None or not (need_dh or need_dw):
            return (None,) * 8
        g = grad_logp if rows is None else grad_logp[rows]
        dh, dw = _backward(
            hidden, weight, tgt_c, rows, lse2, t2, g.contiguous(), ctx.temperature, need_dh, need_dw, ctx.cfg
        )
        return dh, dw, None, None, None, None, None, None


def fused_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    config: Config | None = None,
    valid_rows: torch.Tensor | None = None,
):
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return logprobs_forward(hidden, weight, targets, temperature, ignore_index, return_entropy, config,
                                valid_rows)
    return FusedLogprobsFunction.apply(hidden, weight, targets, temperature, ignore_index, return_entropy, config,
                                       valid_rows)
