"""The flag's evidence: feature functions by hand, the engine's passes against direct
autograd and Captum, and a verdict that computes only what its risk model uses."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from captum.attr import Deconvolution, Saliency

from axguard.engine import evidence as ev
from axguard.engine.core import CheckItem, Engine, EvidencePlan
from axguard.engine.scoring import normalise_heatmaps
from axguard.errors import ConfigError
from axguard.flag import verdict as v

LOGITS = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])


def test_logit_features_by_hand():
    z = math.exp(2) + 2
    p = np.array([math.exp(2) / z, 1 / z, 1 / z])
    assert v.msp(LOGITS)[0] == pytest.approx(p[0])
    assert v.neg_log_one_minus_msp(LOGITS)[0] == pytest.approx(-math.log(1 - p[0]))
    assert v.margin(LOGITS).tolist() == pytest.approx([2.0, 2.0])
    assert v.entropy(LOGITS)[0] == pytest.approx(-(p * np.log(p)).sum())
    assert v.energy(LOGITS)[0] == pytest.approx(-math.log(z))
    predicted, runner_up = v.top_two(LOGITS)
    assert predicted.tolist() == [0, 2] and runner_up.tolist() == [1, 1]


def test_neg_log_one_minus_msp_stays_finite_where_msp_rounds_to_one():
    logits = np.array([[60.0, 0.0, 0.0]])
    assert v.msp(logits)[0] == 1.0
    assert v.neg_log_one_minus_msp(logits)[0] == pytest.approx(60 - math.log(2))


def test_boundary_distance_by_hand():
    # margin 2, gradient norm 4: first-order distance 0.5
    assert v.boundary_log_distance(np.array([2.0]), np.array([4.0]))[0] == pytest.approx(
        math.log(0.5))
    assert np.isfinite(v.boundary_log_distance(np.array([0.0]), np.array([0.0]))).all()


def test_counterfactual_features_by_hand():
    after = np.array([[1.0, 1.5, 0.0], [0.0, 2.0, 2.5]])
    predicted, runner_up = v.top_two(LOGITS)
    # row 0: margin z0 − z1 goes 2 → −0.5; row 1: z2 − z1 goes 2 → 0.5
    assert v.margin_change(LOGITS, after, predicted, runner_up).tolist() == [-2.5, -1.5]
    assert v.flipped(after, predicted).tolist() == [1.0, 0.0]


def test_view_features_by_hand():
    predicted = np.array([0, 2])
    views = np.stack([LOGITS, np.array([[0.0, 2.0, 0.0], [0.0, 1.0, 3.0]])])
    assert v.view_agreement(views, predicted).tolist() == [0.5, 1.0]
    log_p = v.log_softmax(views)
    expected = (log_p[0, 0, 0] + log_p[1, 0, 0]) / 2
    assert v.view_mean_log_prob(views, predicted)[0] == pytest.approx(expected)


def test_every_feature_has_an_orientation():
    families = [v.Family(name=n) for n in ("msp", "logit", "boundary")]
    families += [v.Family(name="counterfactual", method="saliency"),
                 v.Family(name="perturbation", epsilon=0.01),
                 v.Family(name="views", views=("hflip",)),
                 v.Family(name="co", pairs=(v.MethodPair(method="saliency", ax_process="sum"),))]
    for family in families:
        for name in family.features():
            assert v.error_sign(name) in (-1.0, 1.0)
    with pytest.raises(KeyError):
        v.error_sign("nonsense")


def test_coefficients_give_the_exact_gradients(demo_bundle):
    x = torch.rand(4, *demo_bundle.spec.shape)
    leaf = x.clone().requires_grad_(True)
    z = demo_bundle.network(leaf)
    predicted, runner_up = ev.top_two(z.detach())
    rows = torch.arange(4)
    k_margin = ev.margin_coefficients(predicted, runner_up, z.shape[1])
    (direct_margin,) = torch.autograd.grad((z[rows, predicted] - z[rows, runner_up]).sum(),
                                           leaf, retain_graph=True)
    (direct_nll,) = torch.autograd.grad(
        -torch.log_softmax(z, 1)[rows, predicted].sum(), leaf, retain_graph=True)
    (via_k,) = torch.autograd.grad((z * k_margin).sum(), leaf, retain_graph=True)
    (via_nll,) = torch.autograd.grad((z * ev.nll_coefficients(z.detach(), predicted)).sum(),
                                     leaf)
    torch.testing.assert_close(via_k, direct_margin)
    torch.testing.assert_close(via_nll, direct_nll, rtol=1e-4, atol=1e-6)


def test_perturbation_and_views_by_hand():
    x = torch.zeros(1, 1, 2, 3)
    grad = torch.tensor([[[[1.0, -2.0, 0.0], [0.5, 0.0, -1.0]]]])
    out = ev.perturb(x, grad, 0.1)
    assert out.flatten().tolist() == pytest.approx([-0.1, 0.1, 0.0, -0.1, 0.0, 0.1])
    image = torch.arange(6.0).reshape(1, 1, 2, 3)
    assert ev.parse_view("hflip").transform(image)[0, 0, 0].tolist() == [2.0, 1.0, 0.0]
    shifted = ev.parse_view("shift:1:0").transform(image)
    assert shifted[0, 0, 0].tolist() == [0.0, 0.0, 1.0]  # right by one, zero fill
    for bad in ("spin", "shift:1", "rotate:90", "scale:9", "hflip:2"):
        with pytest.raises(ConfigError, match="unknown view") as info:
            ev.parse_view(bad)
        assert info.value.field == "model.views"


def _flag(families: list[v.Family], features: list[str]) -> v.FlagModel:
    n = len(features)
    return v.FlagModel(families=families, mode="false_alarm", threshold=0.5,
                       risk_model=v.RiskModel(features=features, mean=[0.0] * n,
                                              scale=[1.0] * n, coef=[-1.0] + [0.0] * (n - 1),
                                              intercept=0.0, regularisation_c=1.0))


def _with_flag(artifact, flag: v.FlagModel):
    return artifact.model_copy(update={"flag": flag})


def test_a_logit_only_verdict_runs_no_backward_pass(demo_bundle, demo_calibration):
    families = [v.Family(name="msp"), v.Family(name="logit")]
    names = [n for f in families for n in f.features()]
    engine = Engine(demo_bundle, calibration=_with_flag(demo_calibration,
                                                        _flag(families, names)))
    x = torch.rand(3, *demo_bundle.spec.shape)
    results = engine.check([CheckItem(img, verdict_only=True) for img in x])
    assert engine.backward_passes == 0 and engine.captum_calls == {}
    assert all(r.verdict.calibrated and r.scores == [] for r in results)
    assert set(results[0].verdict.features) == set(names)
    expected = v.neg_log_one_minus_msp(np.array([results[0].logits]))[0]
    assert results[0].verdict.features["neg_log_1m_msp"] == pytest.approx(expected, rel=1e-5)


def test_served_evidence_equals_direct_computation(demo_bundle, demo_calibration):
    families = [v.Family(name="msp"), v.Family(name="boundary"),
                v.Family(name="counterfactual", method="saliency"),
                v.Family(name="counterfactual", method="deconvolution"),
                v.Family(name="perturbation", epsilon=0.01),
                v.Family(name="views", views=("shift:1:0", "rotate:5"))]
    names = [n for f in families for n in f.features()]
    engine = Engine(demo_bundle, calibration=_with_flag(demo_calibration,
                                                        _flag(families, names)))
    torch.manual_seed(0)
    x = torch.rand(5, *demo_bundle.spec.shape)
    results, batch = engine.check_with_evidence(
        [CheckItem(img, verdict_only=True) for img in x])
    # Two heatmap backward passes per counterfactual method and one for the perturbation;
    # the margin gradient comes free from the two Saliency maps.
    assert engine.backward_passes == 5 and engine.captum_calls == {}
    net = demo_bundle.network
    logits = net(x)
    predicted, runner_up = ev.top_two(logits)
    rows = torch.arange(5)
    leaf = x.clone().requires_grad_(True)
    z = net(leaf)
    (g_margin,) = torch.autograd.grad((z[rows, predicted] - z[rows, runner_up]).sum(), leaf)
    np.testing.assert_allclose(batch.margin_gradient_norm,
                               g_margin.flatten(1).norm(dim=1).numpy(), rtol=1e-4)
    for method, cls in (("saliency", Saliency), ("deconvolution", Deconvolution)):
        kwargs = {"abs": False} if method == "saliency" else {}
        h_own = cls(net).attribute(x.clone().requires_grad_(True), target=predicted, **kwargs)
        h_two = cls(net).attribute(x.clone().requires_grad_(True), target=runner_up, **kwargs)
        up = net(x + normalise_heatmaps(h_two.detach())[0]).detach().double().numpy()
        removed = net(x - normalise_heatmaps(h_own.detach())[0]).detach().double().numpy()
        np.testing.assert_allclose(batch.runner_up_logits[method], up, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(batch.own_removed_logits[method], removed, rtol=1e-4,
                                   atol=1e-4)
    leaf = x.clone().requires_grad_(True)
    (g_nll,) = torch.autograd.grad(
        -torch.log_softmax(net(leaf), 1)[rows, predicted].sum(), leaf)
    perturbed = net(x - 0.01 * g_nll.sign()).detach().double().numpy()
    np.testing.assert_allclose(batch.perturbed_logits[0.01], perturbed, rtol=1e-4, atol=1e-4)
    shifted = net(ev.parse_view("shift:1:0").transform(x)).detach().double().numpy()
    np.testing.assert_allclose(batch.view_logits[0], shifted, rtol=1e-4, atol=1e-4)
    # The verdict reports exactly the features its risk model uses.
    assert set(results[0].verdict.features) == set(names)


def test_plans_follow_the_families():
    plan = EvidencePlan.of([v.Family(name="msp"), v.Family(name="boundary"),
                            v.Family(name="counterfactual", method="deconvolution"),
                            v.Family(name="co", pairs=(
                                v.MethodPair(method="saliency", ax_process="product"),))])
    assert plan.boundary and plan.counterfactual == ("deconvolution",)
    assert plan.co_pairs == (("saliency", "product"),)  # a pair, not a cross product
    assert plan.methods == ("deconvolution", "saliency") and plan.epsilons == ()
    assert EvidencePlan.of([v.Family(name="msp"), v.Family(name="logit")]) == EvidencePlan()


def test_importing_the_serving_path_loads_neither_sklearn_nor_scipy():
    code = ("import sys, axguard.transport.server, axguard.engine, axguard.flag.verdict;"
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
