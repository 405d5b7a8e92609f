"""The DPO loss family as pure functions of per-sequence log-probs and answer lengths (SPEC §4).

Every loss takes the same inputs (each a (B,) tensor) and returns (losses, chosen_rewards, rejected_rewards),
each (B,). Where TRL 1.16 has the same loss, the name and formula are TRL's, so its settings give the
same numbers here. Pick one with ``LOSSES[name]``. Worked by hand: Dw = -10 - (-11) = 1 and
Dl = -12 - (-11) = -1, so sigmoid DPO at beta 0.1 gives -log sigmoid(0.1 * (1 - (-1))) = 0.5981:

    >>> import torch
    >>> from dpokit import LOSSES, LossParams, PairLogps
    >>> lengths = torch.tensor([5.0]), torch.tensor([6.0])
    >>> policy = PairLogps(torch.tensor([-10.0]), torch.tensor([-12.0]), *lengths)
    >>> reference = PairLogps(torch.tensor([-11.0]), torch.tensor([-11.0]), *lengths)
    >>> losses, chosen_rewards, rejected_rewards = LOSSES["sigmoid"](policy, reference, LossParams(beta=0.1))
    >>> [round(t.item(), 4) for t in (losses, chosen_rewards, rejected_rewards)]
    [0.5981, 0.1, -0.1]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.logprobs import PairLogps

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0  # share of labels assumed flipped (conservative and robust DPO)
    rdpo_alpha: float = 0.0  # R-DPO length penalty per token of length difference
    simpo_gamma: float = 0.5  # SimPO target reward margin


def _dpo_rewards(policy: PairLogps, reference: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards r = beta * (log pi - log pi_ref) of chosen and rejected (DPO paper, Eq. 5)."""
    return beta * (policy.chosen - reference.chosen), beta * (policy.rejected - reference.rejected)


def sigmoid(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """DPO: -log sigmoid(beta * (Dw - Dl)) (DPO paper, Eq. 7)."""
    chosen, rejected = _dpo_rewards(policy, reference, params.beta)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def conservative(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """cDPO: labels flipped with probability eps, -(1-eps) log s(z) - eps log s(-z) (Mitchell, 2023)."""
    chosen, rejected = _dpo_rewards(policy, reference, params.beta)
    z, eps = chosen - rejected, params.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), chosen.detach(), rejected.detach()


def robust(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """Robust DPO: unbiased under label noise eps, ((1-eps) l(z) - eps l(-z)) / (1 - 2 eps) (Chowdhury et al. 2024, Eq. 8)."""
    chosen, rejected = _dpo_rewards(policy, reference, params.beta)
    z, eps = chosen - rejected, params.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return losses, chosen.detach(), rejected.detach()


def hinge(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """SLiC-style hinge: relu(1 - beta * (Dw - Dl))."""
    chosen, rejected = _dpo_rewards(policy, reference, params.beta)
    return torch.relu(1 - (chosen - rejected)), chosen.detach(), rejected.detach()


def ipo(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """IPO: (Dw/|yw| - Dl/|yl| - 1/(2 beta))^2 (Azar et al. 2023, Eq. 17), log-ratios averaged per token as in TRL."""
    chosen_ratio = (policy.chosen - reference.chosen) / policy.chosen_lengths.clamp(min=1)
    rejected_ratio = (policy.rejected - reference.rejected) / policy.rejected_lengths.clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * params.beta)) ** 2
    chosen, rejected = _dpo_rewards(policy, reference, params.beta)
    return losses, chosen.detach(), rejected.detach()


def sigmoid_norm(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """Length-normalised DPO: -log sigmoid(beta * (Dw/|yw| - Dl/|yl|)) (TRL's `sigmoid_norm`)."""
    chosen_ratio = (policy.chosen - reference.chosen) / policy.chosen_lengths.clamp(min=1)
    rejected_ratio = (policy.rejected - reference.rejected) / policy.rejected_lengths.clamp(min=1)
    losses = -F.logsigmoid(params.beta * (chosen_ratio - rejected_ratio))
    chosen, rejected = _dpo_rewards(policy, reference, params.beta)
    return losses, chosen.detach(), rejected.detach()


def rdpo(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """R-DPO: -log sigmoid(beta * (Dw - Dl) - alpha * (|yw| - |yl|)) (Park et al. 2024, Eq. 9)."""
    chosen, rejected = _dpo_rewards(policy, reference, params.beta)
    length_gap = policy.chosen_lengths - policy.rejected_lengths
    losses = -F.logsigmoid(chosen - rejected - params.rdpo_alpha * length_gap)
    return losses, chosen.detach(), rejected.detach()


def simpo(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """SimPO: -log sigmoid(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma), no reference (Meng et al. 2024, Eq. 6)."""
    chosen = params.beta * policy.chosen / policy.chosen_lengths.clamp(min=1)
    rejected = params.beta * policy.rejected / policy.rejected_lengths.clamp(min=1)
    return -F.logsigmoid(chosen - rejected - params.simpo_gamma), chosen.detach(), rejected.detach()


LossFn = Callable[[PairLogps, PairLogps | None, LossParams], LossOutput]

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid,
    "conservative": conservative,
    "robust": robust,
    "hinge": hinge,
    "ipo": ipo,
    "sigmoid_norm": sigmoid_norm,
    "rdpo": rdpo,
    "simpo": simpo,
}

REFERENCE_FREE = frozenset({"simpo"})


def chosen_nll(policy: PairLogps) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen answer per token, (B,): the optional SFT term
    that counters likelihood displacement (RPO, Pang et al. 2024)."""
    return -policy.chosen / policy.chosen_lengths.clamp(min=1)
