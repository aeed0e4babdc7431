"""`axguard report`: PNG figures and one self-contained HTML page from an artifact."""

from __future__ import annotations

import base64
import html
import string
from importlib import resources
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ..flag.artifact import CalibrationArtifact, PairedDifference  # noqa: E402
from ..flag.verdict import co_feature_name, error_sign  # noqa: E402
from . import metrics as m  # noqa: E402

CORRECT, WRONG = "#2b7bba", "#d7301f"


def _arrays(artifact: CalibrationArtifact) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    s = artifact.samples
    features = {k: np.asarray(v) for k, v in s.features.items()}
    is_error = np.asarray(s.labels) != np.asarray(s.predictions)
    fit = np.asarray(s.split) == "fit"
    # The risk is compared with MSP out of fold on the fit split (see calibrate.py).
    features["risk"] = features["risk_out_of_fold"]
    return features, is_error, fit


def _pairs(artifact: CalibrationArtifact) -> list[tuple[str, str]]:
    return [(p.method, p.ax_process) for p in artifact.pairs]


FIGURES_LOADED_SCRIPT = """<script>
// For automated checks: how many figures actually decoded.
window.addEventListener("load", () => {
  const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figuresLoaded = ok;
});
</script>"""


def correct_vs_wrong(ax, values: np.ndarray, is_error: np.ndarray, kind: str) -> None:  # noqa: ANN001
    """One panel: `values` of correct vs wrong predictions as boxplots ("box") or
    histograms; an empty group is left out."""
    groups = [(name, values[mask], colour) for name, mask, colour in
              (("correct", ~is_error, CORRECT), ("wrong", is_error, WRONG)) if mask.any()]
    if kind == "box":
        ax.boxplot([g for _, g, _ in groups] or [values], orientation="horizontal", widths=0.6)
        ax.set_yticks(range(1, len(groups) + 1), [f"{n} ({len(g)})" for n, g, _ in groups])
    else:
        bins = np.histogram_bin_edges(values, bins=30)
        for name, g, colour in groups:
            ax.hist(g, bins=bins, color=colour, alpha=0.6, density=True, label=name)
        ax.legend(fontsize=7)


