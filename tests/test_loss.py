"""The mirror-descent loss: a hand-computed example and the gradient of the paper's eq. 3; the
policy losses' statistics, which stay on the device until read."""

import pytest
import torch

from k15.algo.grpo import grpo_loss
from k15.algo.loss import mirror_descent_loss
from k15.algo.reinforce import reinforce_loss

LOSSES = {
    "mirror_descent": lambda *a: mirror_descent_loss(*a, tau=0.3),
    "grpo": grpo_loss,
    "reinforce": reinforce_loss,
}


def test_hand_computed_example():
    # One prompt, k=2; sequence 0 has tokens 0-1, sequence 1 token 2; token 3 is left out (-1).
    logp = torch.tensor([-1.0, -2.0, -0.5, -9.0])
    old = torch.tensor([-1.5, -2.0, -1.0, -3.0])
    seq = torch.tensor([0, 0, 1, -1])
    rewards = torch.tensor([1.0, 0.0])
    tau = 0.5
    loss, stats = mirror_descent_loss(logp, old, seq, rewards, group_size=2, tau=tau)
    # Delta = [0.5, 0.5]; rbar = 0.5; residuals = [0.5 - 0.25, -0.5 - 0.25] = [0.25, -0.75]
    expected = (0.25**2 + 0.75**2) / 2 / (2 * tau)
    assert loss.item() == pytest.approx(expected)
    assert stats.num_tokens == 3 and stats.mean_log_ratio == pytest.approx(0.5)


def test_gradient_equals_minus_eq3_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    k, groups, tau = 4, 3, 0.3
    S = k * groups
    lengths = torch.randint(1, 6, (S,), generator=g)
    seq = torch.repeat_interleave(torch.arange(S), lengths)
    seq[torch.rand(seq.shape, generator=g) < 0.2] = -1  # some tokens left out
    logp = (-torch.rand(seq.shape, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(seq.shape, generator=g)
    rewards = (torch.rand(S, generator=g) > 0.5).float()
    loss, _ = mirror_descent_loss(logp, old, seq, rewards, k, tau)
    (grad,) = torch.autograd.grad(loss, logp)

    # The paper's eq. 3 as an objective J whose gradient is eq. 3; averaged over prompts.
    x = logp.detach().clone().requires_grad_()
    keep = seq >= 0
    seq_logp = torch.zeros(S).index_add(0, seq[keep], x[keep])
    delta = torch.zeros(S).index_add(0, seq[keep], (x - old)[keep])
    rbar = rewards.view(groups, k).mean(1).repeat_interleave(k)
    J = ((seq_logp * (rewards - rbar) - tau / 2 * delta**2).sum() / k) / groups
    (grad_j,) = torch.autograd.grad(J, x)
    torch.testing.assert_close(grad, -grad_j)
    assert grad[~keep].abs().max() == 0


def test_first_step_gradient_is_the_reinforce_baseline():
    # At the first step of an iteration Delta = 0: dLoss/dlogp = -(r - rbar)/k per token.
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    seq = torch.tensor([0, 1, 1])
    loss, _ = mirror_descent_loss(logp, logp.detach(), seq, torch.tensor([1.0, 0.0]), 2, 0.1)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.25, 0.25, 0.25]))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="groups of k=3"):
        mirror_descent_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]), torch.zeros(2), 3, 0.1)
    with pytest.raises(ValueError, match="tau"):
        mirror_descent_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]), torch.zeros(2), 2, 0.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_statistics_follow_their_definitions(name, packed_batch):
    logp, old, seq, rewards, k = packed_batch(0)
    loss, stats = LOSSES[name](logp, old, seq, rewards, k)
    keep = seq >= 0
    delta = torch.zeros(rewards.numel()).index_add(0, seq[keep], (logp - old)[keep])
    rbar = rewards.view(-1, k).mean(1).repeat_interleave(k)
    assert stats.num_tokens == int(keep.sum()) and stats.num_sequences == rewards.numel()
    assert stats.loss == pytest.approx(loss.item(), rel=1e-6)
    assert stats.mean_reward == pytest.approx(rewards.mean().item())
    assert stats.mean_log_ratio == pytest.approx(delta.mean().item(), rel=1e-5)
    if name != "grpo":  # GRPO's advantage is normalised by the group's spread
        assert stats.mean_advantage_abs == pytest.approx((rewards - rbar).abs().mean().item())
    assert stats.values.shape == (5,) and not stats.values.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_never_make_the_host_wait_for_the_gpu(name, packed_batch):
    """The trainer calls the loss between forward and backward: a synchronisation there leaves the
    GPU idle while the host queues the backward."""
    logp, old, seq, rewards, k = packed_batch(0, device="cuda")
    logp.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = LOSSES[name](logp, old, seq, rewards, k)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.num_tokens == int((seq >= 0).sum())  # read afterwards, once
