"""Attribution methods: the registry, Deconvolution against a hand-written one, ReLU rewiring."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from captum.attr import Deconvolution, DeepLift
from torch import nn

from axguard.engine import attribution
from axguard.engine.activations import make_activations_unique
from axguard.engine.model import InputSpec, load_bundle, wrap_network
from axguard.errors import UnknownMethod

IMAGENET = InputSpec(3, 64, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _DeconvRelu(torch.autograd.Function):
    """ReLU whose backward passes max(grad, 0) whatever the input was (Zeiler & Fergus)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad.clamp(min=0)


def hand_deconvolution(network: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient of the target logits with every ReLU backward replaced by a clamp."""
    for module in network.modules():
        if isinstance(module, nn.ReLU):
            module.forward = _DeconvRelu.apply  # type: ignore[method-assign]
    x = x.clone().requires_grad_(True)
    network(x).gather(1, target[:, None]).sum().backward()
    return x.grad.detach()


def resnet18_weights(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_deconvolution_on_resnet_with_reused_relu_equals_hand_written(tmp_path):
    net, _ = resnet18_weights(tmp_path)
    assert net.layer1[0].relu is net.layer1[0].relu  # one module, called twice per block
    model = wrap_network(net, IMAGENET)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3])
    captum = Deconvolution(model).attribute(x.clone().requires_grad_(True), target=target)
    reference_model = wrap_network(torchvision.models.resnet18(num_classes=5), IMAGENET)
    reference_model.load_state_dict(model.state_dict())
    expected = hand_deconvolution(reference_model, x, target)
    torch.testing.assert_close(captum, expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().sum() > 0


def test_registry_deconvolution_on_loaded_resnet_equals_hand_written(tmp_path):
    _, path = resnet18_weights(tmp_path)
    bundle = load_bundle("torchvision:resnet18", spec=IMAGENET, class_names=list("abcde"),
                         weights=path)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 4])
    ours = attribution.get_method("deconvolution").build(bundle)(x, target)
    reference = wrap_network(torchvision.models.resnet18(num_classes=5), IMAGENET)
    reference[1].load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(ours, hand_deconvolution(reference, x, target),
                               rtol=1e-4, atol=1e-6)


def test_make_activations_unique_gives_each_call_site_its_own_module_and_keeps_outputs(tmp_path):
    net, _ = resnet18_weights(tmp_path)
    net.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
    rewired, _ = make_activations_unique(net)
    calls: dict[nn.Module, int] = {}
    for module in rewired.modules():
        if isinstance(module, nn.ReLU):
            assert not module.inplace
            module.register_forward_hook(
                lambda m, *_: calls.__setitem__(m, calls.get(m, 0) + 1))
    with torch.no_grad():
        after = rewired(x)
    torch.testing.assert_close(before, after)
    assert len(calls) == 17  # stem + 2 per BasicBlock x 8
    assert set(calls.values()) == {1}


def test_deeplift_needs_the_rewired_relus_on_resnet(tmp_path):
    net, path = resnet18_weights(tmp_path)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with pytest.raises((AssertionError, RuntimeError), match="used more than once"):
        DeepLift(wrap_network(net, IMAGENET)).attribute(x.clone().requires_grad_(True), target=2)
    bundle = load_bundle("torchvision:resnet18", spec=IMAGENET, class_names=list("abcde"),
                         weights=path)
    heatmaps = attribution.get_method("deep_lift").build(bundle)(x, torch.tensor([2]))
    assert torch.isfinite(heatmaps).all() and heatmaps.abs().sum() > 0


def test_functional_relu_becomes_a_module():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x)) - nn.functional.relu(-x[:, :3])

    rewired, _ = make_activations_unique(Functional())
    assert sum(isinstance(m, nn.ReLU) for m in rewired.modules()) == 2


@pytest.mark.parametrize("method", attribution.list_methods(), ids=lambda m: m.name)
def test_every_method_returns_a_finite_heatmap_of_the_input_shape(method, demo_bundle):
    x = torch.rand(3, *demo_bundle.spec.shape, generator=torch.Generator().manual_seed(4))
    heatmaps = method.build(demo_bundle)(x, torch.tensor([0, 5, 9]))
    assert heatmaps.shape == x.shape
    assert torch.isfinite(heatmaps).all()
    assert heatmaps.abs().sum() > 0
    assert not x.requires_grad  # the caller's tensor is left as it was


def test_saliency_is_signed(demo_bundle):
    x = torch.rand(4, *demo_bundle.spec.shape, generator=torch.Generator().manual_seed(5))
    heatmaps = attribution.get_method("saliency").build(demo_bundle)(x, torch.tensor([0, 1, 2, 3]))
    assert (heatmaps < 0).any() and (heatmaps > 0).any()


def test_grad_cam_layer_is_configurable(demo_bundle, tmp_path):
    assert attribution.first_conv_layer(demo_bundle.network) == "1.0"
    demo_bundle_later = type(demo_bundle)(**{**demo_bundle.__dict__, "grad_cam_layer": "3"})
    x = torch.rand(1, *demo_bundle.spec.shape)
    first = attribution.get_method("layer_grad_cam").build(demo_bundle)(x, torch.tensor([1]))
    later = attribution.get_method("layer_grad_cam").build(demo_bundle_later)(x, torch.tensor([1]))
    assert not torch.allclose(first, later)
    assert torch.equal(later[:, 0], later[:, 2])  # replicated over channels


def test_registry_refuses_duplicates_and_names_valid_choices():
    with pytest.raises(ValueError):
        attribution.register_method(attribution.SALIENCY)
    with pytest.raises(UnknownMethod, match="saliency, deconvolution"):
        attribution.get_method("occlusion")


def test_registry_and_proto_enum_name_the_same_methods():
    # The converters map names to axguard.v1.AttributionMethod by the enum's names; a
    # method added to one side only would be unreachable or unknown.
    from axguard.errors import InvalidInput
    from axguard.transport.v1.converters import method_name, method_value
    from axguard_client.v1 import confidence_pb2 as pb

    registered = [m.name for m in attribution.list_methods()]
    enum = [v.name.removeprefix("ATTRIBUTION_METHOD_").lower()
            for v in pb.AttributionMethod.DESCRIPTOR.values if v.number != 0]
    assert registered == enum
    for name in registered:
        assert method_name(method_value(name)) == name
    with pytest.raises(InvalidInput, match="unknown attribution method value 99"):
        method_name(99)
    assert attribution.shared_methods() == ("saliency", "deconvolution", "input_x_gradient",
                                            "guided_backprop")


def test_torchscript_offers_only_gradient_methods(demo_bundle, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates scripting
        scripted = torch.jit.script(demo_bundle.network[1])
    path = tmp_path / "model.ts"
    scripted.save(str(path))
    bundle = load_bundle(f"torchscript:{path}", spec=demo_bundle.spec,
                         class_names=demo_bundle.class_names, weights=None)
    assert bundle.torchscript
    names = [m.name for m in attribution.available_methods(bundle)]
    assert names == ["saliency", "input_x_gradient"]
    with pytest.raises(UnknownMethod, match="TorchScript"):
        attribution.check_available(attribution.DECONVOLUTION, bundle)
    x = torch.rand(2, *demo_bundle.spec.shape)
    ours = attribution.SALIENCY.build(bundle)(x, torch.tensor([1, 2]))
    eager = attribution.SALIENCY.build(demo_bundle)(x, torch.tensor([1, 2]))
    torch.testing.assert_close(ours, eager)