def figure_distributions(artifact: CalibrationArtifact, kind: str, out: Path) -> Path:
    """Boxplots or histograms of CO for correct vs wrong: labelled left, label-free right."""
    features, is_error, _ = _arrays(artifact)
    pairs = _pairs(artifact)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(9, 2.6 * len(pairs)), squeeze=False)
    for row, (method, process) in enumerate(pairs):
        for col, labelled in enumerate((True, False)):
            ax = axes[row, col]
            values = features[co_feature_name(method, process, labelled)]
            title = (f"{method}/{process}: "
                     f"{'labelled CO (paper, needs the label)' if labelled else 'label-free CO'}")
            correct_vs_wrong(ax, values, is_error, kind)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("CO score", fontsize=8)
    fig.tight_layout()
    path = out / f"co_{'boxplots' if kind == 'box' else 'histograms'}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure_roc(artifact: CalibrationArtifact, out: Path) -> Path:
    """ROC curves (errors as positives): each label-free score against MSP, all images;
    and the risk against MSP out of fold on the fit split."""
    features, is_error, fit = _arrays(artifact)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name in [n for n in features if n.startswith("co") or n in ("margin", "energy")
                 or n.startswith(("boundary", "runner_up_margin", "perturbed"))]:
        fpr, tpr, _ = roc_curve(is_error, error_sign(name) * features[name])
        auc = m.auroc(is_error, error_sign(name) * features[name])
        style = ":" if name.startswith("co_labelled") else "-"
        left.plot(fpr, tpr, style, lw=1, label=f"{name} ({auc:.3f})")
    fpr, tpr, _ = roc_curve(is_error, -features["msp"])
    left.plot(fpr, tpr, "k-", lw=2, label=f"MSP ({m.auroc(is_error, -features['msp']):.3f})")
    left.set_title("every score, all calibration images\n(dotted: labelled CO, needs the label)",
                   fontsize=9)
    for name, colour in (("risk", "#e08214"), ("msp", "k")):
        values = error_sign(name) * features[name][fit]
        fpr, tpr, _ = roc_curve(is_error[fit], values)
        right.plot(fpr, tpr, color=colour, lw=2,
                   label=f"{name} ({m.auroc(is_error[fit], values):.3f})")
    right.set_title("risk vs MSP, out of fold on the fit split", fontsize=9)
    for ax in (left, right):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
        ax.set_xlabel("false-positive rate (correct flagged)", fontsize=8)
        ax.set_ylabel("true-positive rate (errors flagged)", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = out / "roc.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure_risk_coverage(artifact: CalibrationArtifact, out: Path) -> Path:
    """Selective risk against coverage for the risk, MSP and a perfect score (out of fold)."""
    features, is_error, fit = _arrays(artifact)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    err = is_error[fit]
    for name, values, style in (("risk", features["risk"][fit], "-"),
                                ("MSP", -features["msp"][fit], "--"),
                                ("perfect", err.astype(float), ":")):
        coverage, risk = m.risk_coverage(err, values)
        ax.plot(coverage, risk, style, label=f"{name} (AURC {np.mean(risk):.4f})")
    ax.set_xlabel("coverage (share of predictions accepted)")
    ax.set_ylabel("selective risk (error rate among accepted)")
    ax.set_title("risk–coverage, out of fold on the fit split", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "risk_coverage.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(i) -> str:  # noqa: ANN001
    return f"{i.value:.3f} <small>[{i.low:.3f}, {i.high:.3f}]</small>"


CAPTIONS = {
    "co_boxplots": "CO scores of wrong (upper box) and correct (lower box) predictions. "
                   "Left: the "
                   "paper's labelled score, which uses the true label and so cannot run in "
                   "production. Right: the label-free score the flag may use.",
    "co_histograms": "The same distributions as histograms (density).",
    "roc": "ROC curves with errors as positives. Left: each score on all calibration "
           "images, against MSP (black). Right: the fitted risk against MSP, out of "
           "fold on the fit split.",
    "risk_coverage": "Error rate among the predictions kept, as fewer are kept: lower is "
                     "better.",
}


def report_template() -> string.Template:
    """The report page (package data: calibration/templates/report.html)."""
    page = resources.files(__package__).joinpath("templates", "report.html")
    return string.Template(page.read_text(encoding="utf-8"))


def _verdict_text(d: PairedDifference) -> str:
    if d.low > 0:
        return "Yes: the risk beats MSP out of fold (the whole interval is above 0)."
    if d.high < 0:
        return "No: MSP alone separates errors better than the risk out of fold."
    return "Not measurably: the interval of the difference includes 0."


def _metric_rows(a: CalibrationArtifact) -> str:
    return "".join(
        f"<tr><td>{html.escape(s.name)}</td><td>{'yes' if s.label_free else '<b>no</b>'}</td>"
        f"<td>{s.evaluated_on}</td><td>{_fmt(s.auroc)}</td><td>{_fmt(s.aupr_error)}</td>"
        f"<td>{_fmt(s.fpr_at_95_correct_kept)}</td><td>{_fmt(s.aurc)}</td>"
        f"<td>{_fmt(s.eaurc)}</td><td>{s.median_gap:+.3f}</td>"
        f"<td>{s.mann_whitney_p:.2g}</td></tr>"
        for s in a.metrics)


def _ranking_rows(a: CalibrationArtifact) -> str:
    return "".join(
        f"<tr><td>{r.method}/{r.ax_process}</td><td>{r.auroc_label_free:.3f}</td>"
        f"<td>{r.median_gap_label_free:+.3f}</td><td>{r.auroc_labelled:.3f}</td>"
        f"<td>{r.median_gap_labelled:+.3f}</td></tr>" for r in a.ranking)


def _selection_html(a: CalibrationArtifact) -> str:
    """The evidence families' section: the rule, what was kept, each family's effect."""
    sel = a.selection
    steps = "".join(
        f"<tr><td>{st.step}</td><td>{html.escape(st.family)}</td><td>{st.auroc:.4f}</td>"
        f"<td>{st.gain:+.4f}</td><td>{'' if st.gain_low != st.gain_low else f'{st.gain_low:+.4f}'}"
        f"</td><td>{'<b>kept</b>' if st.accepted else ''}</td></tr>" for st in sel.steps)
    family_rows = "".join(
        f"<tr><td>{html.escape(fr.family)}</td><td>{'<b>yes</b>' if fr.kept else 'no'}</td>"
        f"<td>{html.escape(', '.join(f'{k} {v:+.3f}' for k, v in fr.coefficients.items()))}"
        f"</td><td>{fr.drop_one:+.4f}</td><td>{fr.cost:g}</td></tr>" for fr in sel.families)
    fused = sel.fused_vs_msp
    epsilons = ", ".join(f"ε={e:g}: {u:.4f}" for e, u in zip(sel.epsilon_grid,
                                                              sel.epsilon_aurocs, strict=True))
    return (
        f"<p>Rule: {html.escape(sel.rule)} ({sel.folds}-fold cross-fitting, repeated "
        f"{sel.repeats}×). Kept: <b id='kept'>{html.escape(', '.join(sel.kept))}</b>; the "
        f"verdict adds at most {sel.cost:g} plain forwards"
        f"{'' if sel.max_cost is None else f' (bound {sel.max_cost:g})'}. "
        f"{html.escape(sel.skipped_reason)}</p>"
        + (f"<p>Fused model minus MSP, AUROC out of fold: {fused.difference:+.4f} "
           f"[{fused.low:+.4f}, {fused.high:+.4f}].</p>" if fused is not None else "")
        + ("<table><tr><th>family</th><th>served</th><th>standardised coefficients</th>"
           "<th>drop-one effect (AUROC, out of fold)</th><th>cost (plain forwards)</th></tr>"
           f"{family_rows}</table>" if family_rows else "")
        + (f"<p>Perturbation step, out-of-fold AUROC of msp + perturbation: {epsilons}</p>"
           if epsilons else "")
        + ("<table><tr><th>step</th><th>family tried</th><th>AUROC (out of fold)</th>"
           f"<th>gain</th><th>gain, 95% lower bound</th><th></th></tr>{steps}</table>"
           if steps else ""))


def _figures_html(figures: dict[str, Path]) -> str:
    return "".join(
        f'<figure><img alt="{key}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{CAPTIONS[key]}'
        f"</figcaption></figure>" for key, path in figures.items())


def render_html(artifact: CalibrationArtifact, figures: dict[str, Path]) -> str:
    """Return the self-contained report page (figures embedded as base64 PNG)."""
    a, t, d = artifact, artifact.threshold, artifact.risk_vs_msp
    promise = (f"fires on at most {t.target:.0%} of correct predictions"
               if t.mode == "false_alarm"
               else f"catches at least {t.target:.0%} of wrong predictions")
    return report_template().substitute(
        calibration_id=a.calibration_id, figure_count=len(figures),
        model_name=html.escape(a.model.name), model_version=html.escape(a.model.version),
        fingerprint=a.model.fingerprint[:16], verdict=_verdict_text(d),
        risk_auroc=_fmt(a.metric("risk", "out_of_fold").auroc),
        msp_auroc=_fmt(a.metric("msp", "out_of_fold").auroc),
        difference=f"{d.difference:+.3f}", difference_low=f"{d.low:+.3f}",
        difference_high=f"{d.high:+.3f}", data_source=html.escape(a.data.source),
        n_images=a.data.n_images, n_errors=a.data.n_errors, accuracy=f"{a.data.accuracy:.4f}",
        promise=promise, confidence=f"{1 - t.delta:.2f}", threshold=f"{t.value:.4f}",
        order_index=t.order_index, n_used=t.n_used,
        false_alarm_rate=f"{t.achieved_false_alarm_rate:.2%}",
        error_recall=f"{t.achieved_error_recall:.2%}",
        risk_features=", ".join(a.flag.risk_model.features),
        gax_target=f"{a.gax_target:.2f}", gax_percentile=f"{a.gax_target_percentile:.0f}",
        notes="".join(f"<li>{html.escape(n)}</li>" for n in a.notes),
        selection=_selection_html(a), ranking=_ranking_rows(a), figures=_figures_html(figures),
        metric_rows=_metric_rows(a), figures_loaded_script=FIGURES_LOADED_SCRIPT)


def write_report(artifact: CalibrationArtifact, out: Path) -> Path:
    """Write the PNG figures and index.html into `out`; return the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "co_boxplots": figure_distributions(artifact, "box", out),
        "co_histograms": figure_distributions(artifact, "hist", out),
        "roc": figure_roc(artifact, out),
        "risk_coverage": figure_risk_coverage(artifact, out),
    }
    page = out / "index.html"
    page.write_text(render_html(artifact, figures))
    return page
