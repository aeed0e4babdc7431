"""Loading the bundled demo model from its committed assets."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.model import InputSpec, ModelBundle, load_bundle

ASSETS = Path(__file__).parent / "assets"


def demo_metadata() -> dict:
    """Return the demo model's model.json (spec, classes, split, measured accuracy)."""
    return json.loads((ASSETS / "model.json").read_text())


def load_demo_bundle(*, device: str = "cpu", grad_cam_layer: str | None = None) -> ModelBundle:
    """Return the demo digits CNN as a ModelBundle."""
    meta = demo_metadata()
    spec = InputSpec(
        meta["input"]["channels"], meta["input"]["height"], meta["input"]["width"],
        tuple(meta["input"]["mean"]), tuple(meta["input"]["std"]),
    )
    names = (ASSETS / "classes.txt").read_text().split()
    return load_bundle(
        meta["source"], spec=spec, class_names=names, weights=ASSETS / "weights.pt",
        name=meta["name"], version=meta["version"], device=device,
        grad_cam_layer=grad_cam_layer,
    )
