"""The evaluation report: one self-contained HTML page (images and plots inlined as PNG) a person reads in a minute.

Order: what was compared and caveats; a summary table (each distance as a multiple of the real-vs-real floor, so
"1x" means "as close as two real sets"); per concept, image rows real vs each model with their metrics; the concept
classifier; memorisation (near-copies side by side with their training twin); 3D consistency; prompt-drift probes;
what was skipped and why.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_finetune.core.io import atomic_path, quantize
from ldm_finetune.evaluation.imagesets import load_rgb
from ldm_finetune.evaluation.metrics import load_set
from ldm_finetune.evaluation.registry import METRICS, formatted, table
from ldm_finetune.evaluation.results import (
    ClassifierResult,
    ConceptFidelity,
    ConsistencyResult,
    EvaluationResults,
    MemorisationResult,
    ProbeResult,
)

DISTANCES = [m.name for m in table("fidelity")]
LABELS = {name: m.label for name, m in METRICS.items()}


CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.note{background:#fff6d5;padding:.6em 1em}
.good{background:#e3f5e1}.bad{background:#fbe3e1}img{image-rendering:pixelated}.row{margin:.3em 0}
.label{display:inline-block;width:170px;vertical-align:top;font-size:90%}
"""


def _png(array: np.ndarray, height: int = 96) -> str:
    img = Image.fromarray(quantize(array))
    if img.height != height:
        img = img.resize((max(1, round(img.width * height / img.height)), height), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _strip(images: np.ndarray, n: int = 6) -> str:
    return " ".join(_png(im) for im in images[:n]) or "<i>no images</i>"


def _plot(*draws) -> str:
    """One figure with a panel per draw function, as an inline PNG."""
    # imported here: the headless Agg backend must be chosen before pyplot is first imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(draws), figsize=(4.2 * len(draws), 2.8), dpi=90, squeeze=False)
    for draw, ax in zip(draws, axes[0]):
        draw(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape(str(v))


def _summary(results: EvaluationResults) -> str:
    fid = results.fidelity
    models = sorted({m for entry in fid.values() for m in entry.models})
    if not models:
        return "<p>No fidelity numbers (see Skipped).</p>"
    rows = ["<tr><th>model</th>" + "".join(f"<th>{LABELS[d]} (× floor)</th>" for d in DISTANCES)
            + "<th>classifier acc.</th><th>innovation</th><th>near-copies</th></tr>"]
    clf, mem = results.classifier, results.memorisation
    for m in models:
        cells = []
        for d in DISTANCES:
            ratios = [e.models[m].values[d] / e.floor_of(m)[d] for e in fid.values()
                      if m in e.models and e.floor_of(m).get(d)]
            value = np.mean(ratios) if ratios else None
            css = "" if value is None else ("good" if value < 2 else "bad" if value > 5 else "")
            cells.append(f'<td class="{css}">{"-" if value is None else f"{value:.2f}×"}</td>')
        acc_text = "-"
        if clf is not None and m in clf.models:
            ceiling = clf.ceiling_of(m)
            acc_text = f"{clf.models[m].accuracy:.0%}" + (f" (ceiling {ceiling:.0%})" if ceiling is not None else "")
            acc_text += _in_decoder_space(clf.models[m])
        mm = mem.models.get(m)
        val = mem.validation_innovation
        innov_text = "-" if mm is None else f"{mm.innovation:.3f}" + (f" (validation {val:.3f})" if val else "")
        copies = None if mm is None else mm.near_copy_rate
        side = results.settings["scored_at_own_size"].get(m)
        label = html.escape(m) + (f" ({side} px)" if side else "")
        rows.append(f"<tr><td>{label}</td>{''.join(cells)}<td>{acc_text}</td><td>{innov_text}</td>"
                    f"<td>{'-' if copies is None else f'{copies:.0%}'}</td></tr>")
    return ("<table>" + "".join(rows) + "</table><p>Distances are divided by the same distance between the real "
            "training slices and as many validation slices as the set has, drawn at random (the floor): about 1× "
            "is as close as real held-out slices are; green &lt; 2×, red &gt; 5×. "
            "Innovation is the mean RMS distance to the nearest training slice; validation slices (new by "
            "construction) give the reference. A model marked (N px) makes smaller images than the real slices: it is "
            "scored at its own size, against the real slices resized down to N px, with the floor and the "
            "classifier's ceiling recomputed at N px (upscaling its images would add interpolation artefacts that "
            "the spectrum and GLCM distances punish). Intervals are 95 % bootstrap intervals over the generated "
            "images; "
            "for a distance near 0 they sit above the value (a resampled set is never closer than the set "
            "itself).</p>")


def _concept(name: str, entry: ConceptFidelity, real, generated: dict) -> str:
    cls = None if name == "all" else name
    parts = [f"<h3>{html.escape(name)}</h3>", f'<div class="row"><span class="label">real (training)</span>'
             f"{_strip(real.of_class(cls).images)}</div>"]
    for m, gen in generated.items():
        parts.append(f'<div class="row"><span class="label">{html.escape(m)}</span>'
                     f"{_strip(gen.of_class(cls).images)}</div>")
    keys = DISTANCES + [m.name for m in table("coverage")]
    head = "<tr><th>set</th>" + "".join(f"<th>{LABELS[k]}</th>" for k in keys) + "</tr>"
    rows = [head]
    if entry.floor is not None:
        cells = "".join(f"<td>{_fmt(entry.floor.get(k))}</td>" for k in keys)
        rows.append(f"<tr><td>floor: validation vs train (as many images)</td>{cells}</tr>")
    for side in sorted({r.size for r in entry.models.values() if r.size is not None}):
        floor = next(r.floor for r in entry.models.values() if r.size == side)
        rows.append(f"<tr><td>floor at {side} px</td>" + "".join(f"<td>{_fmt(floor.get(k))}</td>" for k in keys)
                    + "</tr>")
    for m, r in entry.models.items():
        cells = []
        for k in keys:
            ci = r.ci.get(k)
            cells.append(f"<td>{_fmt(r.values[k])}" + (f"<br><small>[{ci[0]:.3g}, {ci[1]:.3g}]</small>" if ci
                                                       else "") + "</td>")
        at = f", at {r.size} px" if r.size is not None else ""
        rows.append(f"<tr><td>{html.escape(m)} (n={r.n}{at})</td>{''.join(cells)}</tr>")
    parts.append("<table>" + "".join(rows) + "</table>")
    parts.append(_curves(entry.curves))
    return "".join(parts)


def _curves(curves: dict) -> str:
    if not curves:
        return ""

    def panel(key, title, xlabel, ylabel):
        def draw(ax):
            for label, c in curves.items():
                ax.plot(c[key], label=label)
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.set_title(title, fontsize=9)
        return draw

    return _plot(panel("spectrum", "power spectrum", "radial frequency bin", "log10 power"),
                 panel("s2_bright_x", "two-point correlation", "lag along x (px)", "S2 (brightest phase)"))


def _classifier(clf: ClassifierResult | None) -> str:
    if clf is None or not clf.models:
        return "<p>No classified generated sets.</p>"
    ceiling = float("nan") if clf.ceiling_accuracy is None else clf.ceiling_accuracy
    parts = [f"<p>Ceiling (real validation slices): {ceiling:.0%}</p>"]
    for m, r in clf.models.items():
        head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in clf.classes)
        rows = [f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                for c, row in zip(clf.classes, r.confusion) if sum(row)]
        parts.append(f"<h4>{html.escape(m)}: accuracy {r.accuracy:.0%}{_in_decoder_space(r)}</h4><table>{head}</tr>"
                     f"{''.join(rows)}</table>")
    if any(r.decoder_accuracy is not None for r in clf.models.values()):
        parts.append("<p>In its decoder's space: the accuracy of a latent model by a classifier trained on the real "
                     "slices after a round trip through the model's VAE, and that classifier's ceiling on the "
                     "validation slices after the same round trip. The classifier trained on the slices themselves "
                     "reads fine texture that a small latent grid does not keep, so it cannot tell a model that "
                     "learned its concepts from one that did not; this one can.</p>")
    return "".join(parts)


def _in_decoder_space(r) -> str:
    if r.decoder_accuracy is None:
        return ""
    ceiling = "" if r.decoder_ceiling is None else f" (ceiling {r.decoder_ceiling:.0%})"  # no validation split
    return f"; in its decoder's space {r.decoder_accuracy:.0%}{ceiling}"


def _memorisation(mem: MemorisationResult) -> str:
    ref = mem.validation_ncc_p99
    parts = [f"<p>A slice is a near-copy when its best shift-tolerant normalised cross-correlation with a "
             f"training slice reaches {mem.copy_threshold:.3f}"
             + (f" (the 99th percentile of real validation slices, {ref:.3f}: the weave is periodic, so new "
                "slices can correlate highly too)" if ref is not None else "") + ".</p>"]
    for m, r in mem.models.items():
        parts.append(f"<h4>{html.escape(m)}: {len(r.near_copies)} near-copies "
                     f"({r.near_copy_rate:.0%}), innovation {r.innovation:.3f}</h4>")
        for flag in r.near_copies[:6]:
            try:
                pair = load_set([flag.generated, flag.training], size=96)
                parts.append(f'<div class="row">{_png(pair[0])} {_png(pair[1])} NCC {flag.ncc:.3f}: '
                             f'{html.escape(Path(flag.generated).name)} ≈ {html.escape(Path(flag.training).name)}'
                             "</div>")
            except Exception:  # the files may have moved since metrics.json was written
                parts.append(f"<div>{html.escape(str(flag))}</div>")
    return "".join(parts) or "<p>Nothing to report.</p>"


def _consistency(cons: ConsistencyResult | None) -> str:
    if cons is None:
        return "<p>Needs real images with state / orientation classes.</p>"
    rows = ["<tr><th>set</th><th>state</th><th>largest difference between cuts, per phase (dark, mid, bright)</th>"
            "</tr>"]
    for label, data in [("real", cons.real)] + list(cons.models.items()):
        for state, spread in data.cut_spread.items():
            rows.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(state)}</td>"
                        f"<td>{', '.join(f'{v:.3f}' for v in spread)}</td></tr>")
    out = "<table>" + "".join(rows) + "</table>"
    for m, data in cons.models.items():
        items = "".join(f'<li class="{"good" if o.holds else "bad"}">{html.escape(o.phase)}: '
                        f'{html.escape(o.order)} — {"holds" if o.holds else "violated"}</li>'
                        for o in data.orderings or [])
        out += f"<h4>{html.escape(m)}: orderings seen in the real data</h4><ul>{items}</ul>"
    return out


