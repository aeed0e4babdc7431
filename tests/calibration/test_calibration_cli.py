"""calibrate, evaluate, report and serve --calibration, through the CLI, on real images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from axguard.cli import main
from axguard.demo.data import export_pngs
from axguard.engine.core import CheckItem, Engine
from axguard.errors import ConfigError
from axguard.flag.artifact import load_artifact, save_artifact
from axguard.flag.verdict import Family
from conftest import ROOT, chromium

AXGUARD = [sys.executable, "-m", "axguard.cli"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The demo's calibration and test splits written as ImageFolder trees of PNGs."""
    root = tmp_path_factory.mktemp("digits")
    export_pngs("calibration", root / "calibration")
    export_pngs("test", root / "test")
    return {"calibration": root / "calibration", "test": root / "test"}


@pytest.fixture(scope="module")
def artifact_path(folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cal") / "calibration.json"
    code = main(["calibrate", "--data", str(folders["calibration"]), "--out", str(out),
                 "--bootstrap", "50"])
    assert code == 0
    return out


def test_calibrate_on_an_image_folder_matches_the_builtin_split(artifact_path, demo_calibration):
    artifact = load_artifact(artifact_path)
    assert artifact.model.fingerprint == demo_calibration.model.fingerprint
    assert artifact.data.n_images == 359
    assert artifact.data.n_errors == demo_calibration.data.n_errors
    assert artifact.threshold.mode == "false_alarm" and artifact.threshold.target == 0.05
    # The PNGs decode to the builtin split's tensors: the same scores, in another order.
    for name in ("co:saliency:sum", "co_labelled:deconvolution:sum", "msp"):
        assert sorted(artifact.samples.features[name]) == pytest.approx(
            sorted(demo_calibration.samples.features[name]), rel=1e-4, abs=1e-5)
    assert {s.name for s in artifact.metrics} >= {
        "msp", "margin", "entropy", "energy", "co:saliency:sum", "co_labelled:saliency:sum",
        "co:deconvolution:sum", "co_labelled:deconvolution:sum", "risk"}
    assert [f"{r.method}/{r.ax_process}" for r in artifact.ranking] == sorted(
        ["saliency/sum", "deconvolution/sum"],
        key=lambda n: -next(r.auroc_label_free for r in artifact.ranking
                            if f"{r.method}/{r.ax_process}" == n))
    assert len(artifact.samples.labels) == 359
    assert artifact.calibration_id == artifact.content_id()
    for s in artifact.metrics:
        assert s.auroc.low <= s.auroc.value <= s.auroc.high


def test_error_recall_mode_refuses_without_enough_errors(folders, tmp_path, capsys):
    out = tmp_path / "recall.json"
    code = main(["calibrate", "--data", str(folders["calibration"]), "--out", str(out),
                 "--target-error-recall", "0.9", "--bootstrap", "20"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refused" in err and "at least 29 are needed" in err
    assert not out.exists()


def test_calibrate_all_methods_records_every_pair(tmp_path):
    from axguard.calibration.calibrate import all_pairs, calibrate
    from axguard.calibration.datasets import load_labelled_images
    from axguard.demo.bundle import load_demo_bundle

    bundle = load_demo_bundle()
    images = load_labelled_images("builtin:digits", bundle.class_names)
    artifact = calibrate(Engine(bundle), images, pairs=all_pairs(), n_bootstrap=10,
                         progress=False)
    assert len(artifact.pairs) == 12 and len(artifact.ranking) == 12
    assert "co_labelled:layer_grad_cam:product" in artifact.samples.features


def test_evaluate_checks_the_promise(folders, artifact_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--data", str(folders["test"]), "--calibration",
                 str(artifact_path), "--bootstrap", "50", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "HELD" in text and "risk − MSP AUROC" in text
    result = json.loads(out.read_text())
    assert result["n_images"] == 360 and result["promise_held"]
    low, high = result["observed_interval"]
    assert low <= result["false_alarm_rate"] <= high


def test_evaluate_exits_non_zero_when_the_promise_is_broken(folders, artifact_path, tmp_path,
                                                           capsys):
    # A threshold of 0 flags everything: the false-alarm promise is then plainly broken.
    artifact = load_artifact(artifact_path)
    broken = artifact.with_threshold(0.0)
    path = save_artifact(broken, tmp_path / "broken.json") and tmp_path / "broken.json"
    code = main(["evaluate", "--data", str(folders["test"]), "--calibration", str(path),
                 "--bootstrap", "20"])
    assert code == 1
    assert "BROKEN" in capsys.readouterr().out


def test_a_mismatched_artifact_refuses_to_load(artifact_path, demo_bundle, tmp_path):
    artifact = load_artifact(artifact_path)
    other = artifact.model_copy(update={"model": artifact.model.model_copy(
        update={"fingerprint": "0" * 64})})
    with pytest.raises(ConfigError, match="fingerprint"):
        Engine(demo_bundle, calibration=other)
    path = tmp_path / "other.json"
    save_artifact(other, path)
    serve = [*AXGUARD, "serve", "--port", "0", "--metrics-port", "0"]
    proc = subprocess.run([*serve, "--calibration", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "recalibrate" in proc.stderr and "Traceback" not in proc.stderr
    old = tmp_path / "old.json"
    old.write_text("{\"schema_version\": 1, \"risk_model\": {}}")
    proc = subprocess.run([*serve, "--calibration", str(old)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "calibration:" in proc.stderr and "schema version 1" in proc.stderr
    assert "recalibrate with `axguard calibrate" in proc.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{\"schema_version\": 2}")
    proc = subprocess.run([*serve, "--calibration", str(broken)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "cannot load calibration" in proc.stderr


def test_a_calibration_needing_hooks_refuses_a_torchscript_model(demo_calibration, demo_bundle,
                                                                 tmp_path):
    import warnings

    import torch

    from axguard.engine.model import load_bundle

    path = tmp_path / "m.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(demo_bundle.network[1]).save(str(path))
    bundle = load_bundle(str(path), spec=demo_bundle.spec, class_names=demo_bundle.class_names,
                         weights=None)
    # A risk model that uses the Deconvolution counterfactual needs hooks.
    families = [Family(name="msp"), Family(name="counterfactual", method="deconvolution")]
    flag = demo_calibration.flag.model_copy(update={"families": families})
    same_fingerprint = demo_calibration.model_copy(update={
        "flag": flag,
        "model": demo_calibration.model.model_copy(update={"fingerprint": bundle.fingerprint})})
    with pytest.raises(ConfigError, match="deconvolution"):
        Engine(bundle, default_methods=["saliency"], calibration=same_fingerprint)
    # The same family with Saliency works on TorchScript (gradients need no hooks).
    saliency = [Family(name="msp"), Family(name="counterfactual", method="saliency")]
    engine = Engine(bundle, default_methods=["saliency"], calibration=same_fingerprint.model_copy(
        update={"flag": flag.model_copy(update={"families": saliency})}))
    result = engine.check([CheckItem(torch.rand(bundle.spec.shape), verdict_only=True)])[0]
    assert result.verdict.calibrated and engine.captum_calls == {}


def test_bundled_calibration_belongs_to_the_bundled_model(demo_calibration, demo_bundle):
    assert demo_calibration.model.fingerprint == demo_bundle.fingerprint
    assert demo_calibration.calibration_id == demo_calibration.content_id()
    assert demo_calibration.data.source == "builtin:digits"


@pytest.mark.system
def test_report_page_shows_its_figures_in_headless_chromium(artifact_path, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(artifact_path), "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["co_boxplots.png", "co_histograms.png", "risk_coverage.png", "roc.png"]
    page = out / "index.html"
    assert "src=\"data:image/png;base64," in page.read_text()  # self-contained
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-figures="4"' in dom
    assert 'data-figures-loaded="4"' in dom, "not every figure decoded in the browser"
    assert "Does the flag beat MSP" in dom and "the paper's labelled score" in dom
    assert "Evidence families: what the risk model uses, and why" in dom
    assert "id=\"kept\">msp</b>" in dom  # the demo's 7 errors: msp alone, and it says why
    assert "The risk model is msp alone: only 7 wrong predictions" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2400",
                    page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # figures, not a blank page


def test_round_trip_calibrate_serve_check(artifact_path, demo_bundle, folders):
    """Calibrate (CLI, above) → serve that artifact → Check a test PNG → the verdict equals
    what the engine computes offline with the same artifact."""
    from axguard_client import AxguardClient
    from conftest import RunningServer

    artifact = load_artifact(artifact_path)
    engine = Engine(demo_bundle, calibration=artifact)
    server = RunningServer(engine)
    try:
        png = sorted((folders["test"] / "7").glob("*.png"))[0]
        with AxguardClient(server.target, timeout=60) as client:
            response = client.check(png)
            assert client.model_info().calibration.calibration_id == artifact.calibration_id
    finally:
        server.stop()
    from axguard.engine.preprocess import decode_image

    image = decode_image(png.read_bytes(), demo_bundle.spec, max_pixels=10**7)
    offline = Engine(demo_bundle, calibration=artifact).check(
        [CheckItem(image)])[0]
    assert response.verdict.calibration_id == artifact.calibration_id
    assert response.verdict.risk == pytest.approx(offline.verdict.risk, rel=1e-5, abs=1e-7)
    assert response.verdict.likely_wrong == offline.verdict.likely_wrong


def test_an_unknown_ax_process_in_methods_is_a_clear_error(tmp_path, capsys):
    code = main(["calibrate", "--data", "builtin:digits", "--out", str(tmp_path / "c.json"),
                 "--methods", "saliency:divide"])
    assert code == 2
    err = capsys.readouterr().err
    assert "methods: unknown AX process 'divide'" in err and "sum, product" in err


@pytest.mark.parametrize(("args", "field"), [
    (["--families", ""], "families"),
    (["--families", "logit,telepathy"], "families"),
    (["--epsilons", "0.01,1.5"], "epsilons"),
    (["--epsilons", "0"], "epsilons"),
    (["--families", "views"], "model.views"),
    (["--views", "hflip,spin"], "model.views"),
    (["--max-cost", "-1"], "max_cost"),
    (["--max-cost", "nan"], "max_cost"),
    (["--fit-fraction", "0.5"], "--fit-fraction"),  # version 2's flag: nothing is held back
])
def test_bad_calibration_settings_exit_2_naming_the_field(args, field, tmp_path):
    out = tmp_path / "cal.json"
    out.write_text("previous artifact")  # a failed run must leave it as it was
    proc = subprocess.run([*AXGUARD, "calibrate", "--data", "builtin:digits", "--out",
                           str(out), *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "previous artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["cal.json"]  # no temporary left over


def test_a_failed_save_leaves_nothing_half_written(demo_calibration, tmp_path, monkeypatch):
    out = tmp_path / "cal.json"
    out.write_text("previous artifact")

    def broken_dump(self, **kwargs):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    monkeypatch.setattr(type(demo_calibration), "model_dump_json", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(demo_calibration, out)
    assert out.read_text() == "previous artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["cal.json"]


def test_fusion_on_an_under_trained_model_and_the_served_verdict_agrees(tmp_path):
    """A real under-trained digits CNN (about 87% accurate): calibrate with every family,
    then serve: every offered family is fused (no selection step), every image serves the
    fit and the threshold, and the served verdict equals the artifact's own risk."""
    import torch

    from axguard.calibration.calibrate import calibrate
    from axguard.calibration.datasets import LabelledImages, load_labelled_images
    from axguard.calibration.risk import SHRINKAGE_RULE
    from axguard.demo.train import train_demo, write_assets
    from axguard.engine.model import load_bundle

    network, spec, _ = train_demo(epochs=1)
    write_assets(network, spec, {}, tmp_path, 1)
    bundle = load_bundle("axguard.demo.network:build_demo_net", spec=spec,
                         class_names=[str(d) for d in range(10)],
                         weights=tmp_path / "weights.pt", name="sub")
    # Both held-out splits (719 images, about 90 errors): enough for 19 fused features at
    # three errors each.
    parts = [load_labelled_images(name, bundle.class_names)
             for name in ("builtin:digits", "builtin:digits-test")]
    images = LabelledImages("builtin:digits+test", [n for p in parts for n in p.names],
                            [v for p in parts for v in p.labels],
                            [load for p in parts for load in p._loaders])
    artifact = calibrate(Engine(bundle), images, n_bootstrap=20, views=("shift:1:0",),
                         progress=False)
    sel = artifact.selection
    assert artifact.data.n_errors >= 3 * 19 and sel.rule == SHRINKAGE_RULE
    offered = {f.key.split(":")[0] for f in sel.candidates}
    assert offered == {"logit", "boundary", "counterfactual", "perturbation", "views", "co"}
    assert len(sel.epsilon_aurocs) == len(sel.epsilon_grid) == 6
    assert sel.steps == [] and sel.fused_vs_msp is not None
    # Fused unless worse than MSP beyond noise: then msp alone, with the reason.
    if sel.fused_vs_msp.high >= 0:
        assert sel.kept == ["msp", *(f.key for f in sel.candidates)] and not sel.skipped_reason
    else:
        assert sel.kept == ["msp"] and "worse than MSP" in sel.skipped_reason
    assert sel.kept[0] == "msp" and artifact.flag.families[0].name == "msp"
    # Each offered family is reported: served coefficients, drop-one effect, cost.
    assert [r.family for r in sel.families] == [f.key for f in sel.candidates]
    served_coef = dict(zip(artifact.flag.risk_model.features, artifact.flag.risk_model.coef,
                           strict=True))
    for report in sel.families:
        assert report.kept == (report.family in sel.kept)
        for name, value in report.coefficients.items():
            assert value == served_coef.get(name, 0.0)
    assert sel.cost == sum(r.cost for r in sel.families if r.kept)
    # Every image serves the fit; the threshold is the bound over all correct predictions.
    assert set(artifact.samples.split) == {"fit"}
    assert artifact.threshold.n_used == artifact.data.n_correct
    assert artifact.threshold.achieved_false_alarm_rate <= 0.05
    # The report shows every offered family's weight, drop-one effect and cost.
    from axguard.calibration.report import render_html

    page = render_html(artifact, {})
    assert "drop-one effect (AUROC, out of fold)" in page
    for report in sel.families:
        assert f"<td>{report.family}</td>" in page and f"<td>{report.drop_one:+.4f}</td>" in page
    # A cost bound keeps only what fits, in the order of the drop-one effects.
    bounded = calibrate(Engine(bundle), images, n_bootstrap=20, max_cost=3, progress=False)
    assert bounded.selection.cost <= 3 and bounded.selection.max_cost == 3
    assert {f.name for f in bounded.flag.families} <= {"msp", "logit", "boundary",
                                                       "perturbation"}
    # Serving computes the kept families only, and agrees with calibration.
    path = tmp_path / "cal.json"
    save_artifact(artifact, path)
    served = Engine(bundle, calibration=load_artifact(path))
    x, _ = next(images.batches(bundle.spec, 16))
    results = served.check([CheckItem(img, verdict_only=True) for img in x])
    kept_features = {n for f in artifact.flag.families for n in f.features()}
    assert set(results[0].verdict.features) == kept_features
    assert [r.verdict.risk for r in results] == pytest.approx(
        artifact.samples.features["risk"][:16], rel=1e-4, abs=1e-6)
    assert torch.is_tensor(x)


def test_calibrate_takes_its_options_as_one_object_or_as_fields():
    from axguard.calibration import CalibrateOptions, calibrate
    from axguard.calibration.datasets import load_labelled_images
    from axguard.demo.bundle import load_demo_bundle

    bundle = load_demo_bundle()
    engine = Engine(bundle)
    images = load_labelled_images("builtin:digits", bundle.class_names)
    options = CalibrateOptions(families=("logit",), n_bootstrap=10, repeats=1, progress=False)
    by_object = calibrate(engine, images, options)
    by_fields = calibrate(engine, images, families=["logit"], n_bootstrap=10, repeats=1,
                          progress=False)
    assert by_object.calibration_id == by_fields.calibration_id
    # A field given beside the object replaces the object's.
    other = calibrate(engine, images, options, delta=0.1)
    assert other.threshold.delta == 0.1 and by_object.threshold.delta == 0.05
    # Bad options fail before any image is run, naming the setting.
    with pytest.raises(ConfigError) as err:
        calibrate(engine, images, options, max_cost=-1)
    assert err.value.field == "max_cost"
    normalised = CalibrateOptions(views=("hflip",), families=("logit", "logit")).checked(engine)
    assert normalised.families == ("logit", "views") and normalised.pairs is not None


def test_the_report_page_is_a_package_data_template():
    from importlib import resources

    from axguard.calibration.report import report_template

    page = resources.files("axguard.calibration").joinpath("templates", "report.html")
    assert page.is_file()
    names = {m.group("named") or m.group("braced")
             for m in report_template().pattern.finditer(report_template().template)
             if m.group("named") or m.group("braced")}
    assert {"verdict", "metric_rows", "selection", "figures"} <= names


def test_evaluate_compares_two_calibrations_on_the_same_images(folders, artifact_path, tmp_path,
                                                               capsys):
    # The old calibration: the same risk model with a threshold of 0 (flags everything).
    artifact = load_artifact(artifact_path)
    old = tmp_path / "old.json"
    save_artifact(artifact.with_threshold(0.0), old)
    out = tmp_path / "compare.json"
    code = main(["evaluate", "--data", str(folders["test"]), "--calibration",
                 str(artifact_path), "--compare", str(old), "--bootstrap", "30",
                 "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text  # the new calibration's promise decides
    result = json.loads(out.read_text())
    new, before = result["new"], result["old"]
    assert new["calibration_id"] == artifact.calibration_id != before["calibration_id"]
    assert new["n_images"] == before["n_images"] == 360
    assert new["promise_held"] and not before["promise_held"]
    assert before["false_alarm_rate"] == 1.0 and before["error_recall"] == 1.0
    assert result["false_alarm_rate_change"] == pytest.approx(new["false_alarm_rate"] - 1.0)
    assert result["error_recall_change"] == pytest.approx(new["error_recall"] - 1.0)
    # The same risk model: the paired AUROC difference is exactly 0, never better.
    paired = result["risk_new_vs_old"]
    assert paired["difference"] == 0.0 and paired["p_not_better"] == 1.0
    assert "risk AUROC new − old: +0.000" in text and "BROKEN" in text


def test_compare_refuses_another_models_calibration(folders, artifact_path, tmp_path, capsys):
    artifact = load_artifact(artifact_path)
    other = artifact.model_copy(update={"model": artifact.model.model_copy(
        update={"fingerprint": "0" * 64})})
    path = tmp_path / "other.json"
    save_artifact(other, path)
    code = main(["evaluate", "--data", str(folders["test"]), "--calibration",
                 str(artifact_path), "--compare", str(path), "--bootstrap", "10"])
    assert code == 2
    assert "fingerprint" in capsys.readouterr().err
