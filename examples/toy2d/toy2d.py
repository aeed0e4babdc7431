"""The paper's section 2 toy example: GAX on a 2-D rotation classifier.

The classifier f(x) = σ(W⁻¹x) with W a rotation by θ is perfect: x = a1·x⁽¹⁾ + a2·x⁽²⁾ is
class 1 when a1 > a2. GAX uses h = w ⊙ x and maximises Δ = A − B, where (A, B) = W⁻¹(w ⊙ x).
Δ is linear in w, so k steps of gradient ascent with step η give eq. (4) exactly:

    h = (w + kη ∇_w Δ) ⊙ x,   ∇_w Δ = ((W⁻¹₁₁ − W⁻¹₂₁) x1, (W⁻¹₁₂ − W⁻¹₂₂) x2)

(the paper writes the second component as −(W⁻¹₂₂ − W⁻¹₁₂)(a1 W₂₁ + a2 W₂₂), the same thing).

Run `python examples/toy2d/toy2d.py [OUT.png]` for a plot like the paper's Fig. 1: h1 and h2
against θ for a few (a1, a2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def rotation(theta: float) -> torch.Tensor:
    """Return W, the 2×2 rotation by θ (float64)."""
    c, s = np.cos(theta), np.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def sample(theta: float, a1: float, a2: float) -> torch.Tensor:
    """Return x = a1·x⁽¹⁾ + a2·x⁽²⁾ = W (a1, a2)ᵀ in pixel (canonical) space."""
    return rotation(theta) @ torch.tensor([a1, a2], dtype=torch.float64)


def delta(w: torch.Tensor, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Return Δ = A − B with (A, B) = W⁻¹ (w ⊙ x) (paper eq. 3)."""
    a, b = torch.linalg.inv(rotation(theta)) @ (w * x)
    return a - b


def gradient_ascent(theta: float, a1: float, a2: float, steps: int, eta: float) -> torch.Tensor:
    """Return h after `steps` of gradient ascent on Δ from w = 1, by autograd."""
    x = sample(theta, a1, a2)
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(delta(w, x, theta), w)
        w = (w + eta * grad).detach().requires_grad_(True)
    return (w * x).detach()


def closed_form(theta: float, a1: float, a2: float, steps: int, eta: float) -> torch.Tensor:
    """Return h of eq. (4): (w + kη ∇_w Δ) ⊙ x with w = 1."""
    w_inv = torch.linalg.inv(rotation(theta))
    x = sample(theta, a1, a2)
    grad = torch.stack([(w_inv[0, 0] - w_inv[1, 0]) * x[0], (w_inv[0, 1] - w_inv[1, 1]) * x[1]])
    return (1 + steps * eta * grad) * x


def co_score(theta: float, a1: float, a2: float, h: torch.Tensor, slope: float = 0.01) -> float:
    """Return s = (1, −1) · [f(x + h) − f(x)] for f = LeakyReLU(W⁻¹x) (paper eq. 1)."""
    w_inv = torch.linalg.inv(rotation(theta))
    x = sample(theta, a1, a2)
    f = lambda v: torch.nn.functional.leaky_relu(w_inv @ v, slope)  # noqa: E731
    diff = f(x + h) - f(x)
    return float(diff[0] - diff[1])


def plot(out: Path, steps: int = 10, eta: float = 0.1) -> Path:
    """Write a Fig. 1-like plot: h1, h2 (and x1, x2) against θ for three (a1, a2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thetas = np.linspace(0, np.pi, 181)
    cases = [(0.95, 0.05), (0.7, 0.3), (0.55, 0.45)]
    fig, axes = plt.subplots(1, len(cases), figsize=(13, 3.8), sharey=True)
    for ax, (a1, a2) in zip(axes, cases, strict=True):
        hs = np.array([closed_form(t, a1, a2, steps, eta).numpy() for t in thetas])
        xs = np.array([sample(t, a1, a2).numpy() for t in thetas])
        ax.plot(thetas, hs[:, 0], "r-", label="h1")
        ax.plot(thetas, hs[:, 1], "b-", label="h2")
        ax.plot(thetas, xs[:, 0], "r:", label="x1")
        ax.plot(thetas, xs[:, 1], "b:", label="x2")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"a1={a1}, a2={a2}  ({steps} steps, η={eta})", fontsize=9)
        ax.set_xlabel("θ")
        ax.set_xticks([0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi],
                      ["0", "π/4", "π/2", "3π/4", "π"])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("fig1.png")
    print(plot(target))
