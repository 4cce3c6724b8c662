"""Preference losses: DPO and its relatives, each a small function that cites its paper.

Every loss takes per-pair log-probabilities of the chosen and rejected responses under the policy
(and, for the reference-based ones, under the frozen reference model), shape (P,) each, and returns
`(losses, chosen_rewards, rejected_rewards)`, each (P,): the per-pair loss (the caller sums it, see
train/losses.py) and the implicit rewards that the metrics report. Rewards are detached.

A log-probability here is log pi(response | prompt) over the response tokens only, summed or
averaged per token (`average_logps` in train/dpo.py); which one a loss expects is part of its
definition (SimPO and ORPO average by construction).

Modelled on torchtune's `rlhf/loss/dpo.py`; the formulas follow TRL's `DPOTrainer.dpo_loss`
where the papers leave a choice open.

Reference-based (need the reference model's log-probs):
- `sigmoid_dpo`: DPO (Rafailov et al. 2023), with conservative label smoothing (cDPO).
- `ipo`: IPO (Azar et al. 2023), a squared loss that does not saturate.
- `hinge`: the hinge loss of SLiC-HF (Zhao et al. 2023) on DPO's log-ratio.

Reference-free:
- `simpo`: SimPO (Meng et al. 2024), length-normalised log-probs and a target margin gamma.
- `orpo`: ORPO (Hong et al. 2024), NLL on the chosen response plus an odds-ratio penalty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _dpo_logits(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)): how much more the policy
    prefers the chosen response than the reference does."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def dpo_rewards(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                beta: float) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards r = beta * (log pi(y) - log ref(y)) of the chosen and rejected responses."""
    return (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def sigmoid_dpo(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO: -log sigmoid(beta * h), h the log-ratio difference (`_dpo_logits`).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model", https://arxiv.org/abs/2305.18290, eq. 7. With `label_smoothing` eps > 0: conservative
    DPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf), which assumes a label is flipped with
    probability eps: (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h).
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is the assumed share of flipped labels, in [0, 0.5); got {label_smoothing}")
    h = _dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    return (losses, *dpo_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def ipo(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
        beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """IPO: (h - 1 / (2 tau))^2 with tau = beta: regresses the log-ratio difference onto a fixed target
    instead of pushing it to infinity, so it does not overfit deterministic preferences.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", https://arxiv.org/abs/2310.12036, eq. 17. The paper (and TRL) average the
    log-probs over response tokens.
    """
    h = _dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *dpo_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def hinge(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
          beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge: max(0, 1 - beta * h), zero once the margin beta * h reaches 1.

    The rank-calibration loss of SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback", https://arxiv.org/abs/2305.10425, eq. 1) applied to DPO's
    reference-normalised log-ratio, as in the DPO paper's discussion and TRL's `loss_type="hinge"`.
    """
    h = _dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * h)
    return (losses, *dpo_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def simpo(policy_chosen: Tensor, policy_rejected: Tensor, beta: float = 2.0, gamma: float = 0.5,
          label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO: -log sigmoid(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma). No reference model.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734, eq. 6. The log-probs must be averaged over response tokens
    (the length-normalised reward beta/|y| log pi(y|x)); gamma is the target reward margin.
    Rewards: beta * avg log pi(y). `label_smoothing` as in cDPO (TRL's CPOTrainer does the same).
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is the assumed share of flipped labels, in [0, 0.5); got {label_smoothing}")
    logits = beta * (policy_chosen - policy_rejected) - gamma
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach()


def log_odds_ratio(policy_chosen: Tensor, policy_rejected: Tensor) -> Tensor:
    """log(odds(y_w) / odds(y_l)), odds(y) = P(y) / (1 - P(y)) with log P(y) the average log-prob.

    log(1 - P) is computed as log(-expm1(log P)), accurate when P is close to 1 (where log1p(-exp)
    loses digits); log P is kept just below 0 so that a certain response gives a finite value.
    """
    pc, pr = policy_chosen.clamp(max=-1e-6), policy_rejected.clamp(max=-1e-6)
    return (pc - pr) - (torch.log(-torch.expm1(pc)) - torch.log(-torch.expm1(pr)))


def orpo(policy_chosen: Tensor, policy_rejected: Tensor, beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO: NLL of the chosen response + lambda * -log sigmoid(log odds ratio), lambda = beta.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    https://arxiv.org/abs/2403.07691, eqs. 6-7. Log-probs are averaged over response tokens, so the
    NLL term is the chosen response's mean token NLL, -avg log pi(y_w), per pair. Rewards (as TRL's
    ORPOTrainer logs them): beta * avg log pi(y).
    """
    losses = -policy_chosen - beta * F.logsigmoid(log_odds_ratio(policy_chosen, policy_rejected))
    return losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach()


REFERENCE_LOSSES = ("sigmoid", "ipo", "hinge")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
LOSSES = REFERENCE_LOSSES + REFERENCE_FREE_LOSSES
# Summed log-probs for DPO and hinge (the DPO paper, TRL's default); the others average by definition.
AVERAGES_BY_DEFAULT = {"sigmoid": False, "hinge": False, "ipo": True, "simpo": True, "orpo": True}


def preference_loss(name: str, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None = None,
                    ref_rejected: Tensor | None = None, beta: float = 0.1, label_smoothing: float = 0.0,
                    gamma: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """The loss `name` (one of LOSSES) on per-pair log-probs: (losses, chosen_rewards, rejected_rewards)."""
    if name in REFERENCE_LOSSES:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss {name!r} needs the reference model's log-probs")
        if name == "sigmoid":
            return sigmoid_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
        if name == "ipo":
            return ipo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
        return hinge(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if name == "simpo":
        return simpo(policy_chosen, policy_rejected, beta, gamma, label_smoothing)
    if name == "orpo":
        return orpo(policy_chosen, policy_rejected, beta)
    raise ValueError(f"unknown preference loss {name!r}; choose one of {', '.join(LOSSES)}")


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen: Tensor,
                   policy_rejected: Tensor) -> dict[str, Tensor]:
    """TRL's metrics as SUMS over pairs (the loop divides by the pair count):
    rewards/chosen, rewards/rejected, rewards/margins (chosen - rejected), rewards/accuracies (share of
    pairs whose chosen reward is strictly higher), logps/chosen, logps/rejected (the policy's)."""
    return {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": policy_chosen.detach().sum(), "logps/rejected": policy_rejected.detach().sum()}
