"""The AutoVI study's protocol (Carvalho et al. 2024) as one benchmark command.

``defectlens benchmark --protocol autovi --config CONFIG`` (or a config with ``"protocol":
"autovi"``, e.g. ``benchmarks/autovi_protocol.json``) runs, for the config's methods and
categories:

    main          every method, eight seeds: image AUROC and AP (the study's Tables 6 and 7),
                  TPR at TNR 0.90 / 0.95 / 0.99 with thresholds from training images only
                  (the detector's held-out calibration scores), pixel AUROC, AUPRO, AUsPRO
                  (LOCO / AutoVI ground truth only; null for MVTec-layout data), fit minutes
                  and ms per image; mean +- std over seeds, the best bold and those not
                  significantly different from it (two-sided Welch t-test, 5 %) italic
    augmentation  PatchCore and PaDiM fitted on each training image plus K augmented copies
                  (rotation within +-15 deg with p = 0.5 and Gaussian noise with variance
                  ~ U(10, 120) with p = 0.5, independent: the "autovi" preset), compared with
                  main by Welch's t-test. One-pass methods see each image once, so the copies
                  are added to the training set here (`data.variants.with_augmented_copies`)
                  rather than through the Detector's ``augmentation`` (epochs after the first)
    window        crops of 200, 400 and 600 px around a point (default: the image centre) of
                  every train and test image and mask (`data.variants.crop_category`); with
                  ``reference_side`` the sizes are pixels of the image scaled so its short
                  side is ``reference_side`` (ours: 600, i.e. 1/3, 2/3 and all of the image)
    few_shot      PatchCore on 1, 2, 4, 8, 16 and 32 training images, eight random draws each
                  (draw = seed): a table and a curve (PNG)

Every experiment's settings can be changed in the config's ``"experiments"`` object (methods,
seeds, sizes ...; see `PROTOCOL`); runs are appended to ``OUT/results.jsonl`` / ``.csv`` like
any benchmark, and the tables are rebuilt from *all* of this config's successful records there
(the latest per run), so methods run later (``--methods cflow``) join the same tables. Outputs:
``OUT/autovi_protocol.md``, ``.json``, ``.csv``, ``.html`` (self-contained, with the curve) and
``OUT/few_shot.png``. A method that is not registered gives failed rows, not a crash.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import html
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from defectlens.benchmark import (
    SIGNIFICANCE,
    BenchmarkConfig,
    MethodSpec,
    job_key,
    load_config,
    mark_best,
    mean_std_cell,
    read_results,
    record_value,
    run_benchmark,
    significantly_different,
)
from defectlens.errors import ConfigError

PROTOCOLS = ("autovi",)
EXPERIMENTS = ("main", "augmentation", "window", "few_shot")

PROTOCOL: dict[str, Any] = {
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7],
    "train_thresholds": True,
    "experiments": {
        "main": {},
        "augmentation": {"methods": ["patchcore", "padim"], "augmentation": "autovi", "copies": 1},
        "window": {"methods": ["patchcore", "padim"], "sizes": [200, 400, 600], "reference_side": 600, "center": None},
        "few_shot": {"methods": ["patchcore"], "shots": [1, 2, 4, 8, 16, 32], "draws": 8},
    },
}
"""The study's settings; a config's keys override them (``"experiments": {"window": {...}}``
merges into the window experiment's settings)."""

MAIN_METRICS = (("image_auroc", "Image AUROC (Table 6)"), ("image_ap", "Image AP (Table 7)"))
MORE_METRICS = (("train_tpr_at_tnr_0.9", "TPR @ TNR 0.90 (training thresholds)"),
                ("train_tpr_at_tnr_0.95", "TPR @ TNR 0.95 (training thresholds)"),
                ("train_tpr_at_tnr_0.99", "TPR @ TNR 0.99 (training thresholds)"),
                ("pixel_auroc", "Pixel AUROC"), ("aupro_0.3", "AUPRO@0.3"), ("auspro_all_0.05", "AUsPRO@0.05"))
COST_METRICS = (("fit_minutes", "Fit minutes", 2), ("eval_ms_per_image", "ms / image (evaluation, batch 16)", 0))


# ------------------------------------------------------------------------------------------
# configuration -> jobs
# ------------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def protocol_settings(config: BenchmarkConfig) -> dict[str, Any]:
    """`PROTOCOL` with the config's ``seeds`` / ``experiments`` keys merged in."""
    document = config.document
    settings = _merge(PROTOCOL, {key: document[key] for key in ("seeds", "experiments", "train_thresholds") if key in document})
    unknown = sorted(set(settings["experiments"]) - set(EXPERIMENTS))
    if unknown:
        raise ConfigError(f"{config.source or 'config'}: unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}")
    return settings


def load_protocol_config(source: str | Path | dict[str, Any], base_dir: str | Path | None = None) -> BenchmarkConfig:
    """`benchmark.load_config` with the protocol's seeds and training thresholds as defaults."""
    config = load_config(source, base_dir)
    settings = protocol_settings(config)
    return dataclasses.replace(config, seeds=list(settings["seeds"]), train_thresholds=bool(settings["train_thresholds"]))


def _methods_for(config: BenchmarkConfig, names: Sequence[str] | None, seeds: Sequence[int] | None) -> list[MethodSpec]:
    """The config's methods named (by name or label) in ``names`` (all when None); a name the
    config does not list is added with default options. ``seeds`` replaces every method's own."""
    if names is None:
        chosen = list(config.methods)
    else:
        chosen = []
        for name in names:
            known = [m for m in config.methods if name in (m.name, m.display)]
            chosen.extend(known or [MethodSpec(name, optional=True)])
    return [dataclasses.replace(m, seeds=tuple(seeds)) for m in chosen] if seeds is not None else chosen


def _experiment_jobs(config: BenchmarkConfig, settings: dict[str, Any], methods: Sequence[str] | None,
                     **variant: Any) -> list[dict[str, Any]]:
    chosen = _methods_for(config, settings.get("methods"), settings.get("seeds"))
    if methods is not None:
        chosen = [m for m in chosen if m.name in methods or m.display in methods]
    if not chosen:
        return []
    sub = dataclasses.replace(config, methods=chosen)
    if "batch_sizes" in settings:
        variant["batch_sizes"] = list(settings["batch_sizes"])
    return sub.jobs(**variant)


def protocol_jobs(config: BenchmarkConfig, experiments: Sequence[str] | None = None,
                  methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The runs of the chosen experiments (default all), optionally only of some methods.

    Experiments other than main time no inference by default (``batch_sizes``: []): their
    evaluation's ms per image is still recorded.
    """
    settings = protocol_settings(config)
    chosen = list(experiments or settings["experiments"])
    unknown = sorted(set(chosen) - set(EXPERIMENTS))
    if unknown:
        raise ConfigError(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}")
    jobs: list[dict[str, Any]] = []
    for name in chosen:
        spec = settings["experiments"].get(name)
        if spec is None:
            continue
        if name == "main":
            jobs += _experiment_jobs(config, spec, methods, experiment="main")
            continue
        spec = {"batch_sizes": [], **spec}
        if name == "augmentation":
            augment = {"augmentation": spec.get("augmentation", "autovi"), "copies": int(spec.get("copies", 1))}
            label = augment["augmentation"] if isinstance(augment["augmentation"], str) else "custom"
            jobs += _experiment_jobs(config, spec, methods, experiment="augmentation",
                                     variant=f"{label} x{augment['copies']}", augment=augment)
        elif name == "window":
            for size in spec.get("sizes", [200, 400, 600]):
                window = {"size": size, "center": spec.get("center"), "reference_side": spec.get("reference_side")}
                jobs += _experiment_jobs(config, spec, methods, experiment="window", variant=f"{size:g} px", window=window)
        elif name == "few_shot":
            draws = list(range(int(spec.get("draws", 8))))
            for shots in spec.get("shots", [1, 2, 4, 8, 16, 32]):
                jobs += _experiment_jobs(config, {**spec, "seeds": spec.get("seeds", draws)}, methods,
                                         experiment="few_shot", variant=f"{int(shots)} shots", train_subset=int(shots))
    return jobs


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------
def latest_records(records: Sequence[dict[str, Any]], config_name: str | None = None) -> list[dict[str, Any]]:
    """The latest record per run key (`benchmark.job_key`), of one config (all when None);
    a successful record is preferred to a later failed one."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        if config_name is not None and record.get("config") != config_name:
            continue
        key = job_key(record)
        previous = latest.get(key)
        if previous is None or record.get("status") == "ok" or previous.get("status") != "ok":
            latest[key] = record
    return list(latest.values())


def _value(record: dict[str, Any], key: str) -> float | None:
    if key == "fit_minutes":
        value = record_value(record, "fit_s")
        return None if value is None else value / 60.0
    return record_value(record, key)


def _first_error(records: Sequence[dict[str, Any]]) -> str:
    for record in records:
        if record.get("error"):
            return str(record["error"]).splitlines()[0]
    return "failed"


def _failure_note(grid: "Grid") -> str:
    if not grid.failures:
        return ""
    return " Failed runs: " + "; ".join(f"{row} / {column}: {count} ({grid.failed[(row, column)]})"
                                        for (row, column), count in grid.failures.items()) + "."


class Grid:
    """Cells of one table: rows (categories), columns (methods or variants), seeds' values."""

    def __init__(self, rows: list[str], columns: list[str]) -> None:
        self.rows, self.columns = rows, columns
        self.values: dict[tuple[str, str], list[float]] = {}
        self.failed: dict[tuple[str, str], str] = {}
        self.failures: dict[tuple[str, str], int] = {}

    def fail(self, row: str, column: str, message: str) -> None:
        """Count a failed run of a cell (its first error is kept)."""
        self.failed.setdefault((row, column), message)
        self.failures[(row, column)] = self.failures.get((row, column), 0) + 1

    def add(self, row: str, column: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault((row, column), []).append(value)

    def marks(self, row: str, higher_is_better: bool = True) -> dict[str, str]:
        return mark_best({column: self.values.get((row, column), []) for column in self.columns}, higher_is_better)

    def cell(self, row: str, column: str, digits: int, mark: str) -> str:
        values = self.values.get((row, column), [])
        if not values and (row, column) in self.failed:
            return "failed"
        failures = self.failures.get((row, column), 0)
        return mean_std_cell(values, digits, mark) + (f" ({failures} failed)" if failures else "")

    def to_rows(self, digits: int, higher_is_better: bool | None = True) -> list[list[str]]:
        lines = []
        for row in self.rows:
            marks = self.marks(row, higher_is_better) if higher_is_better is not None else {}
            lines.append([row] + [self.cell(row, column, digits, marks.get(column, "")) for column in self.columns])
        return lines

    def cells(self, higher_is_better: bool | None = True) -> list[dict[str, Any]]:
        """JSON-safe cells: row, column, values, mean, std, n, mark (and failure)."""
        result = []
        for row in self.rows:
            marks = self.marks(row, higher_is_better) if higher_is_better is not None else {}
            for column in self.columns:
                values = self.values.get((row, column), [])
                result.append({
                    "row": row, "column": column, "values": values, "n": len(values),
                    "mean": float(np.mean(values)) if values else None,
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None),
                    "mark": marks.get(column, ""), "failed": self.failed.get((row, column)),
                    "failed_runs": self.failures.get((row, column), 0),
                })
        return result


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _mean_row(grid: Grid, records: Sequence[dict[str, Any]], column_of: Callable[[dict[str, Any]], str],
              key: str, categories: list[str]) -> None:
    """Add a row "mean (k)": per column and seed, the mean over the categories all columns completed."""
    complete = [c for c in categories if all(grid.values.get((c, col)) for col in grid.columns)]
    if len(complete) < 2:
        return
    row = f"mean ({len(complete)})"
    grid.rows.append(row)
    for column in grid.columns:
        by_seed: dict[int, list[float]] = {}
        for record in records:
            if column_of(record) == column and record["category"] in complete:
                value = _value(record, key)
                if value is not None:
                    by_seed.setdefault(int(record["seed"]), []).append(value)
        for values in by_seed.values():
            if len(values) == len(complete):
                grid.add(row, column, float(np.mean(values)))


def method_grid(records: Sequence[dict[str, Any]], key: str, with_mean: bool = True) -> Grid:
    """Categories x methods for one metric (main experiment records)."""
    categories = _ordered([r["category"] for r in records])
    methods = _ordered([r["method_label"] for r in records])
    grid = Grid(list(categories), methods)
    ok = [r for r in records if r.get("status") == "ok"]
    for record in ok:
        grid.add(record["category"], record["method_label"], _value(record, key))
    for record in records:
        if record.get("status") != "ok":
            grid.fail(record["category"], record["method_label"], _first_error([record]))
    if with_mean:
        _mean_row(grid, ok, lambda r: r["method_label"], key, categories)
    return grid


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["--:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Table:
    """One protocol table: a title, a note, header, rows of strings and JSON-safe cells."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    cells: list[dict[str, Any]]
    note: str = ""

    def markdown(self) -> str:
        note = f"\n\n{self.note}" if self.note else ""
        return f"### {self.title}\n\n{_markdown_table(self.header, self.rows)}{note}\n"


def _seed_note(records: Sequence[dict[str, Any]]) -> str:
    counts: dict[str, set[int]] = {}
    for record in records:
        if record.get("status") == "ok":
            counts.setdefault(record["method_label"], set()).add(int(record["seed"]))
    return "Seeds per method: " + ", ".join(f"{m} {len(s)}" for m, s in counts.items()) + "." if counts else ""


def main_tables(records: Sequence[dict[str, Any]]) -> list[Table]:
    """Tables 6 and 7 (image AUROC, AP) and the protocol's other metrics and costs."""
    main = [r for r in records if (r.get("experiment") or "main") == "main"]
    if not main:
        return []
    tables = []
    legend = (f"mean ± std over seeds; per row **bold** = best mean, *italic* = not significantly different from "
              f"the best (two-sided Welch t-test, p >= {SIGNIFICANCE:g}). {_seed_note(main)}")
    failures = sorted({f"{r['method_label']}: {_first_error([r])}" for r in main if r.get("status") != "ok"})
    if failures:
        legend += " Failed: " + "; ".join(failures) + "."
    for key, title in MAIN_METRICS + MORE_METRICS:
        grid = method_grid(main, key)
        if key == "auspro_all_0.05" and not grid.values:
            note = ("AUsPRO needs LOCO / AutoVI ground truth (a channel folder per defective image and "
                    "defects_config.json): null on MVTec-layout data such as ours.")
            tables.append(Table(key, title, ["Category"] + grid.columns, grid.to_rows(3), grid.cells(), note))
            continue
        tables.append(Table(key, title, ["Category"] + grid.columns, grid.to_rows(3), grid.cells(), legend))
    for key, title, digits in COST_METRICS:
        grid = method_grid(main, key, with_mean=False)
        tables.append(Table(key, title + " (this machine)", ["Category"] + grid.columns, grid.to_rows(digits, None),
                            grid.cells(None), "mean ± std over seeds; shared 2-core machine, timings indicative."))
    return tables


def _welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p_value if math.isfinite(p_value) else None


def comparison_table(records: Sequence[dict[str, Any]], experiment: str, title: str, baseline: str = "main") -> list[Table]:
    """Per (category, method): the baseline (main) and each variant of ``experiment``, with
    Welch's two-sided p-value and whether the variant is significantly better / worse."""
    runs = [r for r in records if r.get("experiment") == experiment]
    if not runs:
        return []
    methods = _ordered([r["method_label"] for r in runs])
    base = [r for r in records if (r.get("experiment") or "main") == baseline and r["method_label"] in methods
            and r.get("status") == "ok"]
    variants = _ordered([r["variant"] for r in runs])
    tables = []
    for key, name in MAIN_METRICS:
        header = ["Category", "Method", "baseline"] + variants + ["Δ (variant − baseline)", "Welch p", "verdict"]
        rows, cells = [], []
        for category in _ordered([r["category"] for r in runs]):
            for method in methods:
                def values_of(chosen: Sequence[dict[str, Any]]) -> list[float]:
                    return [v for r in chosen if r["category"] == category and r["method_label"] == method
                            and r.get("status") == "ok" for v in [_value(r, key)] if v is not None]

                columns = {"baseline": values_of(base)}
                for variant in variants:
                    columns[variant] = values_of([r for r in runs if r["variant"] == variant])
                marks = mark_best(columns, True)
                row = [category, method] + [mean_std_cell(columns[c], 3, marks[c]) for c in ["baseline"] + variants]
                last = columns[variants[-1]]
                if columns["baseline"] and last:
                    delta = float(np.mean(last) - np.mean(columns["baseline"]))
                    p_value = _welch_p(columns["baseline"], last)
                    significant = significantly_different(columns["baseline"], last)
                    verdict = ("better" if delta > 0 else "worse") if significant else "no significant difference"
                    row += [f"{delta:+.3f}", "–" if p_value is None else f"{p_value:.3g}", verdict]
                else:
                    delta, p_value, verdict = None, None, "missing"
                    row += ["–", "–", verdict]
                rows.append(row)
                cells.append({"category": category, "method": method, "metric": key,
                              "columns": {c: v for c, v in columns.items()}, "delta": delta, "p_value": p_value,
                              "verdict": verdict})
        note = (f"baseline = the main experiment (all training images, no augmentation). Verdict: two-sided Welch "
                f"t-test at {SIGNIFICANCE:g} between the baseline and the last variant column.")
        tables.append(Table(f"{experiment}_{key}", f"{title}: {name.split(' (')[0]}", header, rows, cells, note))
    return tables


def window_tables(records: Sequence[dict[str, Any]]) -> list[Table]:
    """Window sizes: per (category, method) one row, one column per size; Welch marks per row."""
    runs = [r for r in records if r.get("experiment") == "window"]
    if not runs:
        return []
    sizes = _ordered([r["variant"] for r in runs])
    tables = []
    for key, name in MAIN_METRICS:
        grid_rows = []
        grid = Grid([], sizes)
        for record in runs:
            row = f"{record['category']} · {record['method_label']}"
            if row not in grid_rows:
                grid_rows.append(row)
            if record.get("status") == "ok":
                grid.add(row, record["variant"], _value(record, key))
            else:
                grid.fail(row, record["variant"], _first_error([record]))
        grid.rows = grid_rows
        kept = {}
        for record in runs:
            info = record.get("window_info") or {}
            if info:
                kept[(f"{record['category']} · {record['method_label']}", record["variant"])] = (
                    f"{info.get('test_good', 0)}+{info.get('test_defective', 0)}")
        rows = [line + [" / ".join(kept.get((line[0], size), "?") for size in sizes)] for line in grid.to_rows(3)]
        note = ("Windows around the configured point (default: the image centre); test images kept "
                "(good+defective) per size in the last column - defective images whose window holds no defect pixel "
                f"are left out. Per row **bold** = best, *italic* = not different from it (Welch, {SIGNIFICANCE:g}).")
        tables.append(Table(f"window_{key}", f"Window size: {name.split(' (')[0]}", ["Category · method"] + sizes
                            + ["test images kept"], rows, grid.cells(), note + _failure_note(grid)))
    return tables


def few_shot_grid(records: Sequence[dict[str, Any]], key: str = "image_auroc") -> tuple[Grid, list[int]]:
    runs = [r for r in records if r.get("experiment") == "few_shot"]
    shots = sorted({int(r["train_subset"]) for r in runs if r.get("train_subset")})
    columns = [f"{n}" for n in shots]
    rows = [f"{r['category']} · {r['method_label']}" for r in runs]
    grid = Grid(_ordered(rows), columns)
    for record in runs:
        row, column = f"{record['category']} · {record['method_label']}", str(record["train_subset"])
        if record.get("status") == "ok":
            grid.add(row, column, _value(record, key))
        else:
            grid.fail(row, column, _first_error([record]))
    return grid, shots


def few_shot_tables(records: Sequence[dict[str, Any]]) -> list[Table]:
    """Few-shot: per (category, method) a row, one column per training-set size, plus the main
    experiment's full-data value for reference."""
    tables = []
    for key, name in MAIN_METRICS:
        grid, shots = few_shot_grid(records, key)
        if not shots:
            return []
        full = {}
        for row in grid.rows:
            category, method = row.split(" · ", 1)
            values = [v for r in records if (r.get("experiment") or "main") == "main" and r.get("status") == "ok"
                      and r["category"] == category and r["method_label"] == method for v in [_value(r, key)] if v is not None]
            full[row] = mean_std_cell(values, 3, "")
        rows = [line + [full[line[0]]] for line in grid.to_rows(3)]
        note = ("Training images drawn at random (draw = seed, `numpy.random.default_rng([seed, n])`); mean ± std over "
                "the draws; per row **bold** = best, *italic* = not different from it (Welch, "
                f"{SIGNIFICANCE:g}). Last column: all training images (main experiment)." + _failure_note(grid))
        tables.append(Table(f"few_shot_{key}", f"Few-shot: {name.split(' (')[0]} vs. training images",
                            ["Category · method"] + [f"{n} img" for n in shots] + ["all (main)"], rows, grid.cells(), note))
    return tables


def few_shot_figure(records: Sequence[dict[str, Any]], path: str | Path, key: str = "image_auroc") -> Path | None:
    """The few-shot curve: mean image AUROC (± std band) against training images, one line per
    (category, method), log2 x axis. None without few-shot records."""
    grid, shots = few_shot_grid(records, key)
    if not shots:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    for row in grid.rows:
        means = [np.mean(grid.values[(row, str(n))]) if grid.values.get((row, str(n))) else np.nan for n in shots]
        stds = [np.std(grid.values[(row, str(n))], ddof=1) if len(grid.values.get((row, str(n)), [])) > 1 else 0.0
                for n in shots]
        line, = axes.plot(shots, means, marker="o", lw=1.5, label=row)
        axes.fill_between(shots, np.subtract(means, stds), np.add(means, stds), alpha=0.12, color=line.get_color())
    axes.set_xscale("log", base=2)
    axes.set_xticks(shots, [str(n) for n in shots])
    axes.axvline(10, ls=":", color="#868e96", lw=1)
    axes.text(10, axes.get_ylim()[0], " 10 images", color="#868e96", fontsize=8, va="bottom")
    axes.set(xlabel="training images (random draws)", ylabel=dict(MAIN_METRICS)[key].split(" (")[0],
             title="Few-shot: mean ± std over draws")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right", frameon=False)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return target


def protocol_tables(records: Sequence[dict[str, Any]]) -> list[Table]:
    """Every table of the protocol from (latest) records."""
    return (main_tables(records) + comparison_table(records, "augmentation", "Augmentation")
            + window_tables(records) + few_shot_tables(records))


def tables_markdown(tables: Sequence[Table]) -> str:
    return "\n".join(table.markdown() for table in tables) if tables else "No run yet.\n"


# ------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------
def _html_cell(text: str) -> str:
    escaped = html.escape(text)
    if text.startswith("**") and text.endswith("**"):
        return f"<b>{html.escape(text[2:-2])}</b>"
    if text.startswith("*") and text.endswith("*") and len(text) > 1:
        return f"<i>{html.escape(text[1:-1])}</i>"
    return escaped


def protocol_html(title: str, tables: Sequence[Table], figure: Path | None) -> str:
    """A self-contained page (the evaluation report's style): every table, the few-shot curve."""
    from defectlens._version import __version__
    from defectlens.report.html import CSS

    sections = []
    if figure is not None and figure.is_file():
        import base64

        uri = "data:image/png;base64," + base64.b64encode(figure.read_bytes()).decode("ascii")
        sections.append(f"<section><h2>Few-shot curve</h2><figure><img alt='few-shot curve' src='{uri}'>"
                        "<figcaption>Image AUROC against the number of training images.</figcaption></figure></section>")
    for table in tables:
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header)
        body = "".join("<tr>" + "".join(f"<td>{_html_cell(str(cell))}</td>" for cell in row) + "</tr>" for row in table.rows)
        note = f"<p class='group-note'>{html.escape(table.note)}</p>" if table.note else ""
        sections.append(f"<section><h2>{html.escape(table.title)}</h2><table><tr>{head}</tr>{body}</table>{note}</section>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><div class='sub'>AutoVI protocol (Carvalho et al. 2024)</div></header>"
            "<main>" + "".join(sections) + f"<footer>defectlens {html.escape(__version__)} · self-contained</footer>"
            "</main></body></html>\n")


def write_protocol_outputs(records: Sequence[dict[str, Any]], out_dir: str | Path, name: str) -> dict[str, Path]:
    """Tables of ``records`` as Markdown, JSON, CSV and HTML, and the few-shot curve, in ``out_dir``."""
    from defectlens.report.json_report import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = protocol_tables(records)
    written: dict[str, Path] = {}
    figure = few_shot_figure(records, out / "few_shot.png")
    if figure is not None:
        written["few_shot_png"] = figure
    markdown = f"# {name}: AutoVI protocol\n\n" + tables_markdown(tables)
    if figure is not None:
        markdown += "\n![few-shot curve](few_shot.png)\n"
    written["markdown"] = out / f"{name}.md"
    written["markdown"].write_text(markdown, encoding="utf-8")
    written["json"] = write_json({"name": name, "tables": [dataclasses.asdict(t) for t in tables],
                                  "runs": len(records), "failed_runs": sum(r.get("status") != "ok" for r in records)},
                                 out / f"{name}.json")
    written["csv"] = out / f"{name}.csv"
    with open(written["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["table", "row", "column", "n", "mean", "std", "mark", "failed", "values"])
        for table in tables:
            for cell in table.cells:
                if "row" in cell:
                    writer.writerow([table.name, cell["row"], cell["column"], cell["n"], cell["mean"], cell["std"],
                                     cell["mark"], cell["failed"] or "", json.dumps(cell["values"])])
                else:
                    for column, values in cell["columns"].items():
                        writer.writerow([table.name, f"{cell['category']} · {cell['method']}", column, len(values),
                                         float(np.mean(values)) if values else None,
                                         float(np.std(values, ddof=1)) if len(values) > 1 else None,
                                         cell["verdict"] if column != "baseline" else "", "", json.dumps(values)])
    written["html"] = out / f"{name}.html"
    written["html"].write_text(protocol_html(name, tables, figure), encoding="utf-8")
    return written


@dataclasses.dataclass
class ProtocolResult:
    benchmark: Any  # benchmark.BenchmarkResult of this invocation's runs
    records: list[dict[str, Any]]  # every latest record of the config in OUT (the tables' input)
    outputs: dict[str, Path]
    table: str


def run_protocol(config: BenchmarkConfig | str | Path, out_dir: str | Path, experiments: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None, resume: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> ProtocolResult:
    """Run the protocol's experiments (all, or some; optionally only some methods), append the
    runs under ``out_dir`` and rebuild every table from all of this config's records there."""
    if not isinstance(config, BenchmarkConfig):
        config = load_protocol_config(config)
    jobs = protocol_jobs(config, experiments, methods)
    result = run_benchmark(config, out_dir, progress=progress, jobs=jobs, resume=resume,
                           tables=lambda records: tables_markdown(protocol_tables(latest_records(records))))
    everything = latest_records(read_results(result.jsonl_path), config.name) if result.jsonl_path.exists() else []
    outputs = write_protocol_outputs(everything, out_dir, config.name)
    return ProtocolResult(result, everything, outputs, tables_markdown(protocol_tables(everything)))
