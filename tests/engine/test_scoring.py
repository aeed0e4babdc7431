"""The paper's formulas against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from axguard.engine import scoring


def test_kappa_is_one_at_target_and_minus_one_over_c_minus_one_elsewhere():
    k = scoring.kappa(torch.tensor([2, 0]), num_classes=4)
    third = -1.0 / 3.0
    expected = torch.tensor([[third, third, 1.0, third], [1.0, third, third, third]])
    torch.testing.assert_close(k, expected)


def test_kappa_for_two_classes_is_the_papers_plus_minus_one():
    assert scoring.kappa(torch.tensor([0, 1]), 2).tolist() == [[1.0, -1.0], [-1.0, 1.0]]


def test_kappa_refuses_one_class():
    with pytest.raises(ValueError):
        scoring.kappa(torch.tensor([0]), 1)


def test_normalise_uses_one_global_max_per_image():
    h = torch.tensor([[[[1.0, -4.0]], [[2.0, 0.5]]], [[[0.0, 0.0]], [[0.0, 0.0]]]])
    normalised, zero = scoring.normalise_heatmaps(h)
    assert normalised[0].flatten().tolist() == [0.25, -1.0, 0.5, 0.125]
    assert normalised[1].abs().sum() == 0
    assert not torch.isnan(normalised).any()
    assert zero.tolist() == [False, True]


def test_ax_processes():
    x = torch.tensor([0.5, 0.2])
    h = torch.tensor([-1.0, 0.5])
    assert scoring.ax_sum(x, h).tolist() == pytest.approx([-0.5, 0.7])
    assert scoring.ax_product(x, h).tolist() == pytest.approx([-0.5, 0.1])
    assert set(scoring.AX_PROCESSES) == {"sum", "product"}


def test_co_score_on_a_linear_model_by_hand():
    # f(x) = W x with 3 classes; h fixed. s = κ · (W h) for the sum process.
    w = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]])
    x = torch.tensor([[0.2, 0.4]])
    h = torch.tensor([[0.5, -1.0]])
    logits_x = x @ w.T
    logits_ax = scoring.ax_sum(x, h) @ w.T
    # W h = [0.5 - 2, 1, 1.5 - 1] = [-1.5, 1.0, 0.5]; κ for class 1 = [-0.5, 1, -0.5]
    s = scoring.co_score(logits_ax, logits_x, scoring.kappa(torch.tensor([1]), 3))
    assert s.item() == pytest.approx(0.75 + 1.0 - 0.25)


@pytest.mark.parametrize("theta", [0.0, 0.3, math.pi / 5])
@pytest.mark.parametrize(("a1", "a2"), [(0.95, 0.1), (0.7, 0.4), (2.0, 0.5)])
def test_paper_toy_h_equals_x_gives_a1_minus_a2(theta, a1, a2):
    """Section 2: f = LeakyReLU(W⁻¹x), x = a1 x⁽¹⁾ + a2 x⁽²⁾, h = x ⇒ s = a1 − a2."""
    rotation = torch.tensor([[math.cos(theta), -math.sin(theta)],
                             [math.sin(theta), math.cos(theta)]])
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.LeakyReLU(0.01))
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.inv(rotation))
    x = (rotation @ torch.tensor([a1, a2]))[None]
    with torch.no_grad():
        s = scoring.co_score(model(scoring.ax_sum(x, x)), model(x),
                             scoring.kappa(torch.tensor([0]), 2))
    assert s.item() == pytest.approx(a1 - a2, abs=1e-5)
