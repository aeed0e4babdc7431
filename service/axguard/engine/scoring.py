"""The paper's formulas as small pure tensor functions, one place each.

Shapes: N images, C classes, images (N, K, H, W) float32 in pixel space [0, 1].
Reference: Tjoa et al., section 2 (eq. 1) and section 3 (eq. 5); DESIGN.md section 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InvalidInput


def kappa(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return the score constants κ, (N, C) float32: 1 at the target, -1/(C-1) elsewhere.

    Paper eq. (5). `targets` is (N,) int64: the predicted class for the label-free score,
    the true label for the paper's labelled score.
    """
    if num_classes < 2:
        raise ValueError("kappa needs at least two classes")
    off = -1.0 / (num_classes - 1)
    k = torch.full((targets.shape[0], num_classes), off, dtype=torch.float32)
    k[torch.arange(targets.shape[0]), targets.to(torch.long).cpu()] = 1.0
    return k.to(targets.device)


def normalise_heatmaps(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (h / max|h| per image, zero mask (N,) bool).

    One scalar per image over all channels and pixels (DESIGN 1.3). An all-zero heatmap
    stays all zero (never NaN) and is reported in the mask.
    """
    flat = heatmaps.reshape(heatmaps.shape[0], -1)
    peak = flat.abs().amax(dim=1)
    zero = peak == 0
    scale = torch.where(zero, torch.ones_like(peak), peak)
    shape = (-1,) + (1,) * (heatmaps.dim() - 1)
    return heatmaps / scale.reshape(shape), zero


def ax_sum(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Return x + h, the paper's AX process (no clipping)."""
    return x + h


def ax_product(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Return x ⊙ h, the element-wise AX process (no clipping)."""
    return x * h


AX_PROCESSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": ax_sum,
    "product": ax_product,
}


def require_process(name: str, field: str = "ax_processes") -> str:
    """Return `name` if it is an AX process; else InvalidInput naming `field` and the valid
    names (the one validation of a process name)."""
    if name not in AX_PROCESSES:
        raise InvalidInput(f"unknown AX process {name!r}; valid: {', '.join(AX_PROCESSES)}",
                           field=field)
    return name


def co_score(
    logits_ax: torch.Tensor, logits_x: torch.Tensor, score_constants: torch.Tensor
) -> torch.Tensor:
    """Return the CO score κ · [f(ax(x, h)) − f(x)], (N,) float32, on raw logits (eq. 5);
    leading axes broadcast ((P, N, C) logits give (P, N))."""
    return ((logits_ax - logits_x) * score_constants).sum(dim=-1)