def _probes(probes: ProbeResult | None) -> str:
    if probes is None:
        return "<p>No probes were run (they need a base model and a fine-tuned one: see the config form).</p>"
    probe = table("probe")
    side = f", at {probes.side} px" if probes.side is not None else ""
    parts = [f"<p>Base model: {html.escape(probes.base)}; same prompts, seeds, sampler and steps{side} (the "
             "model's own size unless <code>sampler.probe_resolution</code> says otherwise).</p>"]
    for m, r in probes.models.items():
        parts.append(f"<h4>{html.escape(m)}</h4><table><tr><th>prompt</th>"
                     + "".join(f"<th>{p.label}</th>" for p in probe) + "</tr>")
        for prompt, v in r.prompts.items():
            role = " <em>(DreamBooth class prompt)</em>" if prompt in r.class_prompts else ""
            parts.append(f"<tr><td>{html.escape(prompt)}{role}</td>"
                         + "".join(f"<td>{formatted(p.name, v.get(p.name))}</td>" for p in probe) + "</tr>")
        parts.append("</table>")
        for prompt, files in r.grids.items():
            images = "<br>".join(" ".join(_png(load_rgb(f)) for f in files[side]) for side in ("base", "tuned"))
            parts.append(f'<div class="row"><span class="label">{html.escape(prompt)}<br>base / {html.escape(m)}'
                         f'</span>{images}</div>')
    parts.append(_legend(probe))
    return "".join(parts)


