"""`make paper-demo`: the paper's experiments on the bundled digits, in minutes.

1. Export scikit-learn's digits (the demo's train / calibration / test splits) as ImageFolder
   PNGs under build/paper-demo/data/{train,val,test}.
2. `finetune` a truncated ResNet-34 twice, like the paper's Resnet34_1 and Resnet34_sub:
   the same recipe stopped at two validation-accuracy targets.
3. `paper-figures` for both on the test split (Figures 2-4, 7, 8; one page each).
4. Compare: bench/results/paper_demo.{json,md} — accuracy, and the labelled and
   label-free gaps of every method for the better and the less trained model.

Usage: python scripts/paper_demo.py [--out build/paper-demo] [--input-size 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from axguard.builder import build_bundle
from axguard.calibration.datasets import load_labelled_images
from axguard.config import load_settings
from axguard.demo.data import load_split
from axguard.paper.figures import write_paper_figures
from axguard.paper.finetune import FinetuneOptions, finetune

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELS = {"resnet34_1": 0.97, "resnet34_sub": 0.80}
"""Model name → validation-accuracy target (the _sub model stops earlier)."""


def export_digits(root: Path) -> dict[str, int]:
    """Write the digits splits as root/{train,val,test}/<digit>/<index>.png."""
    counts = {}
    for split, folder in (("train", "train"), ("calibration", "val"), ("test", "test")):
        data = load_split(split)
        for index, image, label in zip(data.indices, data.images, data.labels, strict=True):
            target = root / folder / str(int(label))
            target.mkdir(parents=True, exist_ok=True)
            image.save(target / f"{int(index)}.png")
        counts[folder] = len(data.labels)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "paper-demo")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--arch", default="resnet34")
    args = parser.parse_args()
    start = time.time()
    data = args.out / "data"
    counts = export_digits(data)
    report: dict = {"data": counts, "arch": args.arch, "input_size": args.input_size,
                    "models": {}}
    for name, target in MODELS.items():
        options = FinetuneOptions(arch=args.arch, data=data / "train", val=data / "val",
                                  out=args.out / name, input_size=args.input_size,
                                  target_accuracy=target, min_iterations=50,
                                  max_iterations=3000, eval_every=25, name=name)
        result = finetune(options, progress=True)
        settings = load_settings(Path(result.config_file))
        bundle = build_bundle(settings.model, settings.attribution)
        images = load_labelled_images(str(data / "test"), bundle.class_names)
        summary = write_paper_figures(bundle, images, args.out / name / "figures",
                                      gax_images=5, gax_steps=150, progress=True)
        shown = RESULTS / "paper_demo"  # the figures the README shows
        shown.mkdir(parents=True, exist_ok=True)
        for figure in ("co_boxplots", "gax_curves", "layer_grad_cam"):
            shutil.copy(args.out / name / "figures" / f"{figure}.png",
                        shown / f"{name}_{figure}.png")
        report["models"][name] = {
            "target_accuracy": target, "iterations": result.iterations,
            "val_accuracy": result.val_accuracy, "train_seconds": round(result.seconds),
            "test_accuracy": summary["accuracy"], "test_errors": summary["errors"],
            "page": str((args.out / name / "figures" / "index.html").relative_to(ROOT)),
            "summary": summary}
        print(f"{name}: {result.iterations} iterations, val {result.val_accuracy:.3f}, "
              f"test {summary['accuracy']:.3f}", flush=True)
    report["seconds"] = round(time.time() - start)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "paper_demo.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "paper_demo.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    better, sub = (report["models"][n] for n in MODELS)
    lines = [
        "# The paper's experiments on the digits (`make paper-demo`)", "",
        f"Truncated {report['arch']} (first 8 child modules + a new linear layer), input "
        f"{report['input_size']} px, Adam (0.001, betas 0.5/0.999), batches of 32; digits "
        f"splits {report['data']}; {report['seconds']} s in all.", "",
        "| model | target | iterations | val accuracy | test accuracy | test errors |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {m['target_accuracy']} | {m['iterations']} | {m['val_accuracy']:.3f} | "
          f"{m['test_accuracy']:.3f} | {m['test_errors']} |"
          for n, m in report["models"].items()],
        "", "Gap = mean CO of correct minus mean CO of wrong test predictions:", "",
        "| method/process | labelled gap, _1 | labelled gap, _sub | label-free gap, _1 | "
        "label-free gap, _sub |", "|---|---|---|---|---|"]
    positive = {(name, kind): 0 for name in ("_1", "_sub") for kind in ("labelled",
                                                                          "label_free")}
    wider = {"labelled": 0, "label_free": 0}
    both = {"labelled": 0, "label_free": 0}
    for g1, gs in zip(better["summary"]["gaps"], sub["summary"]["gaps"], strict=True):
        cells = []
        for kind in ("labelled", "label_free"):
            a, b = g1[f"{kind}_gap"], gs[f"{kind}_gap"]
            cells += [f"{a:.3g}" if a is not None else "—", f"{b:.3g}" if b is not None
                      else "—"]
            positive[("_1", kind)] += a is not None and a > 0
            positive[("_sub", kind)] += b is not None and b > 0
            if a is not None and b is not None and a > 0 and b > 0:
                both[kind] += 1
                wider[kind] += a > b
        lines.append(f"| {g1['method']}/{g1['ax_process']} | {cells[0]} | {cells[1]} | "
                     f"{cells[2]} | {cells[3]} |")
    pairs = len(better["summary"]["gaps"])
    lines += ["", "In the paper's direction (correct predictions score higher, gap > 0): "
              f"labelled {positive[('_1', 'labelled')]} of {pairs} pairs for _1 and "
              f"{positive[('_sub', 'labelled')]} for _sub; label-free "
              f"{positive[('_1', 'label_free')]} and {positive[('_sub', 'label_free')]}. "
              f"Of the pairs positive for both, the better-trained model's gap is the wider "
              f"in {wider['labelled']} of {both['labelled']} (labelled) and "
              f"{wider['label_free']} of {both['label_free']} (label-free).",
              f"Largest labelled gap: _1 {better['summary']['largest_gap']['labelled']}, "
              f"_sub {sub['summary']['largest_gap']['labelled']}; label-free: _1 "
              f"{better['summary']['largest_gap']['label_free']}, _sub "
              f"{sub['summary']['largest_gap']['label_free']}.",
              "", "Figures: " + ", ".join(f"`{m['page']}`" for m in report["models"].values())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
