"""The engine against a hand-made pipeline, on the demo model and tiny networks."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from captum.attr import Deconvolution, Saliency
from torch import nn

from axguard.demo.data import load_split
from axguard.engine.core import CheckItem, Engine
from axguard.engine.model import InputSpec, ModelBundle, wrap_network
from axguard.errors import ConfigError, InvalidInput, UnknownMethod


@pytest.fixture(scope="module")
def test_images(demo_bundle):
    x, y = load_split("test").tensors(demo_bundle.spec)
    return x[:12], y[:12]


def expected_scores(bundle, x, method_cls, process, target_for_kappa=None, **kwargs):
    """The pipeline written out longhand for one method: the reference for the engine."""
    network = bundle.network
    with torch.no_grad():
        logits = network(x)
    predicted = logits.argmax(dim=1)
    raw = method_cls(network).attribute(x.clone().requires_grad_(True), target=predicted,
                                        **kwargs)
    peak = raw.abs().reshape(len(x), -1).max(dim=1).values.reshape(-1, 1, 1, 1)
    h = raw / peak
    ax = x + h if process == "sum" else x * h
    with torch.no_grad():
        moved = network(ax) - logits
    targets = predicted if target_for_kappa is None else target_for_kappa
    c = logits.shape[1]
    k = torch.full_like(logits, -1.0 / (c - 1))
    k[torch.arange(len(x)), targets] = 1.0
    return (moved * k).sum(dim=1), h


@pytest.mark.parametrize("process", ["sum", "product"])
def test_engine_scores_equal_the_longhand_pipeline(demo_engine, test_images, process):
    x, _ = test_images
    results = demo_engine.check([CheckItem(img, ax_processes=[process], return_heatmaps=True)
                                 for img in x])
    for method, cls, kwargs in (("saliency", Saliency, {"abs": False}),
                                ("deconvolution", Deconvolution, {})):
        expected, h = expected_scores(demo_engine.bundle, x, cls, process, **kwargs)
        got = torch.tensor([next(s.score for s in r.scores if s.method == method)
                            for r in results])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(results[0].heatmaps[method], h[0])


def test_prediction_fields(demo_engine, test_images):
    x, y = test_images
    results = demo_engine.check([CheckItem(img) for img in x])
    with torch.no_grad():
        logits = demo_engine.bundle.network(x)
    for r, row in zip(results, logits, strict=True):
        assert r.class_index == int(row.argmax())
        assert r.class_name == str(r.class_index)
        assert r.probability == pytest.approx(float(torch.softmax(row, 0).max()), rel=1e-5)
        assert sum(r.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert [(s.method, s.ax_process) for s in r.scores] == [
            ("saliency", "sum"), ("deconvolution", "sum")]
        assert all(s.labelled_score is None for s in r.scores)
        assert r.heatmaps == {}
    assert sum(r.class_index == int(t) for r, t in zip(results, y, strict=True)) >= 10


def test_labelled_score_uses_the_given_label(demo_engine, test_images):
    x, _ = test_images
    plain = demo_engine.check([CheckItem(x[0], methods=["saliency"])])[0]
    predicted = plain.class_index
    other = (predicted + 1) % 10
    right = demo_engine.check([CheckItem(x[0], methods=["saliency"], label=predicted)])[0]
    wrong = demo_engine.check([CheckItem(x[0], methods=["saliency"], label=other)])[0]
    assert right.scores[0].labelled_score == pytest.approx(right.scores[0].score)
    expected, _ = expected_scores(demo_engine.bundle, x[:1], Saliency, "sum",
                                  target_for_kappa=torch.tensor([other]), abs=False)
    assert wrong.scores[0].labelled_score == pytest.approx(float(expected[0]), rel=1e-4)
    assert wrong.scores[0].score == pytest.approx(plain.scores[0].score, rel=1e-5)


def test_mixed_batch_equals_single_checks(demo_engine, test_images):
    x, _ = test_images
    items = [
        CheckItem(x[0]),
        CheckItem(x[1], methods=["deep_lift", "saliency"], ax_processes=["product", "sum"]),
        CheckItem(x[2], methods=["layer_grad_cam"], label=3),
        CheckItem(x[3], methods=["guided_backprop", "input_x_gradient"]),
    ]
    batched = demo_engine.check(items)
    for item, got in zip(items, batched, strict=True):
        alone = demo_engine.check([item])[0]
        assert [(s.method, s.ax_process) for s in got.scores] == [
            (s.method, s.ax_process) for s in alone.scores]
        for a, b in zip(got.scores, alone.scores, strict=True):
            assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-4)
            assert (a.labelled_score is None) == (b.labelled_score is None)


def test_concurrent_checks_equal_serial_ones(demo_engine, test_images):
    x, _ = test_images
    items = [CheckItem(img, methods=["saliency", "deconvolution", "guided_backprop"])
             for img in x]
    serial = [demo_engine.check([item])[0] for item in items]
    with ThreadPoolExecutor(max_workers=6) as pool:
        parallel = list(pool.map(lambda item: demo_engine.check([item])[0], items * 3))
    for i, result in enumerate(parallel):
        reference = serial[i % len(items)]
        for a, b in zip(result.scores, reference.scores, strict=True):
            assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)


def constant_bundle() -> ModelBundle:
    """A model whose logits do not depend on the input: every gradient heatmap is zero."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    spec = InputSpec(3, 2, 2, (0.0,) * 3, (1.0,) * 3)
    return ModelBundle(wrap_network(net, spec), spec, ["a", "b", "c"], "constant", "1", "0")


