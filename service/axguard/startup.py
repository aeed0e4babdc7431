"""Start-up tuning of the serving process: torch's threads before the model loads, then
chosen by measurement after the warm-up (threads.py holds the rule; the transport's cost
comes from a real loopback round trip, transport_cost.py)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import Settings
from .engine import CheckItem, Engine
from .threads import (
    ThreadChoice,
    candidate_threads,
    choose_threads,
    measure_threads,
    usable_cores,
)
from .transport_cost import transport_seconds_per_request

log = logging.getLogger("axguard.server")


def configure_torch(settings: Settings) -> None:
    """Set torch's intra-op threads before the model loads: `model.torch_threads`, else
    one less than the usable cores (at least 1) until the warm-up measures the best count
    (`start_serving`)."""
    torch.set_num_threads(settings.model.torch_threads or max(1, usable_cores() - 1))


def choose_torch_threads(settings: Settings, engine: Engine, warm: Any) -> ThreadChoice:
    """Set torch's intra-op threads: `model.torch_threads` when configured, else the count
    with the shortest measured batch cycle (threads.choose_threads), timing a batch of
    min(max_batch_size, max_workers) images (the largest batch single Checks can form) and
    a loopback round trip of the transport. GPU models keep cores − 1."""
    cores = usable_cores()
    if settings.model.torch_threads:
        choice = ThreadChoice(settings.model.torch_threads, "configured")
    elif engine.bundle.device.type != "cpu":
        choice = ThreadChoice(max(1, cores - 1), "device")
    else:
        batch = min(settings.batching.max_batch_size, settings.server.max_workers)
        images = torch.rand(batch, *engine.bundle.spec.shape,
                            generator=torch.Generator().manual_seed(0))
        items = [CheckItem(image) for image in images]
        timings = measure_threads(lambda: engine.check(items), candidate_threads(cores))
        transport = transport_seconds_per_request(engine.bundle, images[0], warm)
        choice = ThreadChoice(choose_threads(timings, transport, batch, cores), "measured",
                              batch, timings, transport)
    torch.set_num_threads(choice.threads)
    log.info("torch_threads", extra={"threads": choice.threads, "source": choice.source,
                                     "choice": choice.describe()})
    return choice
