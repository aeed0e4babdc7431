"""Wiring settings to a ready engine: model bundle, then engine. No transport here."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import AttributionSettings, ModelSettings, Settings
from .engine.core import Engine
from .engine.model import InputSpec, ModelBundle, load_bundle, read_class_names, timm_defaults
from .errors import ConfigError
from .flag.artifact import load_artifact

log = logging.getLogger(__name__)


def build_bundle(model: ModelSettings, attribution: AttributionSettings) -> ModelBundle:
    """Return the model bundle described by the settings (the demo model for "demo")."""
    if model.source == "demo":
        from .demo.bundle import load_demo_bundle

        return load_demo_bundle(device=model.device, grad_cam_layer=attribution.grad_cam_layer)
    # timm's pretrained configuration (shipped with timm) gives its architectures' input
    # size and normalisation when the settings do not.
    timm_cfg = timm_defaults(model.source[5:]) if model.source.startswith("timm:") else None
    input_size = model.input_size
    if input_size is None and timm_cfg is not None and model.channels == timm_cfg[0][0]:
        input_size = list(timm_cfg[0][1:])
    if input_size is None:
        raise ConfigError("the input size is required for your own model",
                          field="model.input_size")
    if len(input_size) not in (1, 2):
        raise ConfigError("give one (square) or two (H W) sizes", field="model.input_size")
    height, width = input_size[0], input_size[-1]
    timm_norm = timm_cfg is not None and len(timm_cfg[1]) == model.channels
    # Else torchvision's ImageNet statistics, the usual defaults of its models.
    mean = model.mean or (list(timm_cfg[1]) if timm_norm else
                          [0.485, 0.456, 0.406] if model.channels == 3 else [0.5])
    std = model.std or (list(timm_cfg[2]) if timm_norm else
                        [0.229, 0.224, 0.225] if model.channels == 3 else [0.5])
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
        "format": bundle.model_format, "device": str(bundle.device),
    })
    log_method_report(engine)
    return engine


def log_method_report(engine: Engine) -> None:
    """Log what each method is on this model; warn when a default method is not exact or
    two default methods are one in effect."""
    for status in engine.method_report:
        log.info("method", extra={"method": status.method, "state": status.state,
                                  "reduced_to": status.reduced_to, "reason": status.reason})
    by_name = {s.method: s for s in engine.method_report}
    for name in engine.default_methods:
        status = by_name[name]
        if status.state != "exact":
            log.warning("default_method_not_exact", extra={
                "method": name, "state": status.state, "reduced_to": status.reduced_to,
                "reason": status.reason})
