"""The paper's figures on a user's model and labelled images, one HTML page:

- Figures 2, 3, 7: CO of all six methods × SUM and PRODUCT, correct vs wrong predictions,
  the paper's labelled score (κ from the true label) beside the label-free one (κ from the
  prediction: what a service can compute), as boxplots and histograms, and the gaps;
- Figure 4: GAX's CO over optimisation steps, one curve per image, with its target;
- Figure 8: Layer Grad-CAM's CO at each convolutional stage of the network, as boxplots.

Every number is measured here on the given images; nothing is a constant.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ..calibration.datasets import LabelledImages  # noqa: E402
from ..calibration.report import CORRECT, FIGURES_LOADED_SCRIPT, WRONG, correct_vs_wrong
from ..config import GaxSettings  # noqa: E402
from ..engine.core import CheckItem, CheckResult, Engine  # noqa: E402
from ..engine.model import ModelBundle  # noqa: E402
from ..engine.scoring import AX_PROCESSES  # noqa: E402
from ..errors import InvalidInput  # noqa: E402
from ..serving.diagnoser import Diagnoser  # noqa: E402


@dataclass
class CoTable:
    """Per image: label-free and labelled CO of each (method, process) pair, and whether
    the prediction was wrong."""

    pairs: list[tuple[str, str]]
    label_free: dict[tuple[str, str], np.ndarray]
    labelled: dict[tuple[str, str], np.ndarray]
    is_error: np.ndarray

    def gaps(self) -> list[dict]:
        """Mean CO of correct minus mean CO of wrong predictions, per pair, both scores."""
        rows = []
        ok, bad = ~self.is_error, self.is_error
        for pair in self.pairs:
            row = {"method": pair[0], "ax_process": pair[1]}
            for kind, values in (("labelled", self.labelled[pair]),
                                 ("label_free", self.label_free[pair])):
                row[f"{kind}_correct_mean"] = float(values[ok].mean()) if ok.any() else None
                row[f"{kind}_wrong_mean"] = float(values[bad].mean()) if bad.any() else None
                row[f"{kind}_gap"] = (row[f"{kind}_correct_mean"] - row[f"{kind}_wrong_mean"]
                                      if ok.any() and bad.any() else None)
            rows.append(row)
        return rows


def require_finite(results: list[CheckResult], images: LabelledImages, start: int
                   ) -> list[CheckResult]:
    """Return the results of images[start:]; InvalidInput naming the first image whose
    model output was not finite (the figures compare every image: none may be missing)."""
    for k, result in enumerate(results):
        if result.error is not None:
            raise InvalidInput(f"{images.names[start + k]}: {result.error} — the paper's "
                               "figures need every image; leave it out of the data",
                               field="data")
    return results


def co_table(engine: Engine, images: LabelledImages, batch_size: int = 32,
             progress: bool = False) -> CoTable:
    """Check every image with every available method × both AX processes and its label."""
    pairs = [(m, p) for m in engine.available for p in AX_PROCESSES]
    free: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    labelled: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    errors: list[bool] = []
    spec = engine.bundle.spec
    batches = images.batches(spec, batch_size)
    for x, y in tqdm(batches, total=-(-len(images) // batch_size), disable=not progress,
                     desc="CO, all methods"):
        results = require_finite(engine.check([CheckItem(img, pairs=tuple(pairs),
                                                         label=int(label))
                                               for img, label in zip(x, y, strict=True)]),
                                 images, len(errors))
        for result, label in zip(results, y, strict=True):
            errors.append(result.class_index != label)
            for score in result.scores:
                pair = (score.method, score.ax_process)
                free[pair].append(score.score)
                labelled[pair].append(score.labelled_score)
    return CoTable(pairs, {p: np.asarray(v) for p, v in free.items()},
                   {p: np.asarray(v) for p, v in labelled.items()}, np.asarray(errors))


def figure_co(table: CoTable, kind: str, out: Path) -> Path:
    """Figures 2/3/7: boxplots or histograms of CO, correct vs wrong, labelled | label-free."""
    pairs = table.pairs
    fig, axes = plt.subplots(len(pairs), 2, figsize=(9, 1.9 * len(pairs)), squeeze=False)
    for row, pair in enumerate(pairs):
        for col, (label, values) in enumerate((("labelled CO (paper; needs the label)",
                                                table.labelled[pair]),
                                               ("label-free CO", table.label_free[pair]))):
            ax = axes[row, col]
            correct_vs_wrong(ax, values, table.is_error, kind)
            ax.set_title(f"{pair[0]} / {pair[1]}: {label}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = out / f"co_{'boxplots' if kind == 'box' else 'histograms'}.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


@dataclass
class GaxCurves:
    """Figure 4's data: CO per step for some images, and the target."""

    target_co: float
    curves: list[list[float]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    wrong: list[bool] = field(default_factory=list)


def gax_curves(bundle: ModelBundle, images: LabelledImages, table: CoTable, *, count: int,
               max_steps: int, target_co: float) -> GaxCurves:
    """Run GAX on `count` images (wrong predictions first) towards `target_co`."""
    diagnoser = Diagnoser(bundle, GaxSettings(max_steps_cap=max_steps))
    order = np.argsort(~table.is_error, kind="stable")[:count]  # wrong ones first
    spec = bundle.spec
    curves = GaxCurves(target_co)
    for i in order:
        image = images.load(int(i), spec)
        options = diagnoser.options(image, target_co=target_co, max_steps=max_steps)
        curves.curves.append([step.co_score for step in diagnoser.run(image, options)])
        curves.names.append(images.names[int(i)])
        curves.wrong.append(bool(table.is_error[int(i)]))
    return curves


def figure_gax(curves: GaxCurves, out: Path) -> Path:
    """Figure 4: CO over GAX steps, one line per image, the target dashed."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for values, wrong in zip(curves.curves, curves.wrong, strict=True):
        ax.plot(range(len(values)), values, color=WRONG if wrong else CORRECT, alpha=0.8)
    ax.axhline(curves.target_co, color="black", linestyle="--", linewidth=1,
               label=f"target CO {curves.target_co:.3g}")
    ax.set_xlabel("GAX step")
    ax.set_ylabel("CO score (label-free, target class)")
    ax.set_title("GAX: CO over optimisation steps (red: prediction was wrong)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "gax_curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def conv_stages(network: nn.Module) -> list[str]:
    """The last Conv2d of each convolutional stage of a network: descend while only one
    child holds Conv2d layers, then take each child that holds one (ResNet: conv1,
    layer1 … layer4). A leaf layer, because a traced network (make_relus_unique) calls its
    leaves, not its containers, so only a leaf's hook sees the forward."""
    def convs(module: nn.Module) -> list[str]:
        return [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]

    prefix, module = "", network
    while True:
        children = [(n, c) for n, c in module.named_children() if convs(c)]
        if len(children) == 1 and not isinstance(children[0][1], nn.Conv2d):
            prefix, module = f"{prefix}{children[0][0]}.", children[0][1]
            continue
        return [f"{prefix}{n}" + (f".{convs(c)[-1]}" if convs(c)[-1] else "")
                for n, c in children]


def layer_grad_cam(bundle: ModelBundle, images: LabelledImages,
                   batch_size: int = 32) -> dict[str, dict[str, list[float]]]:
    """Figure 8's data: per stage, label-free and labelled CO (SUM) of Layer Grad-CAM."""
    user_network = bundle.network[1]  # the bundle is Normalize → the user's network
    out: dict[str, dict[str, list[float]]] = {}
    for stage in conv_stages(user_network):
        engine = Engine(dataclasses.replace(bundle, grad_cam_layer=stage),
                        default_methods=("layer_grad_cam",))
        free, labelled = [], []
        for x, y in images.batches(bundle.spec, batch_size):
            results = require_finite(engine.check([CheckItem(img, methods=("layer_grad_cam",),
                                                             label=int(label))
                                                   for img, label in zip(x, y, strict=True)]),
                                     images, len(free))
            free += [r.scores[0].score for r in results]
            labelled += [r.scores[0].labelled_score for r in results]
        out[stage] = {"label_free": free, "labelled": labelled}
    return out


def figure_layers(stages: dict[str, dict[str, list[float]]], is_error: np.ndarray,
                  out: Path) -> Path:
    """Figure 8: boxplots of Layer Grad-CAM CO per stage, correct vs wrong."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.7 * len(stages) + 2), squeeze=False)
    ok, bad = ~is_error, is_error
    for col, kind in enumerate(("labelled", "label_free")):
        ax = axes[0, col]
        data, labels, colours = [], [], []
        for stage, values in stages.items():
            v = np.asarray(values[kind])
            for mask, name, colour in ((ok, "correct", CORRECT), (bad, "wrong", WRONG)):
                if mask.any():
                    data.append(v[mask])
                    labels.append(f"{stage} {name}")
                    colours.append(colour)
        parts = ax.boxplot(data, orientation="horizontal", widths=0.6, patch_artist=True)
        for patch, colour in zip(parts["boxes"], colours, strict=True):
            patch.set_facecolor(colour)
            patch.set_alpha(0.5)
        ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_title(f"Layer Grad-CAM / sum: {kind.replace('_', '-')} CO by stage", fontsize=9)
    fig.tight_layout()
    path = out / "layer_grad_cam.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def render_page(summary: dict, figures: dict[str, Path]) -> str:
    """The self-contained HTML page (figures inlined)."""
    images = {k: base64.b64encode(p.read_bytes()).decode() for k, p in figures.items()}
    rows = "\n".join(
        f"<tr><td>{html.escape(g['method'])}/{g['ax_process']}</td>"
        f"<td>{_fmt(g['labelled_correct_mean'])}</td><td>{_fmt(g['labelled_wrong_mean'])}</td>"
        f"<td><b>{_fmt(g['labelled_gap'])}</b></td>"
        f"<td>{_fmt(g['label_free_correct_mean'])}</td>"
        f"<td>{_fmt(g['label_free_wrong_mean'])}</td><td><b>{_fmt(g['label_free_gap'])}</b></td>"
        f"</tr>" for g in summary["gaps"])
    best = summary["largest_gap"]
    captions = {
        "co_boxplots": "Figures 2, 3, 7: CO boxplots, all methods × SUM and PRODUCT",
        "co_histograms": "CO histograms, the same scores",
        "gax_curves": "Figure 4: GAX CO over steps",
        "layer_grad_cam": "Figure 8: Layer Grad-CAM at each convolutional stage",
    }
    figs = "\n".join(f'<h2>{html.escape(captions[k])}</h2><img alt="{k}" '
                     f'src="data:image/png;base64,{v}">' for k, v in images.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Paper figures: {html.escape(summary['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}
img{{max-width:100%}}</style></head>
<body data-figures="{len(images)}">
<h1>The paper's figures on {html.escape(summary['model'])}</h1>
<p id="counts">{summary['images']} images from {html.escape(summary['data'])}:
{summary['errors']} wrong, accuracy {summary['accuracy']:.3f}.</p>
<h2>The gap: mean CO of correct minus wrong predictions</h2>
<p>The paper picks the method with the largest gap of its <i>labelled</i> score, which
needs the true label; a service only has the <i>label-free</i> score.
Largest labelled gap: <b id="best-labelled">{html.escape(best['labelled'])}</b>;
largest label-free gap: <b id="best-label-free">{html.escape(best['label_free'])}</b>.</p>
<table><tr><th>method/process</th><th>labelled, correct</th><th>labelled, wrong</th>
<th>labelled gap</th><th>label-free, correct</th><th>label-free, wrong</th>
<th>label-free gap</th></tr>
{rows}</table>
{figs}
{FIGURES_LOADED_SCRIPT}
</body></html>
"""


def write_paper_figures(bundle: ModelBundle, images: LabelledImages, out: Path, *,
                        gax_images: int = 5, gax_steps: int = 200,
                        gax_target: float | None = None, batch_size: int = 32,
                        progress: bool = False) -> dict:
    """Measure, draw every figure, write index.html and summary.json into `out`; return
    the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(bundle)
    table = co_table(engine, images, batch_size, progress)
    gaps = table.gaps()

    def largest(kind: str) -> str:
        known = [g for g in gaps if g[f"{kind}_gap"] is not None]
        if not known:
            return "none (no wrong predictions)"
        g = max(known, key=lambda g: g[f"{kind}_gap"])
        return f"{g['method']}/{g['ax_process']} ({g[f'{kind}_gap']:.3g})"

    ok = ~table.is_error
    reference = table.label_free[("saliency", "sum")] if ("saliency", "sum") in table.pairs \
        else table.label_free[table.pairs[0]]
    # The calibration's rule for a GAX target: the 95th percentile of correct predictions'
    # label-free CO (calibrate's gax_percentile).
    target = gax_target if gax_target is not None else float(
        np.percentile(reference[ok] if ok.any() else reference, 95))
    curves = gax_curves(bundle, images, table, count=gax_images, max_steps=gax_steps,
                        target_co=target)
    stages = layer_grad_cam(bundle, images, batch_size)
    figures = {"co_boxplots": figure_co(table, "box", out),
               "co_histograms": figure_co(table, "hist", out),
               "gax_curves": figure_gax(curves, out),
               "layer_grad_cam": figure_layers(stages, table.is_error, out)}
    summary = {
        "model": bundle.name, "data": images.source, "images": len(images),
        "errors": int(table.is_error.sum()), "accuracy": float(ok.mean()),
        "gaps": gaps, "largest_gap": {"labelled": largest("labelled"),
                                      "label_free": largest("label_free")},
        "gax": {"target_co": target, "images": curves.names, "wrong": curves.wrong,
                "steps": [len(c) - 1 for c in curves.curves],
                "reached": [bool(c[-1] >= target) for c in curves.curves]},
        "layer_grad_cam": {stage: {
            "labelled_gap": _gap(np.asarray(v["labelled"]), table.is_error),
            "label_free_gap": _gap(np.asarray(v["label_free"]), table.is_error)}
            for stage, v in stages.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "index.html").write_text(render_page(summary, figures))
    return summary


def _gap(values: np.ndarray, is_error: np.ndarray) -> float | None:
    if not is_error.any() or is_error.all():
        return None
    return float(values[~is_error].mean() - values[is_error].mean())

