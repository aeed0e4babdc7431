"""A user's model whose outputs are not finite for some valid inputs (tests, the fuzz run).

The demo CNN (its weights under `body.`, served with the demo's mean and std) with markers
in the first three pixels of channel 0, row 0:

    pixel 0  pixel 1  pixel 2   what the network does
    1        0        any       logits NaN
    1        1        any       logit 0 is +Inf
    0        1        0         logits finite, gradients not: the heatmaps are NaN/Inf

Every other image gets the demo CNN's ordinary logits. A marker pixel is "1" or "0" within
±0.001, so the AX inputs x + h of an unmarked image practically never hit a marker.
"""

from __future__ import annotations

import torch
from torch import nn

from axguard.demo.network import build_demo_net

TOLERANCE = 0.001
MEAN, STD = 0.3048, 0.323
"""The demo model's normalisation: the network undoes it to read the markers as pixels."""


class NonFiniteOnMarkers(nn.Module):
    """The demo CNN, not finite on the marked images (see the module docstring)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = build_demo_net(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        pixels = x[:, 0, 0, :3] * STD + MEAN
        p0, p1, p2 = pixels[:, 0], pixels[:, 1], pixels[:, 2]
        one0, one1 = (p0 - 1).abs() <= TOLERANCE, (p1 - 1).abs() <= TOLERANCE
        zero0, zero1, zero2 = (p0.abs() <= TOLERANCE, p1.abs() <= TOLERANCE,
                               p2.abs() <= TOLERANCE)
        nan, inf = one0 & zero1, one0 & one1
        bad_gradient = zero0 & one1 & zero2
        # sqrt(0 · p2): value 0, gradient 1 / (2·sqrt(0)) · 0 = NaN, whatever rounding left
        # in p2; sqrt of 1 elsewhere, so the unselected branch's gradient stays finite.
        root = torch.sqrt(torch.where(bad_gradient, p2 * 0.0, 1.0))
        scale = torch.where(bad_gradient, root + 1.0, 1.0)
        logits = logits * scale[:, None]
        logits = torch.where(nan[:, None], torch.full_like(logits, float("nan")), logits)
        first = torch.where(inf, torch.full_like(logits[:, 0], float("inf")), logits[:, 0])
        return torch.cat([first[:, None], logits[:, 1:]], dim=1)


class NaNBelowZero(nn.Module):
    """The demo CNN, NaN for any input with a pixel below −0.005: never a valid image, but
    the perturbation family's x − ε·sign(∇) of a dark image (a verdict-only failure)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = build_demo_net(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        below = (x * STD + MEAN).flatten(1).amin(dim=1) < -0.005
        return torch.where(below[:, None], torch.full_like(logits, float("nan")), logits)


def build(num_classes: int = 10) -> nn.Module:
    """Factory for `model.source: nonfinite_model:build` (weights: demo_weights())."""
    return NonFiniteOnMarkers(num_classes)


def demo_weights() -> dict[str, torch.Tensor]:
    """Return the demo model's weights as a state dict of these networks."""
    from axguard.demo.bundle import ASSETS
    from axguard.engine.model import load_state_dict

    return {f"body.{k}": v for k, v in load_state_dict(ASSETS / "weights.pt").items()}


def marked(image: torch.Tensor, marker: str) -> torch.Tensor:
    """Return a copy of a (C, H, W) image in [0, 1] with a marker: "nan", "inf" or
    "gradient"."""
    values = {"nan": (1.0, 0.0, None), "inf": (1.0, 1.0, None), "gradient": (0.0, 1.0, 0.0)}
    out = image.clone()
    for k, v in enumerate(values[marker]):
        if v is not None:
            out[0, 0, k] = v
    return out


def clear(image: torch.Tensor) -> torch.Tensor:
    """Return a copy of an image that carries no marker (pixel 0 set to 0.5)."""
    out = image.clone()
    out[0, 0, 0] = 0.5
    return out


def build_nan_below_zero(num_classes: int = 10) -> nn.Module:
    """Factory for NaNBelowZero (weights: demo_weights())."""
    return NaNBelowZero(num_classes)
