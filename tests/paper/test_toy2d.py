"""The paper's section 2 toy example: gradient ascent on Δ agrees with eq. (4)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location("toy2d", ROOT / "examples" / "toy2d" / "toy2d.py")
toy2d = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy2d)


@pytest.mark.parametrize("theta", [0.0, 0.2, math.pi / 4, 1.2, 2.5])
@pytest.mark.parametrize(("a1", "a2"), [(0.95, 0.05), (0.7, 0.4), (0.55, 0.5)])
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_gradient_ascent_equals_closed_form(theta, a1, a2, steps):
    got = toy2d.gradient_ascent(theta, a1, a2, steps, eta=0.05)
    torch.testing.assert_close(got, toy2d.closed_form(theta, a1, a2, steps, eta=0.05))


def test_ascent_raises_delta_and_the_co_score():
    theta, a1, a2 = 0.3, 0.9, 0.2
    x = toy2d.sample(theta, a1, a2)
    h0 = toy2d.closed_form(theta, a1, a2, 0, 0.1)
    h10 = toy2d.closed_form(theta, a1, a2, 10, 0.1)
    assert torch.equal(h0, x)  # w = 1: h = x
    ones = torch.ones(2, dtype=torch.float64)
    assert toy2d.delta(h10 / x, x, theta) > toy2d.delta(ones, x, theta)  # w after 10 steps
    assert toy2d.co_score(theta, a1, a2, h10) > toy2d.co_score(theta, a1, a2, h0)
    # h = x gives s = a1 − a2 for LeakyReLU with non-negative a (section 2).
    assert toy2d.co_score(theta, a1, a2, x) == pytest.approx(a1 - a2)


def test_the_figure_is_written(tmp_path):
    out = toy2d.plot(tmp_path / "fig1.png")
    assert out.stat().st_size > 10_000
