"""Flag quality on the demo model and on an under-trained one: `make bench-flag`.

For each model: calibrate on the digits calibration split (false-alarm mode, β = δ = 0.05,
Saliency and Deconvolution with SUM), evaluate on the test split, and try the
error-recall mode (recall 0.9). Writes bench/results/flag_quality.{json,md}.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from axguard.calibration.artifact import save_artifact
from axguard.calibration.calibrate import calibrate
from axguard.calibration.datasets import load_labelled_images
from axguard.calibration.evaluate import evaluate
from axguard.calibration.thresholds import GuaranteeUnavailable
from axguard.demo.bundle import load_demo_bundle
from axguard.demo.train import train_demo, write_assets
from axguard.engine import Engine
from axguard.model import load_bundle

RESULTS = Path(__file__).parent / "results"
SUB_EPOCHS = 1


def sub_bundle(folder: Path):
    network, spec, metrics = train_demo(epochs=SUB_EPOCHS)
    write_assets(network, spec, metrics, folder, SUB_EPOCHS)
    return load_bundle("axguard.demo.network:build_demo_net", spec=spec,
                       class_names=[str(d) for d in range(10)], weights=folder / "weights.pt",
                       name=f"digits-cnn-sub ({SUB_EPOCHS} epoch)")


def measure(bundle, out: Path, n_bootstrap: int) -> dict:
    cal_images = load_labelled_images("builtin:digits", bundle.class_names)
    test_images = load_labelled_images("builtin:digits-test", bundle.class_names)
    artifact = save_artifact(calibrate(Engine(bundle), cal_images, n_bootstrap=n_bootstrap,
                                       progress=False), out)
    engine = Engine(bundle, calibration=artifact)
    ev = evaluate(engine, test_images, n_bootstrap=n_bootstrap, progress=False)
    aurocs = {a.name: a.auroc.model_dump() for a in ev.aurocs}
    try:
        recall = calibrate(Engine(bundle), cal_images, mode="error_recall", recall=0.9,
                           n_bootstrap=50, progress=False)
        recall_result = {"threshold": recall.threshold.value,
                         "achieved_recall_threshold_split": recall.threshold.achieved_error_recall}
    except GuaranteeUnavailable as err:
        recall_result = {"refused": str(err)}
    return {
        "model": bundle.name,
        "calibration": {"n_images": artifact.data.n_images, "n_errors": artifact.data.n_errors,
                        "accuracy": artifact.data.accuracy,
                        "risk_features": artifact.risk_model.features,
                        "threshold": artifact.threshold.model_dump(), "notes": artifact.notes},
        "test": {"n_images": ev.n_images, "n_errors": ev.n_errors, "accuracy": ev.accuracy,
                 "false_alarm_rate": ev.false_alarm_rate,
                 "false_alarm_interval": ev.observed_interval, "promise_held": ev.promise_held,
                 "error_recall": ev.error_recall, "flagged_share": ev.flagged_share,
                 "auroc": aurocs, "risk_minus_msp": ev.risk_vs_msp.model_dump()},
        "error_recall_0.9": recall_result,
    }


def table(results: list[dict]) -> str:
    def cell(auroc: dict, name: str) -> str:
        a = auroc[name]
        return f"{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"

    lines = ["| model | test acc. | errors (cal/test) | labelled CO sal | labelled CO deconv "
             "| label-free CO sal | label-free CO deconv | MSP | risk | risk − MSP | "
             "false alarms (β=0.05) | held |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, a = r["test"], r["test"]["auroc"]
        d = t["risk_minus_msp"]
        lines.append(
            f"| {r['model']} | {t['accuracy']:.4f} | {r['calibration']['n_errors']}/"
            f"{t['n_errors']} | {cell(a, 'co_labelled:saliency:sum')} | "
            f"{cell(a, 'co_labelled:deconvolution:sum')} | {cell(a, 'co:saliency:sum')} | "
            f"{cell(a, 'co:deconvolution:sum')} | {cell(a, 'msp')} | {cell(a, 'risk')} | "
            f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | "
            f"{t['false_alarm_rate']:.4f} [{t['false_alarm_interval'][0]:.4f}, "
            f"{t['false_alarm_interval'][1]:.4f}] | {'yes' if t['promise_held'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    torch.set_num_threads(2)
    n_bootstrap = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    start = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(load_demo_bundle(), Path(tmp) / "demo.json", n_bootstrap),
                   measure(sub_bundle(Path(tmp) / "sub"), Path(tmp) / "sub.json", n_bootstrap)]
    payload = {"machine": f"{platform.machine()} {platform.processor()} "
                          f"{torch.get_num_threads()} torch threads",
               "command": "make bench-flag", "seconds": round(time.time() - start, 1),
               "results": results}
    (RESULTS / "flag_quality.json").write_text(json.dumps(payload, indent=1) + "\n")
    md = (f"# Flag quality (test split, AUROC with errors as positives, bootstrap 95%)\n\n"
          f"{table(results)}\n\nError-recall mode (0.9): "
          + "; ".join(f"{r['model']}: {r['error_recall_0.9']}" for r in results) + "\n")
    (RESULTS / "flag_quality.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
