"""The axguard CLI against real servers: check, info, health, serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from axguard.cli import main
from conftest import EXAMPLES, ROOT

AXGUARD = [sys.executable, "-m", "axguard.cli"]


def test_check_prints_class_probability_and_both_co_scores(demo_server, capsys):
    code = main(["check", str(EXAMPLES / "digit_3.png"), "--target", demo_server.target])
    out = capsys.readouterr().out
    assert code == 0
    assert "predicted '3' (class 3) with probability" in out
    assert "CO saliency/sum" in out and "CO deconvolution/sum" in out
    assert "verdict: ok (risk" in out and "calibration cal-" in out


def test_check_json(demo_server, capsys):
    code = main(["check", str(EXAMPLES / "digit_5.png"), "--target", demo_server.target,
                 "--json", "--label", "5", "--methods", "saliency,guided_backprop",
                 "--ax", "sum,product"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["prediction"]["class_name"] == "5"
    assert len(data["co_scores"]) == 4
    assert all("labelled_score" in s for s in data["co_scores"])
    assert data["verdict"]["calibrated"] is True
    assert data["verdict"]["likely_wrong"] is False


def test_check_reports_bad_files_and_exits_non_zero(demo_server, capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    code = main(["check", str(bad), str(EXAMPLES / "digit_1.png"), "--target",
                 demo_server.target])
    captured = capsys.readouterr()
    assert code == 1
    assert "INVALID_ARGUMENT" in captured.err and "image.encoded" in captured.err
    assert "predicted '1'" in captured.out


def test_info_and_health(demo_server, capsys):
    assert main(["info", "--target", demo_server.target]) == 0
    out = capsys.readouterr().out
    assert "digits-cnn" in out and "saliency, deconvolution" in out
    assert main(["health", "--target", demo_server.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_unreachable_server_is_a_clear_error(capsys):
    code = main(["info", "--target", "127.0.0.1:1", "--timeout", "2"])
    assert code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def start_serve(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `axguard serve` on a free port; return the process and its address."""
    proc = subprocess.Popen(
        [*AXGUARD, "serve", "--port", "0", "--metrics-port", "0", *args],
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("{") and json.loads(line)["event"] == "serving":
            # Keep draining the log so the server never blocks on a full pipe.
            drain = threading.Thread(target=proc.stderr.read, daemon=True)
            drain.start()
            proc.drain = drain  # type: ignore[attr-defined]
            return proc, json.loads(line)["address"]
    proc.wait(timeout=30)
    proc.stderr.close()
    raise AssertionError(f"serve exited with {proc.returncode} before serving: {seen}")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    proc.drain.join(timeout=10)  # type: ignore[attr-defined]  # ends at EOF
    assert proc.stderr is not None
    proc.stderr.close()
    return code


def test_serve_demo_then_sigterm_exits_zero(capsys):
    proc, address = start_serve([])
    try:
        assert main(["check", str(EXAMPLES / "digit_8.png"), "--target", address]) == 0
        assert "predicted '8'" in capsys.readouterr().out
    finally:
        assert stop(proc) == 0


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2)
    torch.save(net.state_dict(), folder / "my.pt")
    (folder / "classes.txt").write_text("normal\npneumonia\n")
    return {"weights": folder / "my.pt", "classes": folder / "classes.txt"}


