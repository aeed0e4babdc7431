"""Every classification architecture in torchvision's registry, untrained, at 64×64 (224 or
299 where 64 is too small): it loads from safetensors weights, its method report names each
of the six methods exact, reduced or unavailable, and one Check with every available method
answers with finite numbers while an unavailable one is refused by name.

Architectures over 30 M parameters are marked `heavy` and left out of `make test` (memory
and minutes each on two cores): `make test-registry` runs them all."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from axguard.engine import attribution
from axguard.engine.core import CheckItem, Engine
from axguard.engine.model import InputSpec, load_bundle
from axguard.errors import InvalidInput, ModelLoadError

# GoogLeNet and Inception v3 announce a future change of their default initialisation.
pytestmark = pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")

HEAVY_PARAMETERS = 30_000_000
SIZES = (64, 224, 299)


def parameters(name: str) -> int:
    """Parameters of an architecture, counted without memory where its init allows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.device("meta"):
                network = torchvision.models.get_model(name, weights=None, num_classes=10)
        except NotImplementedError:  # an init that copies real data
            network = torchvision.models.get_model(name, weights=None, num_classes=10)
    return sum(p.numel() for p in network.parameters())


def registry() -> list:
    params = []
    for name in torchvision.models.list_models(module=torchvision.models):
        heavy = parameters(name) > HEAVY_PARAMETERS
        params.append(pytest.param(name, marks=[pytest.mark.heavy] if heavy else []))
    return params


def load(name: str, folder) -> tuple:  # noqa: ANN001
    network = torchvision.models.get_model(name, weights=None, num_classes=10)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in network.state_dict().items()},
              str(weights))
    errors = []
    try:
        return _load_at_some_size(name, weights, errors)
    finally:
        weights.unlink()  # up to 2.5 GB for the largest: loaded, no longer needed


def _load_at_some_size(name: str, weights, errors: list) -> tuple:  # noqa: ANN001
    for size in SIZES:
        spec = InputSpec(3, size, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        try:
            return load_bundle(f"torchvision:{name}", spec=spec,
                               class_names=[str(i) for i in range(10)], weights=weights), spec
        except ModelLoadError as err:
            if err.field != "model.input_size":
                raise
            errors.append(str(err))
    raise AssertionError(f"{name} runs at none of {SIZES}: {errors}")


@pytest.mark.parametrize("name", registry())
def test_every_torchvision_classifier_answers_with_each_method_or_refuses_it(name, tmp_path):
    bundle, spec = load(name, tmp_path)
    engine = Engine(bundle, default_methods=("saliency",))
    report = {s.method: s for s in engine.method_report}
    assert set(report) == {m.name for m in attribution.list_methods()}
    for status in report.values():
        assert status.state in ("exact", "reduced", "unavailable") and status.reason
    usable = tuple(m for m, s in report.items() if s.state != "unavailable")
    image = torch.rand(spec.shape, generator=torch.Generator().manual_seed(0))
    (result,) = engine.check([CheckItem(image, methods=usable, return_heatmaps=True)])
    assert result.error is None, result.error
    assert {s.method for s in result.scores} == set(usable)
    assert all(math.isfinite(s.score) for s in result.scores)
    assert all(math.isfinite(v) for v in result.logits)
    for method, status in report.items():
        if status.state == "unavailable":
            with pytest.raises(InvalidInput, match=method):
                engine.resolve(CheckItem(image, methods=(method,)))
    saliency = result.heatmaps["saliency"]
    if report["deconvolution"].state == "exact" and saliency.abs().sum() > 0:
        # The rules act: not Saliency twice.
        assert not torch.equal(result.heatmaps["deconvolution"], saliency)
        assert not torch.equal(result.heatmaps["guided_backprop"], saliency)
