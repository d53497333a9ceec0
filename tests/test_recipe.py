"""The k1.5 recipe pieces: length reward, samplers, and the GRPO / REINFORCE comparison losses."""

import json

import numpy as np
import pytest
import torch

from k15.algo.grpo import grpo_loss
from k15.algo.length_penalty import length_rewards, penalty_weight
from k15.algo.loss import mirror_descent_loss
from k15.algo.reinforce import reinforce_loss
from k15.algo.sampler import CurriculumSampler, PrioritizedSampler, UniformSampler
from k15.data.arithmetic import generate_problems, undo_steps, worked_solution


# -- length reward (paper 2.3.3) ----------------------------------------------------------------
def paper_length_reward(lengths, correct):
    """The formula as the paper writes it, one group, element by element."""
    lo, hi = min(lengths), max(lengths)
    out = []
    for n, ok in zip(lengths, correct):
        lam = 0.0 if hi == lo else 0.5 - (n - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out


def test_length_reward_matches_the_paper_on_random_groups():
    rng = np.random.default_rng(0)
    for k in (2, 4, 8):
        lengths = rng.integers(1, 60, size=5 * k)
        correct = rng.random(5 * k) < 0.5
        got = length_rewards(lengths, correct, k)
        want = [x for g in range(5) for x in paper_length_reward(lengths[g * k:(g + 1) * k], correct[g * k:(g + 1) * k])]
        np.testing.assert_allclose(got, want)


def test_length_reward_edge_cases():
    assert length_rewards([7, 7, 7, 7], [True, False, True, False], 4).tolist() == [0, 0, 0, 0]
    r = length_rewards([10, 20, 30, 40], [True, True, False, False], 4)
    assert r[0] == pytest.approx(0.5) and r[1] == pytest.approx(0.5 - 1 / 3)
    assert r[2] == pytest.approx(min(0.0, 0.5 - 2 / 3)) and (r[2:] <= 0).all()  # wrong is never rewarded
    with pytest.raises(ValueError, match="groups of k=3"):
        length_rewards([1, 2, 3, 4], [True] * 4, 3)


def test_penalty_is_warmed_up():
    assert [penalty_weight(i, 0.5, 3) for i in (1, 2, 3, 10)] == [0.0, 0.0, 0.5, 0.5]


# -- samplers (paper 2.3.4) ---------------------------------------------------------------------
def test_uniform_covers_every_problem_each_epoch_and_resumes_from_its_state():
    s = UniformSampler(10, seed=1)
    assert sorted(s.sample(10)) == list(range(10))
    state = json.loads(json.dumps(s.state_dict()))
    ahead = s.sample(7)
    t = UniformSampler(10, seed=99)
    t.load_state_dict(state)
    assert t.sample(7) == ahead


def test_curriculum_step_goes_from_easy_to_hard():
    difficulty = [float(i % 10) for i in range(100)]  # 0 easiest .. 9 hardest
    s = CurriculumSampler(difficulty, seed=0, schedule="step", start_fraction=0.5, switch_iter=5)
    before = s.sample(200, iteration=4)
    after = s.sample(200, iteration=5)
    assert max(difficulty[i] for i in before) <= 4 and min(difficulty[i] for i in after) >= 5


def test_curriculum_linear_pool_grows_to_everything():
    difficulty = list(range(100))
    s = CurriculumSampler(difficulty, seed=0, schedule="linear", start_fraction=0.2, switch_iter=11)
    sizes = [len(s.pool(it)) for it in (1, 6, 11, 50)]
    assert sizes == [20, 60, 100, 100]
    assert max(s.sample(300, iteration=1)) < 20


def test_curriculum_names_the_row_without_difficulty():
    with pytest.raises(ValueError, match="row 3"):
        CurriculumSampler([1.0, 2.0, None], seed=0)


def test_prioritized_draws_in_proportion_to_failure_rate():
    ids = [f"p{i}" for i in range(4)]
    s = PrioritizedSampler(ids, seed=0, ema=1.0, prior=0.5, floor=0.0)
    for i, success in enumerate([1.0, 0.75, 0.5, 0.0]):
        s.update(i, success)
    want = np.array([0.0, 0.25, 0.5, 1.0]) / 1.75
    counts = np.zeros(4)
    for _ in range(3000):
        for i in s.sample(1):
            counts[i] += 1
    np.testing.assert_allclose(counts / counts.sum(), want, atol=0.03)
    assert counts[0] == 0  # solved, no floor: never drawn


def test_prioritized_moving_average_and_checkpoint_round_trip():
    ids = ["a", "b", "c"]
    s = PrioritizedSampler(ids, seed=3, ema=0.5, prior=0.5, floor=0.02)
    s.update(0, 1.0)
    s.update(0, 0.0)
    assert s.success[0] == pytest.approx(0.5)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["success_rates"] == {"a": 0.5}
    ahead = s.sample(2)
    t = PrioritizedSampler(["c", "a", "b"], seed=0)  # same problems, another order
    t.load_state_dict(state)
    assert t.success[1] == pytest.approx(0.5) and np.isnan(t.success[0])
    t2 = PrioritizedSampler(ids, seed=0, ema=0.5, prior=0.5, floor=0.02)
    t2.load_state_dict(state)
    assert t2.sample(2) == ahead


# -- comparison losses --------------------------------------------------------------------------
def test_grpo_matches_a_per_sequence_loop(packed_batch):
    logp, old, seq, rewards, k = packed_batch(0)
    x = logp.clone().requires_grad_()
    loss, _ = grpo_loss(x, old, seq, rewards, k, clip_eps=0.2)
    total = 0.0
    for j in range(rewards.numel()):
        group = rewards[(j // k) * k:(j // k + 1) * k]
        adv = (rewards[j] - group.mean()) / (group.std(unbiased=False) + 1e-4)
        tok = seq == j
        if tok.any():
            ratio = torch.exp(logp[tok] - old[tok])
            total += (-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)).mean()
    assert loss.item() == pytest.approx(float(total) / rewards.numel(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, x)
    clipped = (torch.exp(logp - old) - 1).abs() > 0.2
    adv_tok = torch.zeros_like(logp)
    for j in range(rewards.numel()):
        group = rewards[(j // k) * k:(j // k + 1) * k]
        adv_tok[seq == j] = (rewards[j] - group.mean()) / (group.std(unbiased=False) + 1e-4)
    # a token whose ratio left the trust region on the side its advantage pushes gets no gradient
    dead = clipped & (((torch.exp(logp - old) > 1.2) & (adv_tok > 0)) | ((torch.exp(logp - old) < 0.8) & (adv_tok < 0)))
    assert dead.any() and (grad[dead] == 0).all()
    assert (grad[seq < 0] == 0).all()


def test_reinforce_gradient_equals_mirror_descent_at_the_first_step(packed_batch):
    logp, _, seq, rewards, k = packed_batch(1)
    a = logp.clone().requires_grad_()
    b = logp.clone().requires_grad_()
    (ga,) = torch.autograd.grad(reinforce_loss(a, logp, seq, rewards, k)[0], a)
    (gb,) = torch.autograd.grad(mirror_descent_loss(b, logp, seq, rewards, k, tau=0.3)[0], b)
    torch.testing.assert_close(ga, gb)
    assert ga.abs().sum() > 0


# -- the long chain of thought of the built-in task ---------------------------------------------
def test_check_undoes_every_step_back_to_the_first_operand():
    for p in generate_problems(50, seed=4, min_ops=2, max_ops=7):
        steps = undo_steps(p)
        assert len(steps) == len(p.ops)
        assert steps[-1].endswith(f"={p.operands[0]}")
        for s in steps:  # every step is a true equation
            lhs, rhs = s.split("=")
            assert eval(lhs) == int(rhs)
        text = worked_solution(p, check=True)
        assert "Check:" in text and text.endswith(f"\\boxed{{{p.answer}}}.")
        assert text.replace(" Check: " + ", ".join(steps) + ".", "") == worked_solution(p)
