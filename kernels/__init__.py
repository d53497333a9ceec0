"""Triton kernels, each beside its pure-PyTorch reference. Installed and imported as `k15.kernels`.

Public API (importing this package does not import Triton; the kernels load on first use):

    fused_logprobs(hidden [N,H], weight [V,H], targets [N], *, temperature=1.0,
                   ignore_index=-100, return_entropy=False, impl="auto") -> logp [N] fp32
        log softmax(hidden @ weight.T / temperature)[i, targets[i]], without materialising the
        [N, V] logits. Differentiable with respect to hidden and weight for any upstream per-token
        gradient; the gradient is exact (no filtering). Positions whose target is negative or
        equal to ignore_index get logp 0 and no gradient, and cost no GEMM work. bf16, fp16 and
        fp32 inputs; fp32 accumulation; any vocabulary size. With return_entropy=True it returns
        (logp, entropy) with the per-token entropy of the softmax (fp32, detached) computed in the
        same pass. Called with autograd off (torch.no_grad(), or inputs that need no grad) it runs
        the forward kernel only and saves nothing: use that for old/reference-policy log-probs.
        The same function must compute old and new log-probs so that Delta_j is 0 at the first
        step of an iteration.

    fused_mirror_descent_loss(hidden, weight, targets, old_logp, seq_ids, rewards, group_size,
                              tau, *, temperature=1.0, return_aux=False, impl="auto")
        -> (loss, LossStats)   [or (loss, LossStats, {"logp", "entropy"}) with return_aux]
        The mirror-descent loss of k15.algo.loss.mirror_descent_loss over a packed batch, with
        (hidden, weight, targets) in place of logp: targets[i] is the token sampled at position i
        (the next token), seq_ids[i] its sequence (-1: not trained, e.g. prompt or padding),
        rewards [S] in groups of group_size consecutive sequences. Value and gradients equal
        mirror_descent_loss(reference_logprobs(...), ...).

    reference_logprobs(...), reference_mirror_descent_loss(...)
        Pure-PyTorch specifications (fp32 logits, materialised): the CPU path and the tests' oracle.

impl: "auto" uses the Triton kernels on CUDA tensors (and on CPU under TRITON_INTERPRET=1, for
tests) and the reference otherwise; "triton" and "reference" force one.
"""

from __future__ import annotations

import os

from .logprobs_ref import IGNORE_INDEX, reference_logprobs, reference_mirror_descent_loss

__all__ = [
    "IGNORE_INDEX",
    "fused_logprobs",
    "fused_mirror_descent_loss",
    "reference_logprobs",
    "reference_mirror_descent_loss",
    "use_triton",
]


def use_triton(tensor, impl: str = "auto") -> bool:
    """Whether `impl` resolves to the Triton kernels for inputs on `tensor`'s device."""
    if impl == "triton":
        return True
    if impl == "reference":
        return False
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_logprobs(
    hidden,
    weight,
    targets,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    impl: str = "auto",
    config=None,
):
    if use_triton(hidden, impl):
        from .logprobs import fused_logprobs_triton

        return fused_logprobs_triton(hidden, weight, targets, temperature, ignore_index, return_entropy, config)
    return reference_logprobs(hidden, weight, targets, temperature, ignore_index, return_entropy)


def fused_mirror_descent_loss(
    hidden,
    weight,
    targets,
    old_logp,
    seq_ids,
    rewards,
    group_size: int,
    tau: float,
    *,
    temperature: float = 1.0,
    return_aux: bool = False,
    impl: str = "auto",
):
    from .mirror_descent import fused_mirror_descent_loss_impl

    def logprobs_fn(h, w, t, temperature, return_entropy):
        return fused_logprobs(h, w, t, temperature=temperature, return_entropy=return_entropy, impl=impl)

    return fused_mirror_descent_loss_impl(
        logprobs_fn, hidden, weight, targets, old_logp, seq_ids, rewards, group_size, tau, temperature, return_aux
    )
