"""Wiring settings to a ready engine: model bundle, then engine. No transport here."""

from __future__ import annotations

import logging
from pathlib import Path

from .calibration.artifact import load_artifact
from .config import AttributionSettings, ModelSettings, Settings
from .engine import Engine
from .errors import ConfigError
from .model import InputSpec, ModelBundle, load_bundle, read_class_names

log = logging.getLogger(__name__)


def build_bundle(model: ModelSettings, attribution: AttributionSettings) -> ModelBundle:
    """Return the model bundle described by the settings (the demo model for "demo")."""
    if model.source == "demo":
        from .demo.bundle import load_demo_bundle

        return load_demo_bundle(device=model.device, grad_cam_layer=attribution.grad_cam_layer)
    if model.input_size is None:
        raise ConfigError("the input size is required for your own model",
                          field="model.input_size")
    if len(model.input_size) not in (1, 2):
        raise ConfigError("give one (square) or two (H W) sizes", field="model.input_size")
    height, width = model.input_size[0], model.input_size[-1]
    # torchvision's ImageNet statistics are the usual defaults of its models.
    mean = model.mean or ([0.485, 0.456, 0.406] if model.channels == 3 else [0.5])
    std = model.std or ([0.229, 0.224, 0.225] if model.channels == 3 else [0.5])
    spec = InputSpec(model.channels, height, width, tuple(mean), tuple(std))
    names = read_class_names(model.classes, model.num_classes)
    return load_bundle(
        model.source, spec=spec, class_names=names, weights=model.weights, name=model.name,
        version=model.version, device=model.device, grad_cam_layer=attribution.grad_cam_layer,
    )


def calibration_path(settings: Settings) -> Path | None:
    """Return the calibration file to load: the configured one, or the demo's bundled one."""
    value = settings.calibration
    if value is not None:
        return None if value.lower() == "none" else Path(value)
    if settings.model.source == "demo":
        from .demo.bundle import ASSETS

        bundled = ASSETS / "calibration.json"
        return bundled if bundled.exists() else None
    return None


def build_engine(settings: Settings) -> Engine:
    """Return an engine for the configured model and calibration (not yet warmed up)."""
    bundle = build_bundle(settings.model, settings.attribution)
    path = calibration_path(settings)
    calibration = load_artifact(path) if path is not None else None
    engine = Engine(bundle, settings.attribution.default_methods, calibration)
    if calibration is not None:
        log.info("calibration_loaded", extra={
            "calibration_id": calibration.calibration_id, "path": str(path),
            "mode": calibration.threshold.mode, "target": calibration.threshold.target,
            "threshold": calibration.threshold.value})
    log.info("model_loaded", extra={
        "model": bundle.name, "version": bundle.version, "fingerprint": bundle.fingerprint,
        "classes": bundle.num_classes, "input_shape": list(bundle.spec.shape),
        "torchscript": bundle.torchscript, "device": str(bundle.device),
    })
    return engine
