"""Label-free drift alerts on shifted digits: `make bench-drift`.

Serves the demo model with its bundled calibration and default settings (drift window
1,000, PSI from 200) and has a real Prometheus scrape it with deploy/prometheus's rules.
For each condition it sends 1,000 checks of the held-out test digits (cycled; never seen by
training or calibration), transformed: clean, Gaussian noise, blur, rotation, lower
contrast; then a clean run again. After each it asks Prometheus for the drift gauges and
evaluates the expressions of AxguardCalibrationStale and AxguardFlagRateFarFromCalibration
(their `for:` durations aside). From the responses and the true labels it also reports
accuracy, the false-alarm rate and the error recall, i.e. what label feedback would show.

Writes bench/results/drift.{json,md}; exits 1 if an alert fires on clean data or none
fires on a shifted condition.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from prometheus_run import RULES, running_prometheus  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ALERTS = ("AxguardCalibrationStale", "AxguardFlagRateFarFromCalibration")
WINDOW = 1000


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 40, (image.height, image.width))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


CONDITIONS = {
    "clean": lambda img, rng: img,
    "noise (σ = 40 of 255)": _noise,
    "blur (Gaussian, radius 1 px of 8)": lambda img, rng: img.filter(ImageFilter.GaussianBlur(1)),
    "rotation (25°)": lambda img, rng: img.rotate(25, resample=Image.BILINEAR),
    "contrast (× 0.4)": lambda img, rng: ImageEnhance.Contrast(img).enhance(0.4),
}


def main() -> int:
    from prometheus_client import start_http_server

    from axguard.builder import build_engine
    from axguard.config import load_settings
    from axguard.demo.data import load_split
    from axguard.transport.server import build_server, start_serving
    from axguard.transport.torch_threads import configure_torch
    from axguard_client import AxguardClient

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("prometheus is not installed (make system-deps)", file=sys.stderr)
        return 2
    settings = load_settings(server={"host": "127.0.0.1", "port": 0})
    configure_torch(settings)
    engine = build_engine(settings)
    parts = build_server(settings, engine)
    server, port = parts.server, parts.port
    start_serving(parts)
    metrics_http, _ = start_http_server(0, "127.0.0.1", registry=parts.metrics.registry)
    rules = yaml.safe_load(RULES.read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]
             if r.get("alert") in ALERTS}
    tmp = Path(tempfile.mkdtemp())
    stack = contextlib.ExitStack()
    query = stack.enter_context(running_prometheus([metrics_http.server_port], tmp)).query

    split = load_split("test")
    rows = []
    try:
        deadline = time.time() + 60
        while not query("up == 1") and time.time() < deadline:
            time.sleep(0.5)
        with AxguardClient(f"127.0.0.1:{port}", timeout=120) as client:
            for name in [*CONDITIONS, "clean"]:
                rng = np.random.default_rng(0)
                order = [i % len(split.images) for i in range(WINDOW)]
                correct = flagged_correct = wrong = flagged_wrong = 0
                for lo in range(0, WINDOW, 100):
                    batch = [_png(CONDITIONS[name](split.images[i], rng))
                             for i in order[lo:lo + 100]]
                    for i, r in zip(order[lo:lo + 100], client.check_batch(batch), strict=True):
                        ok = r.prediction.class_index == int(split.labels[i])
                        correct += ok
                        wrong += not ok
                        flagged_correct += ok and r.verdict.likely_wrong
                        flagged_wrong += (not ok) and r.verdict.likely_wrong
                time.sleep(3)  # two scrapes and a rule evaluation of the full window
                psi = {r["metric"]["score"]: float(r["value"][1])
                       for r in query("axguard_drift_psi")}
                share = query("axguard_drift_flagged_share")
                fired = {a: bool(query(expr)) for a, expr in exprs.items()}
                rows.append({
                    "condition": name, "checks": WINDOW, "accuracy": correct / WINDOW,
                    "false_alarm_rate": flagged_correct / max(correct, 1),
                    "error_recall": flagged_wrong / wrong if wrong else None,
                    "flagged_share": float(share[0]["value"][1]) if share else None,
                    "psi": psi, "alerts": fired})
                print(rows[-1], flush=True)
    finally:
        stack.close()
        metrics_http.shutdown()
        server.stop(None).wait()
        parts.plane.close()
        shutil.rmtree(tmp, ignore_errors=True)
    expected_share = engine.calibration.threshold.flagged_share
    result = {"command": "make bench-drift",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "calibration_id": engine.calibration.calibration_id,
              "calibration_flagged_share": expected_share,
              "calibration_false_alarm_promise": engine.calibration.threshold.target,
              "window": WINDOW, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Drift alerts ({result['command']}, {result['machine']})", "",
             f"Demo model, calibration {result['calibration_id']} (expects "
             f"{expected_share:.1%} flagged; promise: at most "
             f"{result['calibration_false_alarm_promise']:.0%} false alarms). Each row: "
             f"{WINDOW} checks of the held-out test digits, the drift window full of them.", "",
             "| condition | accuracy | flagged | false alarms | error recall | PSI risk | "
             "PSI MSP | PSI class | calibration stale | flag rate far |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        recall = "–" if r["error_recall"] is None else f"{r['error_recall']:.2f}"
        share = "–" if r["flagged_share"] is None else f"{r['flagged_share']:.3f}"
        p = r["psi"]
        lines.append(
            f"| {r['condition']} | {r['accuracy']:.3f} | {share} | "
            f"{r['false_alarm_rate']:.3f} | {recall} | {p.get('risk', float('nan')):.3f} | "
            f"{p.get('msp', float('nan')):.3f} | {p.get('predicted_class', float('nan')):.3f} | "
            f"{'fires' if r['alerts'][ALERTS[0]] else 'quiet'} | "
            f"{'fires' if r['alerts'][ALERTS[1]] else 'quiet'} |")
    (RESULTS / "drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    clean_quiet = all(not any(r["alerts"].values()) for r in rows if r["condition"] == "clean")
    shifted_loud = all(any(r["alerts"].values()) for r in rows if r["condition"] != "clean")
    return 0 if clean_quiet and shifted_loud else 1


if __name__ == "__main__":
    raise SystemExit(main())