def _legend(metrics) -> str:
    """What each column means, from the registry."""
    items = "".join(f"<li><b>{html.escape(m.label)}</b> ({html.escape(m.unit)}, {m.better} is better): "
                    f"{html.escape(m.meaning)}</li>" for m in metrics)
    return f"<ul class='legend'>{items}</ul>"


def write_report(path: Path, results: EvaluationResults, real, generated: dict) -> Path:
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in results.notes)
    s = results.settings
    body = [f"<h1>Evaluation report</h1>{notes}",
            f"<p>Real: {html.escape(s['real'])} ({s['n_real_train']} training, {s['n_real_validation']} validation "
            f"slices) at {s['size']} px; generated sets: "
            + ", ".join(f"{html.escape(k)} ({v})" for k, v in s["sets"].items()) + ".</p>",
            "<h2>Summary</h2>", _summary(results), _legend(table("fidelity") + table("coverage")),
            "<h2>Per concept</h2>"]
    body += [_concept(name, entry, real, generated) for name, entry in results.fidelity.items()]
    body += ["<h2>Concept classifier (weight-free)</h2>", _classifier(results.classifier),
             "<h2>Memorisation</h2>", _memorisation(results.memorisation),
             "<h2>3D consistency</h2>", _consistency(results.consistency),
             "<h2>Prompt-drift probes</h2>", _probes(results.probes),
             "<h2>Skipped</h2><ul>" + "".join(f"<li>{html.escape(x['what'])}: {html.escape(x['reason'])}</li>"
                                              for x in results.skipped) + "</ul>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ldm_finetune evaluation</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")

    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
