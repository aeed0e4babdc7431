"""Tensor side of the flag's evidence: what the engine's extra passes feed to verdict.py.

Small pure functions on (N, C, H, W) float32 pixels in [0, 1] and (N, C) logits:
the coefficient matrices whose backward pass gives a gradient feature, the ODIN-style
perturbation, and the test-time views. See verdict.py for the features themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as tvf

from ..errors import ConfigError

View = Callable[[torch.Tensor], torch.Tensor]


def top_two(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (predicted class, runner-up class), each (N,) int64."""
    top = logits.topk(2, dim=1).indices
    return top[:, 0], top[:, 1]


def one_hot(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return (N, C) float32 with a 1 at each row's class."""
    return torch.nn.functional.one_hot(classes, num_classes).to(torch.float32)


def margin_coefficients(predicted: torch.Tensor, runner_up: torch.Tensor,
                        num_classes: int) -> torch.Tensor:
    """Return K with K·z = z_ŷ − z₂ per row: ∇ₓ(K·z) is the margin's gradient."""
    return one_hot(predicted, num_classes) - one_hot(runner_up, num_classes)


def nll_coefficients(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Return K = softmax(z) − e_ŷ, so that ∇ₓ(K·z) = ∇ₓ(−log p_ŷ) exactly (K held fixed).

    −log p_ŷ = logsumexp(z) − z_ŷ, whose derivative in z is softmax(z) − e_ŷ.
    """
    return torch.softmax(logits.float(), dim=1) - one_hot(predicted, logits.shape[1])


def perturb(x: torch.Tensor, nll_gradient: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Return x − ε·sign(∇ₓ(−log p_ŷ)): one step that makes ŷ more likely (no clipping,
    like the AX process)."""
    return x - epsilon * torch.sign(nll_gradient)


def gradient_norms(gradient: torch.Tensor) -> torch.Tensor:
    """Return the L2 norm of each image's gradient, (N,)."""
    return gradient.flatten(1).norm(dim=1)


@dataclass(frozen=True)
class ViewSpec:
    """A parsed test-time view."""

    text: str
    transform: View


def parse_view(text: str) -> ViewSpec:
    """Return the view named by `text`; ConfigError (field model.views) when unknown.

    Views: "hflip", "vflip", "shift:DX:DY" (whole pixels, zero fill), "rotate:DEGREES"
    (|angle| ≤ 45), "scale:FACTOR" (0.5 to 2, about the centre).
    """
    kind, _, rest = text.strip().partition(":")
    args = rest.split(":") if rest else []
    try:
        if kind == "hflip" and not args:
            return ViewSpec(text, tvf.horizontal_flip)
        if kind == "vflip" and not args:
            return ViewSpec(text, tvf.vertical_flip)
        if kind == "shift" and len(args) == 2:
            dx, dy = int(args[0]), int(args[1])
            return ViewSpec(text, _affine(translate=[dx, dy]))
        if kind == "rotate" and len(args) == 1:
            angle = float(args[0])
            if abs(angle) <= 45:
                return ViewSpec(text, _affine(angle=angle))
        if kind == "scale" and len(args) == 1:
            factor = float(args[0])
            if 0.5 <= factor <= 2:
                return ViewSpec(text, _affine(scale=factor))
    except ValueError:
        pass
    raise ConfigError(
        f"unknown view {text!r}; valid: hflip, vflip, shift:DX:DY (pixels), "
        "rotate:DEGREES (|a| <= 45), scale:FACTOR (0.5 to 2)", field="model.views")


def _affine(*, angle: float = 0.0, translate: list[int] | None = None,
            scale: float = 1.0) -> View:
    def view(x: torch.Tensor) -> torch.Tensor:
        return tvf.affine(x, angle=angle, translate=translate or [0, 0], scale=scale,
                          shear=[0.0, 0.0])

    return view
