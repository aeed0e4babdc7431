"""Helpers the benchmarks share: timing and the naive Captum path. No heavy imports, so a
GPU machine without the gRPC packages can use them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from captum.attr import Deconvolution, Saliency

from axguard.engine import scoring


def timed(fn: Callable[[], object], repeats: int, *,
          sync: Callable[[], None] = lambda: None,
          summary: Callable[[list[float]], float] = statistics.median) -> float:
    """Return `summary` (median by default) of fn()'s seconds over `repeats` runs after one
    warm-up run; `sync` waits for queued device work (torch.cuda.synchronize on a GPU)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return summary(times)


def naive_check(network: torch.nn.Module, x: torch.Tensor) -> None:
    """The straightforward implementation: Captum classes and separate forwards."""
    with torch.inference_mode():
        logits = network(x)
    target = logits.argmax(dim=1)
    k = scoring.kappa(target, logits.shape[1])
    for method in (Saliency(network), Deconvolution(network)):
        kwargs = {"abs": False} if isinstance(method, Saliency) else {}
        h = method.attribute(x.clone().requires_grad_(True), target=target, **kwargs)
        h, _ = scoring.normalise_heatmaps(h)
        with torch.inference_mode():
            scoring.co_score(network(x + h), logits, k)
