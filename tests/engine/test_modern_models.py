"""Modern image models: the modified backward rules at every rectifying activation (against a
hand computation), what each method is on a model (exact, reduced, unavailable, and why),
timm sources, safetensors weights, torch.export programs, and small ConvNeXt / ViT /
MobileNetV3 / EfficientNet networks trained on the digits, checked end to end."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import Deconvolution, GuidedBackprop, Saliency
from safetensors.torch import save_file
from torch import nn

from axguard.builder import build_bundle
from axguard.calibration.calibrate import calibrate
from axguard.calibration.datasets import load_labelled_images
from axguard.config import AttributionSettings, ModelSettings
from axguard.demo.data import load_split
from axguard.engine import attribution
from axguard.engine.core import CheckItem, Engine
from axguard.engine.model import InputSpec, ModelBundle, load_bundle, wrap_network
from axguard.engine.sharedpass import SharedPass
from axguard.errors import ConfigError, InvalidInput, ModelLoadError
from axguard.transport.v1.converters import model_info
from axguard_client import AxguardClient, InvalidArgument
from axguard_client.v1 import confidence_pb2 as pb
from conftest import EXAMPLES, RunningServer

DIGITS = InputSpec(3, 32, 32, (0.3, 0.3, 0.3), (0.3, 0.3, 0.3))
CLASSES = [str(d) for d in range(10)]
UNIT = InputSpec(1, 1, 2, (0.0,), (1.0,))


# The rules against a hand computation ---------------------------------------------------

def gelu_slope(u: float) -> float:
    """d/du u·Φ(u) = Φ(u) + u·φ(u)."""
    return 0.5 * (1 + math.erf(u / math.sqrt(2))) + u * math.exp(-u * u / 2) / math.sqrt(
        2 * math.pi)


def hardswish_slope(u: float) -> float:
    return 0.0 if u < -3 else 1.0 if u > 3 else (2 * u + 3) / 6


@pytest.mark.parametrize(("activation", "slope"), [(nn.GELU(), gelu_slope),
                                                   (nn.Hardswish(), hardswish_slope)])
def test_the_rules_at_a_smooth_activation_match_a_hand_computation(activation, slope):
    """z = W2 · f(W1 x) on a two-pixel image; for class c the gradient reaching f's output
    is R = W2[c], so by hand: plain W1ᵀ(R·f'), deconvolution W1ᵀ max(R, 0), guided
    W1ᵀ(max(R, 0)·max(f', 0))."""
    w1 = torch.tensor([[1.5, -2.0], [-0.5, -1.0]])
    w2 = torch.tensor([[0.7, -1.3], [-0.4, 0.9]])
    first, second = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    first.weight.data, second.weight.data = w1.clone(), w2.clone()
    net = wrap_network(nn.Sequential(nn.Flatten(), first, activation, second), UNIT)
    x = torch.tensor([[[[0.8, 0.3]]]])
    u = (w1 @ x.flatten()).tolist()  # [0.6, -0.7]: GELU's slope is negative at neither,
    slopes = torch.tensor([slope(v) for v in u])  # Hardswish's at -0.7 is positive too
    target = 0
    r = w2[target]
    expected = {
        "plain": w1.T @ (r * slopes),
        "deconvolution": w1.T @ torch.relu(r),
        "guided": w1.T @ (torch.relu(r) * torch.relu(slopes)),
    }
    shared = SharedPass(net)
    leaf, logits = shared.forward(x)
    k = torch.nn.functional.one_hot(torch.tensor([target]), 2)
    got = shared.gradients(leaf, logits, [(rule, k) for rule in expected])
    for (rule, want), grad in zip(expected.items(), got, strict=True):
        torch.testing.assert_close(grad.flatten(), want, atol=1e-6, rtol=1e-5, msg=rule)
    # The registry's own heatmap functions (the path without the shared pass) agree.
    bundle = ModelBundle(net, UNIT, ["a", "b"], "tiny", "1", "0")
    for method, rule in (("deconvolution", "deconvolution"), ("guided_backprop", "guided")):
        heatmap = attribution.get_method(method).build(bundle)(x, torch.tensor([target]))
        torch.testing.assert_close(heatmap.flatten(), expected[rule], atol=1e-6, rtol=1e-5)


def test_guided_drops_a_negative_slope():
    """GELU's slope is negative below about -0.75: guided passes nothing there, plain
    passes the negative product."""
    net = wrap_network(nn.Sequential(nn.Flatten(), nn.GELU()), UNIT)
    x = torch.tensor([[[[-1.5, 1.0]]]]) + 0.0
    shared = SharedPass(nn.Sequential(net, nn.Identity()))
    leaf, logits = shared.forward(x)
    k = torch.tensor([[1.0, 1.0]])
    plain, guided = shared.gradients(leaf, logits, [("plain", k), ("guided", k)])
    assert plain.flatten()[0] < 0 and guided.flatten()[0] == 0
    assert guided.flatten()[1] == pytest.approx(gelu_slope(1.0), rel=1e-5)


def test_on_relu_networks_the_rules_are_captums(demo_bundle):
    x = torch.rand(4, *demo_bundle.spec.shape, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 3, 5, 7])
    shared = SharedPass(demo_bundle.network)
    leaf, logits = shared.forward(x)
    ours = shared.heatmaps(leaf, logits, targets, ["saliency", "deconvolution",
                                                   "guided_backprop"])
    for name, cls in (("saliency", Saliency), ("deconvolution", Deconvolution),
                      ("guided_backprop", GuidedBackprop)):
        kwargs = {"abs": False} if cls is Saliency else {}
        captum = cls(demo_bundle.network).attribute(x.clone().requires_grad_(True),
                                                    target=targets, **kwargs)
        torch.testing.assert_close(ours[name], captum, atol=1e-6, rtol=1e-5, msg=name)


# Sources and weights --------------------------------------------------------------------

def saved_state(network: nn.Module, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    else:
        torch.save(network.state_dict(), path)
    return path


def test_timm_with_safetensors_weights_takes_timms_input_defaults(tmp_path):
    import timm

    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    weights = saved_state(net, tmp_path / "r18.safetensors")
    bundle = build_bundle(ModelSettings(source="timm:resnet18", weights=weights,
                                        num_classes=3), AttributionSettings())
    assert bundle.spec.shape == (3, 224, 224)  # timm's pretrained configuration
    assert bundle.spec.mean == (0.485, 0.456, 0.406) and bundle.name == "resnet18"
    engine = Engine(bundle)
    (result,) = engine.check([CheckItem(torch.rand(3, 224, 224))])
    assert all(np.isfinite(s.score) for s in result.scores)
    small = build_bundle(ModelSettings(source="timm:resnet18", weights=weights,
                                       num_classes=3, input_size=[64]), AttributionSettings())
    assert small.spec.shape == (3, 64, 64)
    with pytest.raises(ConfigError, match="timm has no architecture 'resnet_nonesuch'"):
        build_bundle(ModelSettings(source="timm:resnet_nonesuch", weights=weights,
                                   num_classes=3), AttributionSettings())


def test_broken_safetensors_are_a_load_error_naming_the_weights(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelLoadError) as info:
        load_bundle("torchvision:resnet18", spec=DIGITS, class_names=CLASSES, weights=bad)
    assert info.value.field == "model.weights"


def export(network: nn.Module, path: Path, batch: int = 2, dynamic: bool = True) -> Path:
    example = (torch.rand(batch, *DIGITS.shape),)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(network.eval(), example, dynamic_shapes=shapes),
                      str(path))
    return path


@pytest.mark.parametrize("dynamic", [True, False], ids=["any-batch", "batch-1"])
def test_an_exported_program_serves_gradient_methods_and_refuses_the_others(
        tmp_path, dynamic):
    from modern_models import gelu_cnn

    network = gelu_cnn().eval()
    path = export(network, tmp_path / "gelu_cnn.pt2", batch=2 if dynamic else 1,
                  dynamic=dynamic)
    bundle = load_bundle(str(path), spec=DIGITS, class_names=CLASSES, weights=None)
    assert bundle.exported and bundle.model_format == "exported_program"
    engine = Engine(bundle, default_methods=("saliency", "input_x_gradient"))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = engine.check([CheckItem(img) for img in x])
    with torch.no_grad():
        expected = wrap_network(network, DIGITS)(x).argmax(1).tolist()
    assert [r.class_index for r in results] == expected
    for method in ("deconvolution", "guided_backprop", "deep_lift", "layer_grad_cam"):
        with pytest.raises(InvalidInput, match=rf"{method} needs module hooks, which an "
                                               r"ExportedProgram \(.pt2\) lacks"):
            engine.resolve(CheckItem(x[0], methods=(method,)))
    states = {s.method: s.state for s in engine.method_report}
    assert states == {"saliency": "exact", "input_x_gradient": "exact",
                      "deconvolution": "unavailable", "guided_backprop": "unavailable",
                      "deep_lift": "unavailable", "layer_grad_cam": "unavailable"}


def test_a_pt2_that_would_unpickle_is_refused(tmp_path):
    from modern_models import gelu_cnn

    good = export(gelu_cnn().eval(), tmp_path / "good.pt2")
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                for entry in config["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ModelLoadError, match="pickled, which loading would execute"):
        load_bundle(str(tampered), spec=DIGITS, class_names=CLASSES, weights=None)
    not_an_archive = tmp_path / "x.pt2"
    not_an_archive.write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="not a torch.export archive"):
        load_bundle(str(not_an_archive), spec=DIGITS, class_names=CLASSES, weights=None)


# What each method is --------------------------------------------------------------------

def bundle_of(factory: str, tmp_path: Path, network: nn.Module | None = None,
              spec: InputSpec = DIGITS) -> ModelBundle:
    import importlib

    module, _, name = factory.partition(":")
    network = network or getattr(importlib.import_module(module), name)()
    weights = saved_state(network, tmp_path / f"{name}.safetensors")
    return load_bundle(factory, spec=spec, class_names=CLASSES, weights=weights)


def report_of(bundle: ModelBundle) -> dict[str, attribution.MethodStatus]:
    return {s.method: s for s in attribution.method_report(bundle)}


def test_the_demo_models_methods_are_all_exact(demo_bundle):
    report = report_of(demo_bundle)
    assert {s.state for s in report.values()} == {"exact"}
    assert report["deconvolution"].reason.startswith("the deconvolution rule at ")
    assert "beyond ReLU" not in report["deconvolution"].reason


def test_the_report_names_what_each_method_is_on_modern_networks(tmp_path):
    convnext = report_of(bundle_of("modern_models:convnext_mini", tmp_path))
    assert convnext["deconvolution"].state == "exact"
    assert "GELU" in convnext["deconvolution"].reason and "beyond ReLU" in convnext[
        "deconvolution"].reason
    assert (convnext["deep_lift"].state, convnext["deep_lift"].reduced_to) == (
        "reduced", "input_x_gradient")
    assert "no rule for 2 GELU" in convnext["deep_lift"].reason
    mobile = report_of(bundle_of("modern_models:mobilenet_v3_mini", tmp_path))
    assert (mobile["deep_lift"].state, mobile["deep_lift"].reduced_to) == ("reduced", "")
    assert "Hardswish" in mobile["deep_lift"].reason
    linear = report_of(bundle_of("modern_models:linear_only", tmp_path))
    for method in ("deconvolution", "guided_backprop"):
        assert (linear[method].state, linear[method].reduced_to) == ("reduced", "saliency")
    untraced = bundle_of("modern_models:untraceable", tmp_path)
    assert untraced.trace.error is not None and untraced.trace.reused == ["1.act"]
    report = report_of(untraced)
    assert report["deep_lift"].state == "unavailable"
    assert "called more than once per forward (1.act)" in report["deep_lift"].reason
    assert "fx could not trace" in report["deconvolution"].reason


def test_model_info_carries_the_report(tmp_path):
    bundle = bundle_of("modern_models:convnext_mini", tmp_path)
    info = model_info(bundle, ("saliency", "deconvolution"), None,
                      Engine(bundle).method_report)
    by_method = {s.method: s for s in info.method_statuses}
    deep_lift = by_method[pb.ATTRIBUTION_METHOD_DEEP_LIFT]
    assert deep_lift.state == pb.METHOD_STATE_REDUCED
    assert deep_lift.reduced_to == pb.ATTRIBUTION_METHOD_INPUT_X_GRADIENT
    assert by_method[pb.ATTRIBUTION_METHOD_SALIENCY].state == pb.METHOD_STATE_EXACT
    assert info.model_format == "module" and len(info.method_statuses) == 6


def test_calibrate_refuses_methods_that_are_one_in_effect(tmp_path):
    engine = Engine(bundle_of("modern_models:linear_only", tmp_path))
    images = load_labelled_images("builtin:digits", CLASSES)
    with pytest.raises(ConfigError, match="deconvolution is saliency on this model") as info:
        calibrate(engine, images, pairs=[("saliency", "sum"), ("deconvolution", "sum")],
                  progress=False)
    assert info.value.field == "pairs"
    convnext = Engine(bundle_of("modern_models:convnext_mini", tmp_path))
    with pytest.raises(ConfigError, match="deep_lift is input_x_gradient on this model"):
        calibrate(convnext, images, pairs=[("input_x_gradient", "sum"), ("deep_lift", "sum")],
                  progress=False)


# Small modern networks trained on the digits, end to end --------------------------------

MODERN = ["convnext_mini", "vit_mini", "mobilenet_v3_mini", "efficientnet_mini"]


def trained(name: str, epochs: int = 4) -> nn.Module:
    import modern_models

    torch.manual_seed(0)
    network = getattr(modern_models, name)()
    x, y = load_split("train").tensors(DIGITS)
    wrapped = wrap_network(network, DIGITS)
    for param in wrapped.parameters():
        param.requires_grad_(True)
    wrapped.train()
    optimiser = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(wrapped(x[batch]), y[batch]).backward()
            optimiser.step()
    # Batch-norm statistics as an average over the training set: torchvision's MobileNetV3
    # moves them with momentum 0.01, too slowly for a few epochs.
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    if norms:
        with torch.no_grad():
            for batch in torch.arange(len(y)).split(256):
                wrapped(x[batch])
    return network.eval()


@pytest.fixture(scope="module")
def modern(tmp_path_factory) -> dict[str, ModelBundle]:
    folder = tmp_path_factory.mktemp("modern")
    # Four epochs of the digits (a ViT learns slower: six); about 20 s each here.
    return {name: bundle_of(f"modern_models:{name}", folder,
                            trained(name, epochs=6 if name == "vit_mini" else 4))
            for name in MODERN}


@pytest.mark.parametrize("name", MODERN)
def test_a_small_modern_network_checks_with_every_method(modern, name):
    bundle = modern[name]
    engine = Engine(bundle, default_methods=("saliency", "deconvolution"))
    x, y = load_split("test").tensors(DIGITS)
    accuracy = (engine.check([CheckItem(img, prediction_only=True) for img in x[:200]]))
    correct = np.mean([r.class_index == int(t) for r, t in zip(accuracy, y[:200], strict=True)])
    assert correct > 0.3, f"{name} did not learn the digits ({correct:.2f}; chance 0.1)"
    everything = tuple(m.name for m in attribution.available_methods(bundle))
    results = engine.check([CheckItem(img, methods=everything, return_heatmaps=True)
                            for img in x[:4]])
    for result in results:
        assert result.error is None
        scores = {s.method: s.score for s in result.scores}
        assert set(scores) == set(everything) and all(np.isfinite(list(scores.values())))
        # The rules act here: Deconvolution and Guided Backprop are not Saliency.
        saliency = result.heatmaps["saliency"]
        assert not torch.allclose(result.heatmaps["deconvolution"], saliency)
        assert not torch.allclose(result.heatmaps["guided_backprop"], saliency)
    # The shared pass gives what the registry's own functions give (the rules, per method).
    shared = SharedPass(bundle.network)
    leaf, logits = shared.forward(x[:4])
    targets = logits.argmax(1)
    ours = shared.heatmaps(leaf, logits, targets, ["saliency", "deconvolution",
                                                   "guided_backprop"])
    for method in ours:
        alone = attribution.get_method(method).build(bundle)(x[:4], targets)
        torch.testing.assert_close(ours[method], alone, atol=1e-5, rtol=1e-4, msg=method)
    captum = Saliency(bundle.network).attribute(x[:4].clone().requires_grad_(True),
                                                target=targets, abs=False)
    torch.testing.assert_close(ours["saliency"], captum, atol=1e-5, rtol=1e-4)


def test_gax_calibrate_and_serving_work_on_a_convnext(modern, tmp_path):
    from axguard.flag.artifact import save_artifact

    engine = Engine(modern["convnext_mini"])
    images = load_labelled_images("builtin:digits", CLASSES)
    artifact = calibrate(engine, images, n_bootstrap=20, repeats=1, progress=False)
    assert artifact.data.n_errors > 0
    path = tmp_path / "calibration.json"
    save_artifact(artifact, path)
    served = Engine(modern["convnext_mini"], calibration=artifact)
    served.warm_up()
    server = RunningServer(served)
    try:
        with AxguardClient(server.target, timeout=120) as client:
            response = client.check(EXAMPLES / "digit_4.png")
            assert response.verdict.calibrated and 0 <= response.verdict.risk <= 1
            events = list(client.diagnose(EXAMPLES / "digit_4.png", max_steps=5))
            assert events[-1].WhichOneof("event") == "result"
            info = client.model_info()
            assert {s.state for s in info.method_statuses} >= {pb.METHOD_STATE_REDUCED}
            with pytest.raises(InvalidArgument, match="methods"):  # a method id it lacks
                client.check(EXAMPLES / "digit_4.png", methods=[99])
    finally:
        server.stop()
