"""A readable Markdown summary of an evaluation report (the dict of ``defectlens.evaluate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

AUPRO_ORDER = ("0.01", "0.05", "0.1", "0.3", "1.0")


def fmt(value: Any, digits: int = 4) -> str:
    """A metric for a table: numbers with ``digits`` decimals, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def per_defect_rows(per_type: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Rows (defect type, images, mean score, image AUROC vs good, at threshold) of the
    per-defect table, good first; shared by the Markdown and HTML reports."""
    rows = []
    for name, entry in sorted(per_type.items(), key=lambda item: (item[0] != "good", item[0])):
        if name == "good":
            decided = f"{entry['false_alarms']} false alarm(s)" if "false_alarms" in entry else "–"
            auroc = "–"
        else:
            decided = f"{entry['detected']} of {entry['count']} detected" if "detected" in entry else "–"
            auroc = fmt(entry.get("image_auroc"))
        rows.append((name, entry.get("count"), fmt(entry.get("mean_score")), auroc, decided))
    return rows


def pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """Markdown table lines; ``align`` one letter per column (l / r), default: first left."""
    header = list(header)
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return lines


def _ordered_limits(values: dict[str, Any]) -> list[str]:
    known = [limit for limit in AUPRO_ORDER if limit in values]
    return known + sorted(limit for limit in values if limit not in AUPRO_ORDER)


def markdown_report(report: dict[str, Any], title: str | None = None) -> str:
    """The report as Markdown: image, TPR@TNR, pixel, AUPRO, sPRO, per defect type, recall."""
    data = report.get("data", {})
    model = report.get("model", {})
    image = report.get("image", {})
    pixel = report.get("pixel", {})
    lines: list[str] = [f"# {title or 'Evaluation: ' + (data.get('name') or 'test set')}", ""]

    facts = []
    if data.get("root"):
        facts.append(f"- **Data**: `{data['root']}` ({data.get('layout', '')}), "
                     f"{image.get('num_good', 0)} good and {image.get('num_defective', 0)} defective test images")
    if model.get("method"):
        facts.append(f"- **Model**: {model['method']} on {model.get('backbone')}, threshold {fmt(model.get('threshold'))}")
    if model.get("maps_dir"):
        source = "from " + str(model["scores_file"]) if model.get("scores_file") else "maximum of each map"
        facts.append(f"- **Anomaly maps**: `{model['maps_dir']}` (image score: {source})")
    timing = report.get("timing", {})
    if timing.get("fit_s") is not None or timing.get("ms_per_image") is not None:
        facts.append(f"- **Timing**: fit {fmt(timing.get('fit_s'), 1)} s, inference {fmt(timing.get('ms_per_image'), 1)} ms/image")
    lines += facts + ([""] if facts else [])

    lines += ["## Image level", ""]
    rows = [
        ("AUROC", fmt(image.get("auroc"))),
        ("Average precision", fmt(image.get("ap"))),
        ("F1-max", fmt(image.get("f1_max"))),
        ("F1-max threshold", fmt(image.get("f1_threshold"))),
    ]
    at = image.get("at_threshold")
    if at:
        rows += [
            (f"Precision at threshold {fmt(image.get('threshold'))}", fmt(at.get("precision"))),
            ("Recall at threshold", fmt(at.get("recall"))),
            ("F1 at threshold", fmt(at.get("f1"))),
            ("Accuracy at threshold", fmt(at.get("accuracy"))),
            ("TP / FP / TN / FN", f"{at.get('tp')} / {at.get('fp')} / {at.get('tn')} / {at.get('fn')}"),
        ]
    lines += table(("Metric", "Value"), rows) + [""]

    tpr = image.get("tpr_at_tnr") or {}
    if tpr:
        thresholds = image.get("tpr_at_tnr_thresholds") or {}
        lines += ["### TPR at fixed TNR", "",
                  "The threshold is set on the good test images so that the given fraction of them passes.", ""]
        lines += table(("TNR", "TPR", "Threshold"),
                       ((pct(float(tnr)), fmt(value), fmt(thresholds.get(tnr))) for tnr, value in tpr.items())) + [""]

    lines += ["## Pixel level", ""]
    rows = [("AUROC", fmt(pixel.get("auroc"))), ("F1-max", fmt(pixel.get("f1_max")))]
    if "num_regions" in pixel:
        rows.append(("Defect regions", fmt(pixel.get("num_regions"))))
    pixel_at = pixel.get("at_threshold")
    if pixel_at:
        rows += [("Precision at threshold", fmt(pixel_at.get("precision"))),
                 ("Recall at threshold", fmt(pixel_at.get("recall"))),
                 ("F1 at threshold", fmt(pixel_at.get("f1")))]
    lines += table(("Metric", "Value"), rows) + [""]
    aupro = pixel.get("aupro") or {}
    if aupro:
        limits = _ordered_limits(aupro)
        lines += ["### AUPRO by FPR limit", ""]
        lines += table(["FPR limit"] + limits, [["AUPRO"] + [fmt(aupro[limit]) for limit in limits]]) + [""]

    spro = report.get("spro")
    if spro:
        limits = _ordered_limits(next(iter(spro.values()))["auspro"])
        lines += ["## sPRO (MVTec LOCO AD)", "", "AUsPRO up to each FPR limit; each subset holds all good images.", ""]
        lines += table(["Subset", "Images", "Defective"] + [f"AUsPRO@{limit}" for limit in limits],
                       ([name, entry.get("num_images"), entry.get("num_defective")]
                        + [fmt(entry["auspro"].get(limit)) for limit in limits] for name, entry in spro.items())) + [""]

    per_type = report.get("per_defect_type") or {}
    if per_type:
        lines += ["## Per defect type", "", "Image AUROC of each defect type against all good images.", ""]
        lines += table(("Defect type", "Images", "Mean score", "Image AUROC", "At threshold"), per_defect_rows(per_type)) + [""]

    recall = report.get("defect_recall")
    if recall:
        criteria = list(recall.get("criteria", []))
        lines += ["## Defect-wise recall", "",
                  "A defect (8-connected region of a mask) counts as found when the predicted mask covers at "
                  "least the given fraction of it (`any` = one pixel).", ""]
        rows = [[name, stats.get("num_instances")] + [pct(stats["recall"].get(c)) for c in criteria]
                + [pct(stats.get("pixel_coverage"))] for name, stats in recall.get("per_class", {}).items()]
        rows.append(["**mean over types**", ""] + [pct(recall["mean_recall"].get(c)) for c in criteria]
                    + [pct(recall.get("mean_pixel_coverage"))])
        rows.append(["**all defects**", sum(s.get("num_instances", 0) for s in recall.get("per_class", {}).values())]
                    + [pct(recall["pooled_recall"].get(c)) for c in criteria] + [""])
        lines += table(["Defect type", "Defects"] + [f"found ({c})" for c in criteria] + ["Pixel coverage"], rows)
        lines += ["", f"Predicted regions touching no defect: {recall.get('false_positive_regions', '–')}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(report: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Write :func:`markdown_report` to ``path``; returns the path."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(markdown_report(report, title), encoding="utf-8")
    return file
