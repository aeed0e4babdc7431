"""GAX: Generative Augmentative eXplanation (paper section 3, DESIGN 1.8).

A heatmap h = tanh(w ⊙ x + b) is optimised so that the model's confidence in a class rises:
loss = −s_co + λ / mean((h − x + ε)² / (x + ε)), with s_co = κ · [f(x + h) − f(x)] on raw
logits, w initialised to 1, b the constant 0.01, Adam (lr 0.1, betas 0.9/0.999). The model's
weights are frozen. Every step reports the CO score, loss and heatmap of the *same*
parameters; the run stops when s_co ≥ target or at the step cap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import scoring

EPSILON = 1e-4
BIAS = 0.01


@dataclass(frozen=True)
class GaxOptions:
    """Options of one diagnosis."""

    target_class: int
    target_co: float
    max_steps: int = 500
    learning_rate: float = 0.1
    similarity_weight: float = 100.0


@dataclass
class GaxStep:
    """The state after `step` optimiser steps (step 0 = the initial parameters)."""

    step: int
    co_score: float
    loss: float
    similarity: float
    """mean((h − x + ε)² / (x + ε)): how far h is from x."""
    heatmap: torch.Tensor
    """(C, H, W) float32 in [−1, 1], from the same parameters as co_score."""
    final: bool = False
    reached_target: bool = False
    seconds: float = 0.0


def similarity(h: torch.Tensor, x: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """Return mean((h − x + ε)² / (x + ε)), the reference code's distance of h from x."""
    return ((h - x + eps) ** 2 / (x + eps)).mean()


def gax_loss(co: torch.Tensor, sim: torch.Tensor, weight: float) -> torch.Tensor:
    """Return −s_co + λ / similarity (DESIGN 1.8)."""
    return -co + weight / sim


def gax_heatmap(w: torch.Tensor, x: torch.Tensor, bias: float = BIAS) -> torch.Tensor:
    """Return h = tanh(w ⊙ x + b), in [−1, 1]."""
    return torch.tanh(w * x + bias)


def diagnose(
    network: nn.Module,
    x: torch.Tensor,
    options: GaxOptions,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[GaxStep]:
    """Yield one GaxStep per optimiser step; the last has final=True.

    `x` is (C, H, W) float32 in [0, 1]. `should_stop` is polled once per step (a cancelled
    or expired request): the generator then ends without a final step.
    """
    start = time.perf_counter()
    x = x.detach()[None]
    with torch.inference_mode():
        base = network(x).float()
    base = base.clone()
    kappa = scoring.kappa(torch.tensor([options.target_class], device=x.device),
                          base.shape[1])
    w = torch.ones_like(x, requires_grad=True)
    optimiser = torch.optim.Adam([w], lr=options.learning_rate, betas=(0.9, 0.999))
    for step in range(options.max_steps + 1):
        if should_stop():
            return
        with torch.enable_grad():
            h = gax_heatmap(w, x)
            co = scoring.co_score(network(scoring.ax_sum(x, h)).float(), base, kappa)[0]
            sim = similarity(h, x)
            loss = gax_loss(co, sim, options.similarity_weight)
        co_value, loss_value, sim_value = (float(v.detach()) for v in (co, loss, sim))
        reached = co_value >= options.target_co
        final = reached or step == options.max_steps
        yield GaxStep(step=step, co_score=co_value, loss=loss_value, similarity=sim_value,
                      heatmap=h.detach()[0].cpu(), final=final, reached_target=reached,
                      seconds=time.perf_counter() - start)
        if final:
            return
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