def test_serve_own_torchvision_model_from_flags(resnet_files, capsys):
    proc, address = start_serve([
        "--model", "torchvision:resnet18", "--num-classes", "2",
        "--weights", str(resnet_files["weights"]), "--classes", str(resnet_files["classes"]),
        "--input-size", "64", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
    ])
    try:
        assert main(["info", "--target", address, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["class_names"] == ["normal", "pneumonia"]
        assert info["input_shape"] == ["3", "64", "64"]
        assert info["mean"] == [0.5, 0.5, 0.5]
        assert main(["check", str(EXAMPLES / "digit_2.png"), "--target", address]) == 0
        assert "CO deconvolution/sum" in capsys.readouterr().out
    finally:
        assert stop(proc) == 0


def test_serve_factory_model_from_yaml_and_env(resnet_files, tmp_path, capsys):
    from axguard.demo.bundle import ASSETS

    config = tmp_path / "axguard.yaml"
    config.write_text(
        "model:\n"
        "  source: axguard.demo.network:build_demo_net\n"
        f"  weights: {ASSETS / 'weights.pt'}\n"
        "  num_classes: 10\n"
        "  input_size: [32, 32]\n"
        "  mean: [0.3048, 0.3048, 0.3048]\n"
        "  std: [0.323, 0.323, 0.323]\n"
        "  name: from-yaml\n"
    )
    proc, address = start_serve(["--config", str(config)],
                                env={"AXGUARD_MODEL__VERSION": "from-env"})
    try:
        assert main(["info", "--target", address, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["name"], info["version"]) == ("from-yaml", "from-env")
        assert main(["check", str(EXAMPLES / "digit_6.png"), "--target", address]) == 0
        assert "predicted '6'" in capsys.readouterr().out
    finally:
        assert stop(proc) == 0


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory, demo_bundle) -> Path:
    path = tmp_path_factory.mktemp("ts") / "digits.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(demo_bundle.network[1]).save(str(path))
    return path


TS_SPEC = ["--num-classes", "10", "--input-size", "32", "--mean", "0.3048", "0.3048", "0.3048",
           "--std", "0.323", "0.323", "0.323"]


def test_torchscript_with_deconvolution_fails_at_start_up(torchscript_file):
    proc = subprocess.run([*AXGUARD, "serve", "--port", "0", "--metrics-port", "0", "--model",
                           f"torchscript:{torchscript_file}", *TS_SPEC],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "deconvolution needs module hooks" in proc.stderr
    assert "available: saliency, input_x_gradient" in proc.stderr


def test_torchscript_serves_gradient_methods(torchscript_file, capsys):
    proc, address = start_serve(["--model", str(torchscript_file), "--methods", "saliency",
                                 *TS_SPEC])
    try:
        assert main(["check", str(EXAMPLES / "digit_9.png"), "--target", address]) == 0
        out = capsys.readouterr().out
        assert "predicted '9'" in out and "CO saliency/sum" in out
        assert main(["check", str(EXAMPLES / "digit_9.png"), "--target", address,
                     "--methods", "deconvolution"]) == 1
        assert "TorchScript" in capsys.readouterr().err
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "torchvision:resnet18", "--num-classes", "2", "--input-size", "64"],
         "model.weights"),
        (["--model", "no_such_pkg.mod:build", "--num-classes", "2", "--input-size", "8"],
         "model.source"),
        (["--methods", "occlusion"], "occlusion"),
        (["--model", "torchvision:resnet18", "--num-classes", "3", "--input-size", "64",
          "--weights", "{weights}"], "weights do not fit"),
    ],
)
def test_bad_serve_settings_fail_with_a_clear_message(args, message, resnet_files):
    args = [a.replace("{weights}", str(resnet_files["weights"])) for a in args]
    proc = subprocess.run([*AXGUARD, "serve", "--port", "0", "--metrics-port", "0", *args],
                          capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_settings_flag_and_set_reach_the_settings_model():
    # Settings flags are recognised by the settings model itself (no hand-kept list): each
    # flag whose destination is dotted must name a real setting, and --set reaches any.
    import argparse

    from axguard.cli import (
        _calibrate_parser,
        _evaluate_parser,
        _serve_parser,
        overrides_from_args,
        setting_paths,
    )

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    for add in (_serve_parser, _calibrate_parser, _evaluate_parser):
        add(subparsers)
    paths = setting_paths()
    for sub in subparsers.choices.values():
        for action in sub._actions:
            if "." in action.dest:
                assert action.dest in paths, f"{action.option_strings} → {action.dest}"
    args = parser.parse_args(["serve", "--port", "7", "--set", "batching.max_delay_ms=0.5",
                              "--set", "server.tls.cert_file=/x.pem",
                              "--set", "attribution.default_methods=[saliency]"])
    assert overrides_from_args(args) == {
        "server": {"port": 7, "tls": {"cert_file": "/x.pem"}},
        "batching": {"max_delay_ms": 0.5},
        "attribution": {"default_methods": ["saliency"]}}


def test_set_refuses_an_unknown_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--set", "server.colour=red"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'server.colour=red': expected SECTION.NAME=VALUE" in err and "server.port" in err
