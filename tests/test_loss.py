"""The mirror-descent loss: a hand-computed example and the gradient of the paper's eq. 3."""

import pytest
import torch

from k15.algo.loss import mirror_descent_loss


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
