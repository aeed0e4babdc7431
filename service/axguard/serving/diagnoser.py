"""GAX diagnoses of one served model, configured once from the GAX settings (DESIGN 1.8).

The optimiser itself is gax.py (pure); this holds what a served diagnosis adds: defaults
(gax.GaxOptions' own), the server's limits (step cap, fallback target, concurrency), the
option checks that name the field, and a copy of the network that attribution hooks never
touch, so diagnoses run beside checks without the engine's lock. No gRPC here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields

import numpy as np
import torch

from ..config import GaxSettings
from ..engine import gax
from ..engine.gax import GaxOptions, GaxStep
from ..engine.model import ModelBundle, shared_copy
from ..errors import Busy, InvalidInput
from ..flag.artifact import CalibrationArtifact

# Option bounds: beyond them float32 overflows (3e38 streamed NaN) and nothing is gained
# (the paper uses lr 0.1 and weight 100).
MAX_LEARNING_RATE = 10.0
MAX_SIMILARITY_WEIGHT = 1e6
DEFAULTS = {f.name: f.default for f in fields(GaxOptions) if f.default is not MISSING}
"""max_steps, learning_rate, similarity_weight: GaxOptions' defaults, the one place."""


class Diagnoser:
    """Runs GAX for the served model within the GAX settings' limits."""

    def __init__(self, bundle: ModelBundle, settings: GaxSettings,
                 calibration: CalibrationArtifact | None = None) -> None:
        self.bundle = bundle
        self.settings = settings
        self.calibration = calibration
        self._running = threading.BoundedSemaphore(settings.max_concurrent)
        self._network: torch.nn.Module | None = None
        self._network_lock = threading.Lock()

    @property
    def network(self) -> torch.nn.Module:
        """The network for GAX: a copy sharing the served weights (never hooked)."""
        if self._network is None:
            with self._network_lock:
                if self._network is None:
                    self._network = (self.bundle.network if not self.bundle.hookable
                                     else shared_copy(self.bundle.network))
        return self._network

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (N, classes) of (N, C, H, W) pixels."""
        network = self.network  # copied outside inference mode: GAX needs autograd on it
        with torch.inference_mode():
            return network(x.to(self.bundle.device)).float().cpu()

    def options(self, image: torch.Tensor, *, target_class: int | None = None,
                target_co: float | None = None, max_steps: int | None = None,
                learning_rate: float | None = None,
                similarity_weight: float | None = None) -> GaxOptions:
        """Return validated options with defaults filled in: the predicted class; the
        calibration's GAX target, else the settings' default; GaxOptions' own defaults.
        Raises InvalidInput naming the field."""
        if target_class is None:
            target_class = int(self.predict(image[None]).argmax(dim=1)[0])
        elif not 0 <= target_class < self.bundle.num_classes:
            raise InvalidInput(
                f"{target_class} is out of range [0, {self.bundle.num_classes - 1}]",
                field="target_class")
        if target_co is None:
            target_co = (self.calibration.gax_target if self.calibration is not None
                         else self.settings.default_target_co)
        if not np.isfinite(target_co):
            raise InvalidInput("must be finite", field="target_co")
        max_steps = DEFAULTS["max_steps"] if max_steps is None else max_steps
        cap = self.settings.max_steps_cap
        if not 1 <= max_steps <= cap:
            raise InvalidInput(f"{max_steps} is outside [1, {cap}]", field="max_steps")
        learning_rate = DEFAULTS["learning_rate"] if learning_rate is None else learning_rate
        if not (np.isfinite(learning_rate) and 0 < learning_rate <= MAX_LEARNING_RATE):
            raise InvalidInput(f"must be in (0, {MAX_LEARNING_RATE:g}]", field="learning_rate")
        similarity_weight = (DEFAULTS["similarity_weight"] if similarity_weight is None
                             else similarity_weight)
        if not (np.isfinite(similarity_weight)
                and 0 <= similarity_weight <= MAX_SIMILARITY_WEIGHT):
            raise InvalidInput(f"must be in [0, {MAX_SIMILARITY_WEIGHT:g}]",
                               field="similarity_weight")
        return GaxOptions(target_class, float(target_co), max_steps, learning_rate,
                          similarity_weight)

    def snapshot_every(self, requested: int, options: GaxOptions) -> int:
        """Return the snapshot period: 0 = none; raised so a stream holds at most
        settings.max_snapshots snapshots."""
        if requested < 0:
            raise InvalidInput("must be >= 0", field="snapshot_every")
        if not requested:
            return 0
        return max(requested, -(-options.max_steps // self.settings.max_snapshots))

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of settings.max_concurrent diagnosis slots; Busy when none is free."""
        if not self._running.acquire(blocking=False):
            raise Busy(f"{self.settings.max_concurrent} diagnoses are already running; "
                       "retry later", field="diagnose")
        try:
            yield
        finally:
            self._running.release()

    def run(self, image: torch.Tensor, options: GaxOptions,
            should_stop: Callable[[], bool] = lambda: False) -> Iterator[GaxStep]:
        """Yield the GAX steps for one (C, H, W) image (see gax.diagnose)."""
        yield from gax.diagnose(self.network, image.to(self.bundle.device), options,
                                should_stop=should_stop)
