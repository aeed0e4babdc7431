"""The shared pass equals Captum's methods exactly, and the engine uses it."""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum.attr import Deconvolution, GuidedBackprop, InputXGradient, Saliency

from axguard.engine.core import CheckItem, Engine
from axguard.engine.model import InputSpec, load_bundle
from axguard.engine.sharedpass import SHARED_METHODS, SharedPass

CAPTUM = {"saliency": (Saliency, {"abs": False}), "deconvolution": (Deconvolution, {}),
          "guided_backprop": (GuidedBackprop, {}), "input_x_gradient": (InputXGradient, {})}


@pytest.fixture(scope="module")
def resnet34(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r34") / "resnet34.pt"
    torch.save(torchvision.models.resnet34(num_classes=7).state_dict(), path)
    spec = InputSpec(3, 96, 96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return load_bundle("torchvision:resnet34", spec=spec, class_names=list("abcdefg"),
                       weights=path)


@pytest.mark.parametrize("model", ["demo", "resnet34"])
def test_shared_pass_equals_captum(model, demo_bundle, resnet34):
    bundle = demo_bundle if model == "demo" else resnet34
    x = torch.rand(3, *bundle.spec.shape, generator=torch.Generator().manual_seed(7))
    shared = SharedPass(bundle.network)
    leaf, logits = shared.forward(x)
    with torch.no_grad():
        plain = bundle.network(x)
    torch.testing.assert_close(logits.detach(), plain, rtol=1e-5, atol=1e-5)
    targets = logits.argmax(dim=1)
    ours = shared.heatmaps(leaf, logits, targets, list(SHARED_METHODS))
    for name, (cls, kwargs) in CAPTUM.items():
        expected = cls(bundle.network).attribute(x.clone().requires_grad_(True),
                                                 target=targets, **kwargs)
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-7, msg=name)
        assert expected.abs().sum() > 0


def test_shared_copy_shares_parameters(resnet34):
    shared = SharedPass(resnet34.network)
    served = dict(resnet34.network.named_parameters())
    for name, param in shared.network.named_parameters():
        assert param.data_ptr() == served[name].data_ptr()
    assert shared.activations == 33  # stem + 2 per BasicBlock x 16, each its own module
    # Every ReLU now sits inside a SwitchableActivation, which reads the rule.
    assert not any(isinstance(m, torch.nn.ReLU) for name, m in shared.network.named_modules()
                   if not name.endswith(".activation"))


def test_engine_uses_the_shared_pass_and_counts_captum_calls(demo_bundle):
    x = torch.rand(4, *demo_bundle.spec.shape, generator=torch.Generator().manual_seed(8))
    fast = Engine(demo_bundle)
    slow = Engine(demo_bundle, shared_pass=False)
    methods = ["saliency", "deconvolution", "guided_backprop", "input_x_gradient", "deep_lift"]
    items = [CheckItem(img, methods, ["sum", "product"]) for img in x]
    a, b = fast.check(items), slow.check(items)
    for ra, rb in zip(a, b, strict=True):
        assert ra.class_index == rb.class_index
        for sa, sb in zip(ra.scores, rb.scores, strict=True):
            assert (sa.method, sa.ax_process) == (sb.method, sb.ax_process)
            assert sa.score == pytest.approx(sb.score, rel=1e-5, abs=1e-5)
    assert fast.captum_calls == {"deep_lift": 4}
    assert slow.captum_calls == {m: 4 for m in methods}
