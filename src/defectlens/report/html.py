"""One self-contained HTML page per evaluation: curves, histograms, tables and a heat-map gallery.

Everything is inside ``index.html``: figures are matplotlib (Agg) PNGs and the gallery
images PNGs, all embedded as ``data:image/png;base64,...`` URIs; the CSS is inline and there
is no script, so the file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from defectlens.metrics.pixel import resolve
from defectlens.report.markdown import AUPRO_ORDER, fmt, pct, per_defect_rows

PRO_LIMIT = 0.3
THUMBNAIL_SIDE = 224
GOOD_COLOR = "#2b8a3e"
BAD_COLOR = "#c92a2a"
ACCENT = "#1c7ed6"

CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d8dee4; --card:#ffffff; --bg:#f6f8fa;
        --accent:#1c7ed6; --good:#2b8a3e; --bad:#c92a2a; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:#1f2937; color:#f9fafb; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .sub { color:#cbd5e1; font-size:13px; }
main { max-width:1280px; margin:0 auto; padding:20px 32px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px;
          padding:16px 20px; margin:18px 0; }
h2 { font-size:17px; margin:0 0 12px; }
h3 { font-size:14px; margin:14px 0 8px; color:#374151; }
.kpis { display:grid; grid-template-columns:repeat(auto-fit, minmax(150px, 1fr)); gap:12px; }
.kpi { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.kpi .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.kpi .value { font-size:26px; font-weight:600; margin-top:2px; font-variant-numeric:tabular-nums; }
.kpi .note { color:var(--muted); font-size:12px; }
.figures { display:grid; grid-template-columns:repeat(auto-fit, minmax(360px, 1fr)); gap:14px; }
figure { margin:0; text-align:center; }
figure img { max-width:100%; height:auto; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
.tables { display:grid; grid-template-columns:repeat(auto-fit, minmax(340px, 1fr)); gap:8px 28px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; margin-bottom:6px; }
th, td { padding:5px 9px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
th { background:#f1f3f5; font-weight:600; font-size:12.5px; }
tr:last-child td { border-bottom:none; }
.muted { color:var(--muted); }
.gallery { display:grid; grid-template-columns:repeat(2, minmax(0, 1fr)); gap:14px; }
@media (max-width: 900px) { .gallery { grid-template-columns:minmax(0, 1fr); } }
.card { border:1px solid var(--line); border-radius:8px; padding:10px; background:#fff; }
.card .head { display:flex; justify-content:space-between; gap:8px; font-size:12.5px; margin-bottom:6px; }
.card .name { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; overflow:hidden;
              text-overflow:ellipsis; white-space:nowrap; }
.card .score { font-weight:600; font-variant-numeric:tabular-nums; }
.triple { display:grid; grid-template-columns:repeat(3, 1fr); gap:6px; }
.triple img { width:100%; height:auto; image-rendering:auto; border-radius:4px; background:#000; }
.triple .cap { text-align:center; color:var(--muted); font-size:11px; }
.tag { display:inline-block; padding:1px 7px; border-radius:10px; font-size:11px; font-weight:600; }
.tag.good { background:#d3f9d8; color:var(--good); } .tag.bad { background:#ffe3e3; color:var(--bad); }
.group-note { color:var(--muted); margin:-6px 0 10px; font-size:12.5px; }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:24px; }
"""


