"""Each loss against values worked by hand.

The shared example (beta = 0.1 unless a test says otherwise), one pair:
    policy   log p(yw) = -10, log p(yl) = -12      |yw| = 4 tokens, |yl| = 2 tokens
    reference log p(yw) = -11, log p(yl) = -11
    Dw = -10 - (-11) = 1,  Dl = -12 - (-11) = -1,  Dw - Dl = 2,  z = beta * 2 = 0.2
    rewards: chosen = beta * Dw = 0.1, rejected = beta * Dl = -0.1
softplus(x) = log(1 + e^x), so -log sigmoid(z) = softplus(-z):
    softplus(-0.2) = log(1.8187307531) = 0.5981388694
    softplus(+0.2) = 0.2 + softplus(-0.2) = 0.7981388694
"""

import pytest
import torch
from torch.testing import assert_close

from dpokit.logprobs import PairLogps
from dpokit.losses import LOSSES, LossParams, chosen_nll

POLICY = PairLogps(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([4.0]), torch.tensor([2.0]))
REFERENCE = PairLogps(torch.tensor([-11.0]), torch.tensor([-11.0]), torch.tensor([4.0]), torch.tensor([2.0]))


def run(name: str, **params) -> tuple[float, float, float]:
    losses, chosen, rejected = LOSSES[name](POLICY, REFERENCE, LossParams(**params))
    return losses.item(), chosen.item(), rejected.item()


def test_sigmoid():
    """-log sigmoid(0.2) = softplus(-0.2) = 0.5981388694; rewards 0.1 and -0.1."""
    assert_close(run("sigmoid", beta=0.1), (0.5981388694, 0.1, -0.1))


def test_sigmoid_wrong_way_pair():
    """Policy moved the wrong way: Dw = 0, Dl = 1, z = -0.1, loss = softplus(0.1) = 0.7443966601."""
    policy = PairLogps(torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([3.0]), torch.tensor([3.0]))
    reference = PairLogps(
        torch.tensor([-5.0]), torch.tensor([-5.0]), torch.tensor([3.0]), torch.tensor([3.0])
    )
    losses, _, _ = LOSSES["sigmoid"](policy, reference, LossParams(beta=0.1))
    assert_close(losses, torch.tensor([0.7443966601]))


def test_conservative():
    """eps = 0.1: 0.9 * softplus(-0.2) + 0.1 * softplus(0.2) = 0.5383249824 + 0.0798138869 = 0.6181388694."""
    assert_close(run("conservative", beta=0.1, label_smoothing=0.1)[0], 0.6181388694)


def test_robust():
    """eps = 0.1: (0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8 = 0.4585110955 / 0.8 = 0.5731388694."""
    assert_close(run("robust", beta=0.1, label_smoothing=0.1)[0], 0.5731388694)


def test_robust_without_noise_is_sigmoid():
    assert_close(run("robust", beta=0.1, label_smoothing=0.0), run("sigmoid", beta=0.1))


def test_hinge():
    """relu(1 - z) = relu(1 - 0.2) = 0.8."""
    assert_close(run("hinge", beta=0.1)[0], 0.8)


def test_ipo():
    """Per-token log-ratios: 1/4 = 0.25 and -1/2 = -0.5, gap 0.75; 1/(2 beta) = 5; (0.75 - 5)^2 = 18.0625."""
    assert_close(run("ipo", beta=0.1), (18.0625, 0.1, -0.1))


def test_sigmoid_norm():
    """Same per-token gap 0.75; -log sigmoid(0.1 * 0.75) = softplus(-0.075) = 0.6563501408."""
    assert_close(run("sigmoid_norm", beta=0.1)[0], 0.6563501408)


def test_rdpo():
    """alpha = 0.05, |yw| - |yl| = 2: z = 0.2 - 0.05 * 2 = 0.1, loss = softplus(-0.1) = 0.6443966601."""
    assert_close(run("rdpo", beta=0.1, rdpo_alpha=0.05)[0], 0.6443966601)


def test_simpo_uses_no_reference():
    """beta = 2, gamma = 0.5: rewards 2 * -10/4 = -5 and 2 * -12/2 = -12; z = -5 + 12 - 0.5 = 6.5;
    loss = softplus(-6.5) = 0.0015023102."""
    losses, chosen, rejected = LOSSES["simpo"](POLICY, None, LossParams(beta=2.0, simpo_gamma=0.5))
    assert_close((losses.item(), chosen.item(), rejected.item()), (0.0015023102, -5.0, -12.0))


def test_chosen_nll_is_per_token():
    """-log p(yw) / |yw| = 10 / 4 = 2.5."""
    assert_close(chosen_nll(POLICY), torch.tensor([2.5]))


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "simpo"])
def test_gradient_raises_chosen_over_rejected(name):
    """A descent step on any DPO-family loss must widen the policy's chosen-minus-rejected gap."""
    chosen = torch.tensor([-10.0], requires_grad=True)
    rejected = torch.tensor([-12.0], requires_grad=True)
    policy = PairLogps(chosen, rejected, torch.tensor([4.0]), torch.tensor([2.0]))
    losses, _, _ = LOSSES[name](
        policy,
        REFERENCE,
        LossParams(beta=0.1, label_smoothing=0.1 if name in ("conservative", "robust") else 0.0),
    )
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
