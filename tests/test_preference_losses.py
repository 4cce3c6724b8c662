"""Each preference loss against values computed by hand (math module, scalar by scalar) on small tensors,
the implicit rewards and TRL's reward metrics, and the direction of the gradients."""

import math

import pytest
import torch

from posttrain.train.preference_losses import (hinge, ipo, log_odds_ratio, orpo, preference_loss, reward_metrics,
                                               sigmoid_dpo, simpo)

# Two pairs: the policy prefers the chosen answer more than the reference does in pair 0, less in pair 1.
PC, PR = [-1.0, -2.0], [-3.0, -1.0]      # policy log-probs of chosen, rejected
RC, RR = [-1.5, -1.5], [-2.0, -2.0]      # reference log-probs
H = [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]  # [1.5, -1.5]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_log_ratio_difference_by_hand():
    assert H == [1.5, -1.5]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_dpo(beta):
    losses, chosen, rejected = sigmoid_dpo(t(PC), t(PR), t(RC), t(RR), beta=beta)
    assert losses.tolist() == pytest.approx([-log_sigmoid(beta * h) for h in H], rel=1e-12)
    assert chosen.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PC, RC)])
    assert rejected.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PR, RR)])
    # at beta 0.1: -log sigmoid(0.15) and -log sigmoid(-0.15)
    if beta == 0.1:
        assert losses.tolist() == pytest.approx([0.62096, 0.77096], abs=1e-5)


def test_sigmoid_dpo_with_label_smoothing_is_conservative_dpo():
    eps, beta = 0.1, 0.1
    losses, _, _ = sigmoid_dpo(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        sigmoid_dpo(t(PC), t(PR), t(RC), t(RR), label_smoothing=0.5)


def test_policy_equal_to_reference_gives_log_2():
    x = t([-4.0, -7.5, -1.0])
    losses, chosen, rejected = sigmoid_dpo(x, x - 1, x, x - 1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_ipo():
    beta = 0.1  # tau: the target log-ratio difference is 1 / (2 tau) = 5
    losses, chosen, rejected = ipo(t(PC), t(PR), t(RC), t(RR), beta=beta)
    assert losses.tolist() == pytest.approx([(1.5 - 5) ** 2, (-1.5 - 5) ** 2])  # 12.25, 42.25
    assert chosen.tolist() == pytest.approx([0.05, -0.05])
    # at the target the loss is zero, beyond it the loss grows again (IPO does not push to infinity)
    at, _, _ = ipo(t([0.0]), t([-5.0]), t([0.0]), t([0.0]), beta=beta)
    beyond, _, _ = ipo(t([0.0]), t([-9.0]), t([0.0]), t([0.0]), beta=beta)
    assert at.item() == 0 and beyond.item() == pytest.approx(16.0)


def test_hinge():
    losses, _, _ = hinge(t(PC), t(PR), t(RC), t(RR), beta=0.1)
    assert losses.tolist() == pytest.approx([1 - 0.15, 1 + 0.15])
    past_margin, _, _ = hinge(t([0.0]), t([-20.0]), t([0.0]), t([0.0]), beta=0.1)  # beta * h = 2 > 1
    assert past_margin.item() == 0


def test_simpo_is_reference_free_with_a_margin():
    beta, gamma = 2.0, 0.5
    losses, chosen, rejected = simpo(t(PC), t(PR), beta=beta, gamma=gamma)
    assert losses.tolist() == pytest.approx([-log_sigmoid(beta * 2.0 - gamma), -log_sigmoid(beta * -1.0 - gamma)])
    assert losses.tolist() == pytest.approx([0.029750, 2.578890], abs=1e-6)
    assert chosen.tolist() == pytest.approx([-2.0, -4.0]) and rejected.tolist() == pytest.approx([-6.0, -2.0])
    smoothed, _, _ = simpo(t(PC), t(PR), beta=beta, gamma=gamma, label_smoothing=0.2)
    z = [beta * 2.0 - gamma, beta * -1.0 - gamma]
    assert smoothed.tolist() == pytest.approx([-0.8 * log_sigmoid(x) - 0.2 * log_sigmoid(-x) for x in z])


def test_orpo_nll_plus_odds_ratio():
    pc, pr, beta = [-0.5, -2.0], [-1.2, -0.3], 0.1  # average per-token log-probs

    def log_odds(lp):
        return lp - math.log(1 - math.exp(lp))

    ratios = [log_odds(c) - log_odds(r) for c, r in zip(pc, pr)]
    assert log_odds_ratio(t(pc), t(pr)).tolist() == pytest.approx(ratios, rel=1e-12)
    losses, chosen, rejected = orpo(t(pc), t(pr), beta=beta)
    assert losses.tolist() == pytest.approx([-c - beta * log_sigmoid(x) for c, x in zip(pc, ratios)], rel=1e-12)
    assert chosen.tolist() == pytest.approx([beta * c for c in pc])
    assert rejected.tolist() == pytest.approx([beta * r for r in pr])
    # a response the policy is certain of (log P = 0) stays finite
    assert torch.isfinite(orpo(t([0.0]), t([-1.0]))[0]).all()


def test_gradients_raise_chosen_and_lower_rejected():
    for name in ("sigmoid", "ipo", "hinge", "simpo", "orpo"):
        pc = torch.tensor([-1.0, -0.6], requires_grad=True)
        pr = torch.tensor([-0.9, -0.8], requires_grad=True)
        ref = (torch.tensor([-1.0, -0.7]), torch.tensor([-1.0, -0.7])) if name in ("sigmoid", "ipo", "hinge") else (None, None)
        losses, _, _ = preference_loss(name, pc, pr, *ref, beta=0.1)
        losses.sum().backward()
        assert (pc.grad < 0).all() and (pr.grad > 0).all(), name


def test_dispatch_and_errors():
    a, b = preference_loss("sigmoid", t(PC), t(PR), t(RC), t(RR), beta=0.1), sigmoid_dpo(t(PC), t(PR), t(RC), t(RR), 0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="reference"):
        preference_loss("ipo", t(PC), t(PR))
    with pytest.raises(ValueError, match="choose one of"):
        preference_loss("kto", t(PC), t(PR), t(RC), t(RR))


def test_reward_metrics_are_sums_over_pairs():
    chosen, rejected = t([0.05, -0.05, 0.2]), t([-0.1, 0.1, 0.2])  # pair 2: a tie is not "correct"
    m = reward_metrics(chosen, rejected, t([-1.0, -2.0, -3.0]), t([-4.0, -5.0, -6.0]))
    assert m["rewards/chosen"].item() == pytest.approx(0.2)
    assert m["rewards/rejected"].item() == pytest.approx(0.2)
    assert m["rewards/margins"].item() == pytest.approx(0.15 - 0.15 + 0.0)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == -6.0 and m["logps/rejected"].item() == -15.0