# ------------------------------------------------------------------------------------------
# encoding helpers
# ------------------------------------------------------------------------------------------
def png_data_uri(pixels: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) -> ``data:image/png;base64,...``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_data_uri(figure: Any) -> str:
    """A matplotlib figure -> PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(pixels)
    if max(image.size) > side:
        scale = side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = Image.NEAREST if pixels.ndim == 2 else Image.LANCZOS
        image = image.resize(size, resample)
    return np.asarray(image)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def roc_figure(scores: np.ndarray, labels: np.ndarray, auroc: float | None) -> str | None:
    """Image-level ROC curve as a data URI; None with only one class."""
    if labels.min(initial=0) == labels.max(initial=0):
        return None
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = plt.subplots(figsize=(4.2, 3.6))
    axes.plot(fpr, tpr, color=ACCENT, lw=2, label=f"AUROC {fmt(auroc)}")
    axes.fill_between(fpr, tpr, step=None, alpha=0.08, color=ACCENT)
    axes.plot([0, 1], [0, 1], ls="--", lw=1, color="#adb5bd", label="chance")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (good images flagged)",
             ylabel="True positive rate (defective images found)", title="Image-level ROC")
    axes.legend(loc="lower right", frameon=False)
    return figure_data_uri(figure)


def pro_figure(curve: Any, aupro: dict[str, Any], limit: float = PRO_LIMIT,
               title: str = "Pixel-level PRO curve", ylabel: str = "Per-region overlap (PRO)",
               y_attribute: str = "pro") -> str | None:
    """PRO (or sPRO) curve with the integration limit marked and its area shaded."""
    if curve is None:
        return None
    plt = _pyplot()
    fpr = np.asarray(curve.fpr, dtype=float)
    y = np.asarray(getattr(curve, y_attribute), dtype=float)
    figure, axes = plt.subplots(figsize=(4.2, 3.6))
    axes.plot(fpr, y, color=ACCENT, lw=2)
    inside = fpr <= limit
    if inside.any():
        x_fill = np.append(fpr[inside], limit)
        y_fill = np.append(y[inside], np.interp(limit, fpr, y))
        axes.fill_between(x_fill, y_fill, alpha=0.15, color=ACCENT)
    axes.axvline(limit, color=BAD_COLOR, ls="--", lw=1.2)
    value = aupro.get(str(limit))
    axes.text(limit + 0.015, 0.06, f"FPR limit {limit:g}\narea/limit = {fmt(value)}",
              color=BAD_COLOR, fontsize=8.5, va="bottom")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (defect-free pixels)",
             ylabel=ylabel, title=title)
    return figure_data_uri(figure)


def histogram_figure(scores: np.ndarray, labels: np.ndarray, threshold: float | None,
                     threshold_label: str) -> str:
    """Score histograms of good and defective images with the threshold line."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.6, 3.6))
    finite = scores[np.isfinite(scores)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if threshold is not None and np.isfinite(threshold):
        low, high = min(low, threshold), max(high, threshold)
    if high <= low:
        high = low + 1.0
    bins = np.linspace(low, high, 31)
    good, bad = scores[labels == 0], scores[labels == 1]
    if good.size:
        axes.hist(good, bins=bins, color=GOOD_COLOR, alpha=0.55, label=f"good ({good.size})")
    if bad.size:
        axes.hist(bad, bins=bins, color=BAD_COLOR, alpha=0.55, label=f"defective ({bad.size})")
    if threshold is not None and np.isfinite(threshold):
        axes.axvline(threshold, color="#212529", ls="--", lw=1.4, label=f"{threshold_label} {threshold:.4g}")
    axes.set(xlabel="Image anomaly score", ylabel="Images", title="Image scores")
    axes.legend(frameon=False, fontsize=8)
    return figure_data_uri(figure)


# ------------------------------------------------------------------------------------------
# gallery
# ------------------------------------------------------------------------------------------
def _gallery_picks(scores: np.ndarray, labels: np.ndarray, count: int) -> list[tuple[str, str, list[int]]]:
    defective = np.flatnonzero(labels == 1)
    good = np.flatnonzero(labels == 0)
    by_score_desc = lambda idx: list(idx[np.argsort(-scores[idx], kind="stable")])  # noqa: E731
    groups = []
    if defective.size:
        groups.append(("Clearest detections", "The highest-scored defective images.",
                       by_score_desc(defective)[:count]))
        groups.append(("Hardest defects (misses)", "The lowest-scored defective images: "
                       "the ones a threshold misses first.", by_score_desc(defective)[::-1][:count]))
    if good.size:
        groups.append(("False alarms", "The highest-scored good images: the ones a threshold "
                       "flags first.", by_score_desc(good)[:count]))
    return groups


def _card(run: Any, index: int, threshold: float | None, root: Path | None) -> str:
    from defectlens.data.images import read_image
    from defectlens.evaluation import _mask_loader
    from defectlens.postprocess import to_image_size
    from defectlens.visualize import overlay_heatmap

    sample = run.samples[index]
    try:
        image = read_image(sample.path)
    except Exception as error:  # the page is still useful without one picture
        return f'<div class="card"><div class="muted">cannot show {_e(sample.path)}: {_e(error)}</div></div>'
    anomaly_map = np.asarray(resolve(run.anomaly_maps[index])).astype(np.float32)
    if anomaly_map.shape != image.shape[:2]:
        import torch

        anomaly_map = to_image_size(torch.from_numpy(np.ascontiguousarray(anomaly_map)), image.shape[:2])
    scale = threshold if threshold is not None and np.isfinite(threshold) and threshold > 0 else None
    if scale is None:
        scale = max(float(anomaly_map.max()) / 2.0, 1e-12)
    predicted = anomaly_map > threshold if threshold is not None and np.isfinite(threshold) else None
    overlay = overlay_heatmap(image, anomaly_map, scale, predicted)
    mask_source = _mask_loader(sample)
    mask = np.zeros(image.shape[:2], dtype=bool) if mask_source is None else mask_source()
    if mask.shape != image.shape[:2]:
        mask = np.zeros(image.shape[:2], dtype=bool)
    mask_rgb = np.repeat((mask.astype(np.uint8) * 255)[:, :, None], 3, axis=2)
    photo = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    try:
        name = sample.path.relative_to(root).as_posix() if root else sample.path.name
    except ValueError:
        name = f"{sample.path.parent.name}/{sample.path.name}"
    tag = '<span class="tag good">good</span>' if sample.label == 0 else f'<span class="tag bad">{_e(sample.defect_type)}</span>'
    cells = "".join(
        f'<div><img alt="{_e(alt)}" src="{png_data_uri(_thumbnail(pixels))}"><div class="cap">{_e(alt)}</div></div>'
        for alt, pixels in (("image", photo), ("heat map", overlay), ("ground truth", mask_rgb))
    )
    return (f'<div class="card"><div class="head"><span class="name" title="{_e(name)}">{_e(name)}</span>'
            f'<span>{tag} <span class="score">{run.scores[index]:.4g}</span></span></div>'
            f'<div class="triple">{cells}</div></div>')


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _limits(values: dict[str, Any]) -> list[str]:
    return [limit for limit in AUPRO_ORDER if limit in values] + sorted(set(values) - set(AUPRO_ORDER))


def _metric_tables(report: dict[str, Any]) -> str:
    image, pixel = report.get("image", {}), report.get("pixel", {})
    parts = []
    rows = [("AUROC", fmt(image.get("auroc"))), ("Average precision", fmt(image.get("ap"))),
            ("F1-max", fmt(image.get("f1_max"))), ("F1-max threshold", fmt(image.get("f1_threshold")))]
    at = image.get("at_threshold")
    if at:
        rows += [(f"Precision @ {fmt(image.get('threshold'))}", fmt(at.get("precision"))),
                 ("Recall @ threshold", fmt(at.get("recall"))), ("F1 @ threshold", fmt(at.get("f1"))),
                 ("TP / FP / TN / FN", f"{at.get('tp')} / {at.get('fp')} / {at.get('tn')} / {at.get('fn')}")]
    parts.append("<div><h3>Image level</h3>" + _table(("Metric", "Value"), rows))
    tpr = image.get("tpr_at_tnr") or {}
    if tpr:
        thresholds = image.get("tpr_at_tnr_thresholds") or {}
        parts[-1] += ("<h3>TPR at fixed TNR</h3>"
                      + _table(("TNR (good images passed)", "TPR", "Threshold"),
                               [(pct(float(k)), fmt(v), fmt(thresholds.get(k))) for k, v in tpr.items()]))
    parts[-1] += "</div>"
    rows = [("AUROC", fmt(pixel.get("auroc"))), ("F1-max", fmt(pixel.get("f1_max")))]
    if "num_regions" in pixel:
        rows.append(("Defect regions", fmt(pixel.get("num_regions"))))
    pixel_at = pixel.get("at_threshold")
    if pixel_at:
        rows += [("Precision @ threshold", fmt(pixel_at.get("precision"))),
                 ("Recall @ threshold", fmt(pixel_at.get("recall"))), ("F1 @ threshold", fmt(pixel_at.get("f1")))]
    block = "<div><h3>Pixel level</h3>" + _table(("Metric", "Value"), rows)
    aupro = pixel.get("aupro") or {}
    if aupro:
        block += "<h3>AUPRO by FPR limit</h3>" + _table(("FPR limit", "AUPRO"), [(k, fmt(aupro[k])) for k in _limits(aupro)])
    spro = report.get("spro")
    if spro:
        limits = _limits(next(iter(spro.values()))["auspro"])
        block += ("<h3>AUsPRO (MVTec LOCO AD)</h3>"
                  + _table(["Subset", "Images"] + [f"@{limit}" for limit in limits],
                           [[name, entry.get("num_images")] + [fmt(entry["auspro"].get(l), 3) for l in limits]
                            for name, entry in spro.items()]))
    parts.append(block + "</div>")
    return '<div class="tables">' + "".join(parts) + "</div>"


def _per_type_table(report: dict[str, Any]) -> str:
    rows = per_defect_rows(report.get("per_defect_type") or {})
    return _table(("Defect type", "Images", "Mean score", "Image AUROC vs good", "At threshold"), rows)


def _recall_table(recall: dict[str, Any]) -> str:
    criteria = list(recall.get("criteria", []))
    rows = [[name, stats.get("num_instances")] + [pct(stats["recall"].get(c)) for c in criteria]
            + [pct(stats.get("pixel_coverage"))] for name, stats in recall.get("per_class", {}).items()]
    rows.append(["mean over types", ""] + [pct(recall["mean_recall"].get(c)) for c in criteria]
                + [pct(recall.get("mean_pixel_coverage"))])
    return _table(["Defect type", "Defects"] + [f"found ({c})" for c in criteria] + ["Pixel coverage"], rows)


# ------------------------------------------------------------------------------------------
# page
# ------------------------------------------------------------------------------------------
def html_report(report: dict[str, Any], run: Any, title: str | None = None, gallery_size: int = 4) -> str:
    """The whole page as a string (see :func:`write_html_report`)."""
    from defectlens._version import __version__

    data, model = report.get("data", {}), report.get("model", {})
    image, pixel = report.get("image", {}), report.get("pixel", {})
    scores = np.asarray(run.scores, dtype=float)
    labels = np.asarray([sample.label for sample in run.samples], dtype=int)
    root = Path(data["root"]) if data.get("root") else None

    if model.get("method"):
        what = f"{model['method']} · {model.get('backbone')}"
    elif model.get("maps_dir"):
        what = f"anomaly maps from {model['maps_dir']}"
    else:
        what = ""
    heading = title or f"Evaluation — {data.get('name') or 'test set'}"
    sub = " · ".join(part for part in (what, f"{image.get('num_good', 0)} good / {image.get('num_defective', 0)} defective test images",
                                        str(data.get("root", ""))) if part)

    kpis = [("Image AUROC", image.get("auroc"), ""), ("Image F1-max", image.get("f1_max"), ""),
            ("Pixel AUROC", pixel.get("auroc"), ""), ("AUPRO", (pixel.get("aupro") or {}).get("0.3"), "FPR limit 0.3")]
    spro = report.get("spro")
    if spro and "all" in spro:
        kpis.append(("AUsPRO", spro["all"]["auspro"].get("0.05"), "all images, FPR limit 0.05"))
    timing = report.get("timing", {})
    if timing.get("ms_per_image") is not None:
        kpis.append(("Inference", f"{timing['ms_per_image']:.1f}", "ms per image"))
    kpi_html = "".join(
        f'<div class="kpi"><div class="label">{_e(label)}</div><div class="value">'
        f'{_e(value if isinstance(value, str) else fmt(value, 3))}</div><div class="note">{_e(note)}</div></div>'
        for label, value, note in kpis)

    if run.threshold is not None:
        threshold, threshold_label = float(run.threshold), "threshold"
    elif image.get("f1_threshold") is not None:
        threshold, threshold_label = float(image["f1_threshold"]), "F1-optimal threshold"
    else:
        threshold, threshold_label = None, ""
    figures = []
    roc = roc_figure(scores, labels, image.get("auroc"))
    if roc:
        figures.append((roc, "Image-level ROC: every image score is a threshold."))
    figures.append((histogram_figure(scores, labels, threshold, threshold_label),
                    "Image scores of good and defective test images."))
    pro = pro_figure(run.extra.get("pro_curve"), pixel.get("aupro") or {})
    if pro:
        figures.append((pro, "PRO curve; the shaded area up to FPR 0.3 gives AUPRO@0.3."))
    spro_curve = (run.extra.get("spro_curves") or {}).get("all")
    if spro_curve is not None:
        uri = pro_figure(spro_curve, spro["all"]["auspro"], 0.05, "sPRO curve (all images)",
                         "Mean sPRO", "mean_spro")
        if uri:
            figures.append((uri, "sPRO curve; the shaded area up to FPR 0.05 gives AUsPRO@0.05."))
    figure_html = "".join(f'<figure><img alt="{_e(caption)}" src="{uri}"><figcaption>{_e(caption)}</figcaption></figure>'
                          for uri, caption in figures)

    pixel_threshold = run.threshold
    if pixel_threshold is None and pixel.get("f1_threshold") is not None:
        pixel_threshold = pixel["f1_threshold"]
    gallery = []
    for name, note, indices in _gallery_picks(scores, labels, gallery_size):
        cards = "".join(_card(run, index, pixel_threshold, root) for index in indices)
        gallery.append(f"<h3>{_e(name)}</h3><p class='group-note'>{_e(note)}</p><div class='gallery'>{cards}</div>")
    legend = ("Heat map colours: blue = low score, green = the threshold"
              + (f" ({pixel_threshold:.4g})" if pixel_threshold is not None else "")
              + ", red = twice the threshold or more; white outline = pixels above the threshold.")

    sections = [
        f'<div class="kpis">{kpi_html}</div>',
        f'<section><h2>Curves</h2><div class="figures">{figure_html}</div></section>',
        f"<section><h2>Metrics</h2>{_metric_tables(report)}</section>",
        f"<section><h2>Per defect type</h2>{_per_type_table(report)}</section>",
    ]
    if report.get("defect_recall"):
        sections.append("<section><h2>Defect-wise recall</h2><p class='group-note'>A defect (connected region of a "
                        "ground-truth mask) is found when the predicted mask covers at least the given fraction "
                        f"of it.</p>{_recall_table(report['defect_recall'])}</section>")
    if gallery:
        sections.append(f"<section><h2>Heat-map gallery</h2><p class='group-note'>{_e(legend)}</p>{''.join(gallery)}</section>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(heading)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(heading)}</h1><div class='sub'>{_e(sub)}</div></header><main>"
        + "".join(sections)
        + f"<footer>defectlens {_e(__version__)} · self-contained report, no external resources</footer>"
        "</main></body></html>\n"
    )


def write_html_report(report: dict[str, Any], run: Any, out_dir: str | Path, title: str | None = None,
                      gallery_size: int = 4) -> Path:
    """Write ``out_dir/index.html``: one self-contained page (no external files).

    Args:
        report: the report dict (``defectlens.evaluation.evaluate_run`` / ``evaluate_maps_run``).
        run: the matching ``EvaluationRun`` (scores, maps, samples; curves in ``run.extra``).
        out_dir: folder to create; ``index.html`` inside it is overwritten.
        gallery_size: images per gallery group (best detections, misses, false alarms).
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "index.html"
    file.write_text(html_report(report, run, title, gallery_size), encoding="utf-8")
    return file
