"""The GAX viewer: one self-contained HTML page (and optionally a PNG) from a Diagnose stream.

In the spirit of the paper's Fig. 5A: a time-step slider; for the chosen step the heatmap of
each channel in a red–blue diverging map with its absolute maximum, the input image, the CO
score against the target, and a small plot of CO over steps.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .v1 import confidence_pb2 as pb


@dataclass
class Diagnosis:
    """Everything a Diagnose stream said, gathered for the viewer."""

    co: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    snapshots: list[tuple[int, float, np.ndarray]] = field(default_factory=list)
    result: pb.DiagnoseResult | None = None

    def add(self, event: pb.DiagnoseEvent) -> None:
        """Record one event."""
        kind = event.WhichOneof("event")
        if kind == "progress":
            self.co.append(event.progress.co_score)
            self.loss.append(event.progress.loss)
        elif kind == "snapshot":
            s = event.snapshot
            self.snapshots.append((s.step, s.co_score, tensor_array(s.heatmap)))
        elif kind == "result":
            r = event.result
            self.result = r
            self.snapshots.append((r.steps, r.final_co, tensor_array(r.heatmap)))

    @classmethod
    def from_events(cls, events: Iterable[pb.DiagnoseEvent]) -> Diagnosis:
        """Return the diagnosis of a complete stream."""
        diagnosis = cls()
        for event in events:
            diagnosis.add(event)
        return diagnosis


def tensor_array(tensor: pb.Tensor) -> np.ndarray:
    """Return a Tensor message as a float32 array."""
    return np.frombuffer(tensor.data, dtype="<f4").reshape(list(tensor.shape)).copy()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def render_html(diagnosis: Diagnosis, title: str = "GAX diagnosis") -> str:
    """Return the viewer page; needs a finished diagnosis (with its Result)."""
    r = diagnosis.result
    if r is None:
        raise ValueError("the diagnosis has no result (was it cancelled?)")
    image = tensor_array(r.image)
    data = {
        "title": title,
        "shape": list(image.shape),
        "image": _b64(image),
        "co": diagnosis.co,
        "target": r.target_co,
        "targetClass": r.target_class,
        "before": [r.prediction_before.class_name, r.prediction_before.probability],
        "after": [r.prediction_after.class_name, r.prediction_after.probability],
        "reached": r.reached_target,
        "seconds": r.seconds,
        "snapshots": [{"step": s, "co": c, "heatmap": _b64(h)} for s, c, h in diagnosis.snapshots],
    }
    return PAGE.replace("__DATA__", json.dumps(data)).replace("__TITLE__", title)


def write_png(diagnosis: Diagnosis, path: Path) -> Path:
    """Write the final step as a PNG figure: channels, input image and CO over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = diagnosis.result
    if r is None:
        raise ValueError("the diagnosis has no result")
    image = tensor_array(r.image)
    heatmap = diagnosis.snapshots[-1][2]
    channels = heatmap.shape[0]
    fig, axes = plt.subplots(1, channels + 2, figsize=(3 * (channels + 2), 3.2))
    names = "RGB" if channels == 3 else "L"
    for c in range(channels):
        peak = float(np.abs(heatmap[c]).max()) or 1.0
        axes[c].imshow(heatmap[c], cmap="RdBu_r", vmin=-peak, vmax=peak)
        axes[c].set_title(f"{names[c]}  |max| {peak:.3f}", fontsize=9)
        axes[c].axis("off")
    shown = image.transpose(1, 2, 0) if channels == 3 else image[0]
    axes[channels].imshow(shown, cmap=None if channels == 3 else "gray", vmin=0, vmax=1)
    axes[channels].set_title("input", fontsize=9)
    axes[channels].axis("off")
    axes[-1].plot(diagnosis.co, label="CO")
    axes[-1].axhline(r.target_co, color="grey", ls="--", label="target")
    axes[-1].set_xlabel("step")
    axes[-1].legend(fontsize=7)
    axes[-1].set_title(f"step {r.steps}: CO {r.final_co:.2f} / {r.target_co:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.row { display: flex; gap: 1em; align-items: flex-start; flex-wrap: wrap; }
.panel { text-align: center; font-size: 0.85em; }
canvas { image-rendering: pixelated; border: 1px solid #ccc; width: 192px; height: 192px; }
#slider { width: 600px; }
#plot { border: 1px solid #ccc; }
</style></head>
<body>
<h1>__TITLE__</h1>
<p id="summary"></p>
<p><label for="slider">time step</label>
<input type="range" id="slider" min="0" value="0" step="1">
<span id="step-label"></span> &mdash; <span id="co-label"></span></p>
<div class="row" id="channels"></div>
<h3>CO score over steps</h3>
<svg id="plot" width="600" height="160"></svg>
<script>
const D = __DATA__;
const [C, H, W] = D.shape;
const decode = b64 => new Float32Array(Uint8Array.from(atob(b64), c => c.charCodeAt(0)).buffer);
const image = decode(D.image);
const snaps = D.snapshots.map(s => ({step: s.step, co: s.co, h: decode(s.heatmap)}));
const names = C === 3 ? ["R", "G", "B"] : ["L"];
const row = document.getElementById("channels");
function panel(label) {
  const div = document.createElement("div"); div.className = "panel";
  const canvas = document.createElement("canvas"); canvas.width = W; canvas.height = H;
  const caption = document.createElement("div"); caption.textContent = label;
  div.append(canvas, caption); row.append(div); return [canvas, caption];
}
const heat = names.map(n => panel(n));
const input = panel("input image")[0];
// Red-blue diverging map: blue for negative, white at 0, red for positive.
function diverging(v) {
  const t = Math.max(-1, Math.min(1, v));
  return t >= 0 ? [255, Math.round(255 * (1 - t)), Math.round(255 * (1 - t))]
                : [Math.round(255 * (1 + t)), Math.round(255 * (1 + t)), 255];
}
function drawInput() {
  const ctx = input.getContext("2d"); const img = ctx.createImageData(W, H);
  for (let i = 0; i < H * W; i++) {
    for (let c = 0; c < 3; c++) img.data[4 * i + c] = Math.round(255 * image[(C === 3 ? c : 0) * H * W + i]);
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}
function drawStep(k) {
  const s = snaps[k];
  heat.forEach(([canvas, caption], c) => {
    const plane = s.h.subarray(c * H * W, (c + 1) * H * W);
    let peak = 0; for (const v of plane) peak = Math.max(peak, Math.abs(v));
    const ctx = canvas.getContext("2d"); const img = ctx.createImageData(W, H);
    for (let i = 0; i < H * W; i++) {
      const [r, g, b] = diverging(peak > 0 ? plane[i] / peak : 0);
      img.data.set([r, g, b, 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    caption.textContent = `${names[c]}  |max| = ${peak.toFixed(4)}`;
  });
  document.getElementById("step-label").textContent = `step ${s.step}`;
  document.getElementById("co-label").textContent =
    `CO ${s.co.toFixed(3)} / target ${D.target.toFixed(3)}`;
  drawPlot(s.step);
}
function drawPlot(step) {
  const svg = document.getElementById("plot"); const w = 600, h = 160, pad = 20;
  const lo = Math.min(...D.co, D.target), hi = Math.max(...D.co, D.target);
  const x = i => pad + (w - 2 * pad) * i / Math.max(1, D.co.length - 1);
  const y = v => h - pad - (h - 2 * pad) * (v - lo) / Math.max(1e-9, hi - lo);
  const line = D.co.map((v, i) => `${x(i)},${y(v)}`).join(" ");
  svg.innerHTML = `<polyline fill="none" stroke="#2b7bba" stroke-width="1.5" points="${line}"/>` +
    `<line x1="${pad}" x2="${w - pad}" y1="${y(D.target)}" y2="${y(D.target)}" stroke="grey" stroke-dasharray="4"/>` +
    `<circle id="marker" cx="${x(step)}" cy="${y(D.co[step] ?? D.co[D.co.length - 1])}" r="4" fill="#d7301f"/>`;
}
const slider = document.getElementById("slider");
slider.max = snaps.length - 1;
slider.value = snaps.length - 1;
slider.addEventListener("input", () => drawStep(Number(slider.value)));
document.getElementById("summary").textContent =
  `class ${D.targetClass}: ${D.reached ? "reached" : "did not reach"} the target CO ${D.target.toFixed(2)} ` +
  `in ${snaps[snaps.length - 1].step} steps (${D.seconds.toFixed(2)} s); prediction before ` +
  `${D.before[0]} (p=${D.before[1].toFixed(3)}), after adding the heatmap ${D.after[0]} ` +
  `(p=${D.after[1].toFixed(3)}).`;
drawInput();
drawStep(snaps.length - 1);
</script>
</body></html>
"""