@pytest.mark.parametrize("process", ["sum", "product"])
def test_zero_heatmap_scores_zero_not_nan(process):
    engine = Engine(constant_bundle())
    result = engine.check([CheckItem(torch.rand(3, 2, 2), ax_processes=[process], label=2)])[0]
    assert result.class_index == 1
    assert engine.zero_heatmaps == {"saliency": 1, "deconvolution": 1}
    for score in result.scores:
        assert score.zero_heatmap
        assert score.score == 0.0
        assert score.labelled_score == 0.0


@pytest.mark.parametrize(
    ("item", "error", "field"),
    [
        (CheckItem(torch.rand(3, 16, 16)), InvalidInput, "image"),
        (CheckItem(torch.full((3, 32, 32), float("nan"))), InvalidInput, "image"),
        (CheckItem(torch.rand(3, 32, 32), methods=["occlusion"]), UnknownMethod, "methods"),
        (CheckItem(torch.rand(3, 32, 32), ax_processes=["divide"]), InvalidInput,
         "ax_processes"),
        (CheckItem(torch.rand(3, 32, 32), label=10), InvalidInput, "label"),
        (CheckItem(torch.rand(3, 32, 32), label=-1), InvalidInput, "label"),
    ],
)
def test_bad_items_are_refused_naming_the_field(demo_engine, item, error, field):
    with pytest.raises(error) as info:
        demo_engine.check([item])
    assert info.value.field == field


def test_unknown_default_method_is_a_config_error(demo_bundle):
    with pytest.raises(UnknownMethod):
        Engine(demo_bundle, default_methods=["occlusion"])
    with pytest.raises(ConfigError):
        Engine(demo_bundle, default_methods=[])


def test_engine_modules_do_not_import_grpc():
    code = (
        "import sys\n"
        "import axguard.engine, axguard.builder, axguard.config, axguard.demo.bundle\n"
        "import axguard.engine.preprocess, axguard.engine.attribution, axguard.engine.scoring\n"
        "import axguard.engine.model, axguard.flag, axguard.serving\n"
        "assert not any(m == 'grpc' or m.startswith('grpc.') for m in sys.modules), 'grpc'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resolve_scans_an_image_once(demo_engine, demo_bundle):
    # A decoder that validated the image marks it; resolve then trusts it (the NaN scan
    # ran once, at the edge). Unmarked images are still checked.
    from axguard.config import load_settings
    from axguard.engine.core import ResolvedItem
    from axguard.serving.dataplane import input_limits
    from axguard.transport.v1.converters import request_to_item
    from axguard_client.v1 import confidence_pb2 as pb

    image = torch.rand(demo_bundle.spec.shape)
    request = pb.CheckRequest(image=pb.Image(tensor=pb.Tensor(
        shape=list(image.shape), data=image.numpy().astype("<f4").tobytes())))
    item = request_to_item(request, demo_bundle, input_limits(load_settings()))
    assert item.image_checked
    resolved = demo_engine.resolve(item)
    assert isinstance(resolved, ResolvedItem) and demo_engine.resolve(resolved) is resolved
    with pytest.raises(InvalidInput, match="NaN"):
        demo_engine.resolve(CheckItem(torch.full(demo_bundle.spec.shape, float("nan"))))


def test_default_pairs_are_what_resolve_gives_an_item_without_options(demo_engine, demo_bundle):
    resolved = demo_engine.resolve(CheckItem(torch.rand(demo_bundle.spec.shape)))
    pairs = tuple((m, p) for m in resolved.methods for p in resolved.ax_processes)
    assert demo_engine.default_pairs == pairs == (("saliency", "sum"), ("deconvolution", "sum"))
