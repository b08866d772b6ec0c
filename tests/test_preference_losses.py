"""DPO-family preference losses (`raysmol.post.preference_losses`) against hand computations on a two-pair batch,
their values at the reference (c = r = 0), the signs of their gradients, and the dispatch. Fast, no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from raysmol.post.preference_losses import LOSSES, apo_down, apo_zero, ipo, preference_loss, sigmoid

# Two pairs: c_i = log pi(chosen_i) - log ref(chosen_i), r_i the same for rejected_i (summed over reply tokens).
C = [0.3, -0.2]
R = [-0.1, 0.4]
BETA = 0.5


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _dsig(x: float) -> float:
    return _sig(x) * (1 - _sig(x))


def _run(kind: str, c: list[float], r: list[float], beta: float, dtype=torch.float64):
    """The loss [n] and its gradients d loss_i / d c_i, d loss_i / d r_i (pairs are independent)."""
    ct = torch.tensor(c, dtype=dtype, requires_grad=True)
    rt = torch.tensor(r, dtype=dtype, requires_grad=True)
    loss = preference_loss(kind, ct, rt, beta)
    loss.sum().backward()
    return loss.detach().tolist(), ct.grad.tolist(), rt.grad.tolist()


# Hand computations with beta = 0.5: beta*c = [0.15, -0.1], beta*r = [-0.05, 0.2], c - r = [0.4, -0.6],
# beta*(c - r) = [0.2, -0.3], 1/(2 beta) = 1.
EXPECTED = {
    # -log sigmoid(beta (c - r)) = log(1 + exp(-beta (c - r)))
    "sigmoid": [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.3))],
    # (c - r - 1/(2 beta))^2
    "ipo": [(0.4 - 1.0) ** 2, (-0.6 - 1.0) ** 2],  # 0.36, 2.56
    # (1 - sigmoid(beta c)) + sigmoid(beta r)
    "apo_zero": [(1 - 1 / (1 + math.exp(-0.15))) + 1 / (1 + math.exp(0.05)),
                 (1 - 1 / (1 + math.exp(0.1))) + 1 / (1 + math.exp(-0.2))],
    # sigmoid(beta c) + (1 - sigmoid(beta (c - r)))
    "apo_down": [1 / (1 + math.exp(-0.15)) + (1 - 1 / (1 + math.exp(-0.2))),
                 1 / (1 + math.exp(0.1)) + (1 - 1 / (1 + math.exp(0.3)))],
}


def test_every_loss_has_a_hand_computation():
    assert set(EXPECTED) == set(LOSSES) == {"sigmoid", "ipo", "apo_zero", "apo_down"}
    assert EXPECTED["ipo"] == pytest.approx([0.36, 2.56], rel=1e-12)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_pair_batch_matches_hand_computation(kind, dtype):
    loss, _, _ = _run(kind, C, R, BETA, dtype)
    assert loss == pytest.approx(EXPECTED[kind], rel=1e-6)


def test_named_functions_equal_the_dispatch():
    c, r = torch.tensor(C, dtype=torch.float64), torch.tensor(R, dtype=torch.float64)
    for kind, fn in {"sigmoid": sigmoid, "ipo": ipo, "apo_zero": apo_zero, "apo_down": apo_down}.items():
        out = fn(c, r, BETA)
        assert out.shape == (2,)
        assert torch.equal(out, preference_loss(kind, c, r, BETA))


def test_sigmoid_is_todays_dpo_loss():
    """objectives.dpo: rewards = beta * logratio, margin = chosen - rejected, loss = -logsigmoid(margin).mean()."""
    c, r = torch.tensor(C, dtype=torch.float64), torch.tensor(R, dtype=torch.float64)
    today = -torch.nn.functional.logsigmoid(BETA * c - BETA * r).mean()
    assert preference_loss("sigmoid", c, r, BETA).mean().item() == pytest.approx(today.item(), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_values_at_the_reference(beta):
    """c == r == 0: the policy equals the reference on both replies."""
    z = [0.0, 0.0]
    assert _run("sigmoid", z, z, beta)[0] == pytest.approx([math.log(2)] * 2, rel=1e-6)
    assert _run("ipo", z, z, beta)[0] == pytest.approx([(1 / (2 * beta)) ** 2] * 2, rel=1e-6)
    assert _run("apo_zero", z, z, beta)[0] == pytest.approx([1.0, 1.0], rel=1e-6)  # (1 - 1/2) + 1/2
    assert _run("apo_down", z, z, beta)[0] == pytest.approx([1.0, 1.0], rel=1e-6)  # 1/2 + (1 - 1/2)


def test_sigmoid_gradients():
    """d/dc = -beta (1 - sigmoid(beta m)) < 0, d/dr = -d/dc > 0, m = c - r: widen the margin, always."""
    _, gc, gr = _run("sigmoid", C, R, BETA)
    want = [-BETA * (1 - _sig(BETA * m)) for m in (0.4, -0.6)]
    assert gc == pytest.approx(want, rel=1e-6)
    assert gr == pytest.approx([-w for w in want], rel=1e-6)
    assert all(g < 0 for g in gc) and all(g > 0 for g in gr)


def test_ipo_gradients_pull_the_margin_to_its_target():
    """d/dc = 2 (c - r - 1/(2 beta)) = -d/dr: below the target margin 1/(2 beta) = 1 the loss widens it, above it
    the loss narrows it (unlike sigmoid DPO, which always widens)."""
    _, gc, gr = _run("ipo", C, R, BETA)  # margins 0.4 and -0.6, both below 1
    assert gc == pytest.approx([2 * (0.4 - 1), 2 * (-0.6 - 1)], rel=1e-6)
    assert gr == pytest.approx([-2 * (0.4 - 1), -2 * (-0.6 - 1)], rel=1e-6)
    assert all(g < 0 for g in gc) and all(g > 0 for g in gr)
    _, gc, gr = _run("ipo", [1.5], [0.0], BETA)  # margin 1.5 > 1
    assert gc[0] == pytest.approx(1.0, rel=1e-6) and gr[0] == pytest.approx(-1.0, rel=1e-6)


def test_apo_zero_gradients_raise_chosen_and_lower_rejected():
    """d/dc = -beta sigmoid'(beta c) < 0 (descent raises c), d/dr = beta sigmoid'(beta r) > 0 (descent lowers r)."""
    for c, r in [(C, R), ([0.0, 0.0], [0.0, 0.0]), ([5.0, -3.0], [-4.0, 6.0])]:
        _, gc, gr = _run("apo_zero", c, r, BETA)
        assert gc == pytest.approx([-BETA * _dsig(BETA * x) for x in c], rel=1e-6)
        assert gr == pytest.approx([BETA * _dsig(BETA * x) for x in r], rel=1e-6)
        assert all(g < 0 for g in gc) and all(g > 0 for g in gr)


def test_apo_down_gradients_lower_both():
    """d/dr = beta sigmoid'(beta (c - r)) > 0 always (descent lowers r). d/dc = beta [sigmoid'(beta c) -
    sigmoid'(beta (c - r))]: the first term pushes c down, the margin term pulls it up; since sigmoid' is even and
    falls with |x|, d/dc > 0 exactly when |c| < |c - r|, and d/dc = 0 at c = r = 0."""
    _, gc, gr = _run("apo_down", C, R, BETA)  # |c| = 0.3 < 0.4 = |c - r|; |c| = 0.2 < 0.6 = |c - r|
    assert gc == pytest.approx([BETA * (_dsig(0.15) - _dsig(0.2)), BETA * (_dsig(-0.1) - _dsig(-0.3))], rel=1e-6)
    assert gr == pytest.approx([BETA * _dsig(0.2), BETA * _dsig(-0.3)], rel=1e-6)
    assert all(g > 0 for g in gc) and all(g > 0 for g in gr)

    _, gc, gr = _run("apo_down", [0.0], [0.0], BETA)
    assert gc[0] == pytest.approx(0.0, abs=1e-12) and gr[0] == pytest.approx(BETA / 4, rel=1e-6)

    _, gc, gr = _run("apo_down", [2.0], [2.0], BETA)  # |c| = 2 > 0 = |c - r|: the margin term wins on c
    assert gc[0] < 0 and gr[0] > 0
    # The sum of the gradients is beta sigmoid'(beta c) > 0: a descent step always lowers c + r.
    assert gc[0] + gr[0] == pytest.approx(BETA * _dsig(BETA * 2.0), rel=1e-6)


def test_unknown_kind_names_the_valid_ones():
    c = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        preference_loss("hinge", c, c, 0.1)
    assert "hinge" in str(err.value)
    for kind in LOSSES:
        assert kind in str(err.value)


def test_mismatched_shapes_error():
    with pytest.raises(ValueError, match="shape"):
        preference_loss("sigmoid", torch.zeros(2), torch.zeros(3), 0.1)
