"""Benchmarks: every method x backbone x category x seed of a config, fitted and evaluated.

A config (JSON, or TOML on Python 3.11+) lists what to combine::

    {
      "name": "transistor_piped",
      "data_root": "../../shared/data",          # relative to the config file; the
                                                  # DEFECTLENS_DATA variable overrides it
      "methods": [{"name": "patchcore", "options": {"coreset_ratio": 0.1}}, "padim",
                  {"name": "dsr", "seeds": [0, 1]},          # fewer seeds for a slow method
                  {"name": "cflow", "optional": true}],      # not registered: failed rows
      "backbones": ["efficientnet_lite0"],
      "image_size": 256,                          # default for categories without one
      "categories": [{"path": "mvtec_ad/transistor", "image_size": 256},
                     {"path": "piped/PA_*", "image_size": 128}],   # globs allowed
      "seeds": [0, 1, 2],
      "batch_sizes": [1, 16],                     # inference timing batch sizes
      "timing_images": 16, "timing_repeats": 3,
      "detector": {"batch_size": 16},             # other Detector arguments
      "start_method": "spawn", "workers": 1, "threads": null,
      "train_thresholds": false,                  # TPR at TNR from training-image thresholds
      "html_reports": "none"                      # or "first_seed": an HTML report per row
    }

A method marked ``"optional"`` that this build does not register gives failed rows (the
reason in ``error``) instead of refusing the config; any other unknown method is refused.

Each run (one combination) happens in a fresh process (``multiprocessing``, ``spawn`` by
default, ``forkserver`` on request: forked from a server that has imported the library
once, so the per-run start-up is short), so its peak resident memory
(``resource.getrusage``) is its own. A run records: fit time, the full evaluation report,
inference milliseconds per image at each timing batch size (a fixed, evenly spaced set of
``timing_images`` test images, decoded beforehand, after one warm-up batch; the median of
``timing_repeats`` passes), peak RSS and the saved model's size.

Results are *appended* to ``OUT/results.jsonl`` (one JSON object per run, with the full
report) and ``OUT/results.csv`` (flat columns), so later runs can be compared with earlier
ones; the summary tables go to stdout and ``OUT/summary-<run id>.md``.

Summary tables: mean ± std over seeds per (category, method, backbone). Per category and
column the best mean is **bold**; the others whose seeds are not significantly different
from the best by a two-sided Welch t-test at 5 % (``scipy.stats.ttest_ind(equal_var=False)``)
are *italic* - the marking of the AutoVI study. A row "mean" averages each seed over the
categories that every (method, backbone) completed.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import secrets
import platform
import resource
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from defectlens._version import __version__
from defectlens.errors import ConfigError, DatasetError

ProgressCallback = Callable[[str, int, int], None]
START_METHODS = ("spawn", "forkserver", "inline")
SIGNIFICANCE = 0.05


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    seeds: tuple[int, ...] | None = None  # this method's seeds (None: the config's)
    optional: bool = False  # unregistered -> failed rows, not a config error

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class CategorySpec:
    name: str
    path: Path
    image_size: int


@dataclass
class BenchmarkConfig:
    """A parsed benchmark config (see the module docstring for the file format)."""

    name: str
    methods: list[MethodSpec]
    backbones: list[str]
    categories: list[CategorySpec]
    seeds: list[int]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    timing_images: int = 16
    timing_repeats: int = 3
    detector: dict[str, Any] = field(default_factory=dict)
    start_method: str = "spawn"
    workers: int = 1
    threads: int | None = None
    source: str = ""
    train_thresholds: bool = False
    html_reports: str = "none"
    document: dict[str, Any] = field(default_factory=dict)  # the parsed file (protocols read their keys)
    base_dir: Path = Path(".")

    def seeds_of(self, method: MethodSpec) -> list[int]:
        return list(method.seeds) if method.seeds is not None else list(self.seeds)

    def jobs(self, **variant: Any) -> list[dict[str, Any]]:
        """One job per (category, method, backbone, seed), in that nesting order.

        ``variant`` keys are set on every job (see `run_job`: experiment, variant, train_subset,
        augment, window, batch_sizes ...).
        """
        jobs = []
        for category in self.categories:
            for method in self.methods:
                for backbone in self.backbones:
                    for seed in self.seeds_of(method):
                        jobs.append({
                            "category": category.name,
                            "category_path": str(category.path),
                            "image_size": category.image_size,
                            "method": method.name,
                            "method_label": method.display,
                            "method_options": dict(method.options),
                            "backbone": backbone,
                            "seed": int(seed),
                            "batch_sizes": list(self.batch_sizes),
                            "timing_images": self.timing_images,
                            "timing_repeats": self.timing_repeats,
                            "detector": dict(self.detector),
                            "threads": self.threads,
                            "experiment": "main",
                            "variant": "",
                            "train_subset": None,
                            "augment": None,
                            "window": None,
                            "train_thresholds": self.train_thresholds,
                            "html_report": self.html_reports == "first_seed" and seed == self.seeds_of(method)[0],
                            **variant,
                        })
        return jobs


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read benchmark config {path}: {error}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ConfigError(f"{path}: TOML configs need Python 3.11+ (tomllib); use JSON") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"benchmark config {path} is not valid TOML: {error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"benchmark config {path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"benchmark config {path}: expected an object at the top level")
    return document


def _int_list(document: dict[str, Any], key: str, default: Sequence[int], where: str) -> list[int]:
    values = document.get(key, list(default))
    if isinstance(values, int):
        values = [values]
    if not isinstance(values, list) or not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: '{key}' must be a non-empty list of integers, got {values!r}")
    return values


def _data_root(document: dict[str, Any], base: Path) -> Path:
    if os.environ.get("DEFECTLENS_DATA"):
        return Path(os.environ["DEFECTLENS_DATA"])
    root = Path(os.path.expandvars(str(document.get("data_root", "."))))
    return root if root.is_absolute() else (base / root).resolve()


def _expand_categories(entries: Any, data_root: Path, default_size: int, where: str) -> list[CategorySpec]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'categories' must be a non-empty list")
    categories: list[CategorySpec] = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"{where}: a category needs a 'path', got {entry!r}")
        raw = Path(os.path.expandvars(str(entry["path"])))
        pattern = raw if raw.is_absolute() else data_root / raw
        if glob.has_magic(str(pattern)):
            paths = sorted(Path(p) for p in glob.glob(str(pattern)) if (Path(p) / "test").is_dir())
            if not paths:
                raise DatasetError(f"{where}: no category folder (with test/) matches {pattern}")
        else:
            if not (pattern / "test").is_dir():
                raise DatasetError(f"{where}: {pattern} is not a category folder (no test/ inside)")
            paths = [pattern]
        size = int(entry.get("image_size", default_size))
        for path in paths:
            name = entry.get("name") if len(paths) == 1 and entry.get("name") else path.name
            categories.append(CategorySpec(str(name), path, size))
    names = [category.name for category in categories]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{where}: category names occur twice: {', '.join(duplicates)} (give them a 'name')")
    return categories


def load_config(source: str | Path | dict[str, Any], base_dir: str | Path | None = None) -> BenchmarkConfig:
    """Parse a config file (``.json`` / ``.toml``) or an already-parsed dict.

    Relative data paths resolve against ``data_root`` (itself relative to the config file's
    folder, or ``base_dir`` for a dict); ``DEFECTLENS_DATA`` overrides ``data_root``.

    Raises:
        ConfigError: a malformed config. DatasetError: a category folder is missing.
    """
    if isinstance(source, dict):
        document, base, where = source, Path(base_dir or "."), "benchmark config"
    else:
        path = Path(source)
        document, base, where = _read_config_file(path), path.resolve().parent, str(path)
    from defectlens.backbones import available_backbones
    from defectlens.methods import METHODS

    methods: list[MethodSpec] = []
    for entry in document.get("methods") or []:
        spec = MethodSpec(entry) if isinstance(entry, str) else MethodSpec(
            str(entry.get("name", "")), dict(entry.get("options") or {}), str(entry.get("label") or ""),
            None if entry.get("seeds") is None else tuple(_int_list(entry, "seeds", [0], f"{where}: method {entry.get('name')!r}")),
            bool(entry.get("optional", False)))
        if spec.name not in METHODS and not spec.optional:
            raise ConfigError(f"{where}: unknown method {spec.name!r}; choose from {', '.join(sorted(METHODS))} "
                              "(or mark it \"optional\": true to report it as failed rows)")
        methods.append(spec)
    if not methods:
        raise ConfigError(f"{where}: 'methods' must list at least one method")
    labels = [method.display for method in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: two methods share a name; give them distinct 'label's")
    backbones = document.get("backbones") or ["efficientnet_lite0"]
    if isinstance(backbones, str):
        backbones = [backbones]
    unknown = [name for name in backbones if name not in available_backbones()]
    if unknown:
        raise ConfigError(f"{where}: unknown backbone(s) {unknown}; choose from {', '.join(available_backbones())}")
    default_size = int(document.get("image_size", 256))
    categories = _expand_categories(document.get("categories"), _data_root(document, base), default_size, where)
    start_method = str(document.get("start_method", "spawn"))
    if start_method not in START_METHODS:
        raise ConfigError(f"{where}: start_method must be one of {', '.join(START_METHODS)}, got {start_method!r}")
    config = BenchmarkConfig(
        name=str(document.get("name") or (Path(source).stem if not isinstance(source, dict) else "benchmark")),
        methods=methods,
        backbones=list(backbones),
        categories=categories,
        seeds=_int_list(document, "seeds", [0], where),
        batch_sizes=_int_list(document, "batch_sizes", [1, 16], where),
        timing_images=int(document.get("timing_images", 16)),
        timing_repeats=int(document.get("timing_repeats", 3)),
        detector=dict(document.get("detector") or {}),
        start_method=start_method,
        workers=int(document.get("workers", 1)),
        threads=None if document.get("threads") is None else int(document["threads"]),
        source="" if isinstance(source, dict) else str(source),
        train_thresholds=bool(document.get("train_thresholds", False)),
        html_reports=str(document.get("html_reports", "none")),
        document=dict(document),
        base_dir=base,
    )
    if config.html_reports not in ("none", "first_seed"):
        raise ConfigError(f"{where}: html_reports must be 'none' or 'first_seed', got {config.html_reports!r}")
    if min(config.batch_sizes, default=1) < 1 or config.timing_images < 1 or config.timing_repeats < 1 or config.workers < 1:
        raise ConfigError(f"{where}: batch_sizes, timing_images, timing_repeats and workers must be >= 1")
    for key in ("method", "backbone", "image_size", "seed"):
        if key in config.detector:
            raise ConfigError(f"{where}: set '{key}' through the config's own keys, not 'detector'")
    return config


# ------------------------------------------------------------------------------------------
# one run (executed in a fresh process)
# ------------------------------------------------------------------------------------------
def flat_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of a report as flat ``name: value`` pairs (CSV columns)."""
    image, pixel = report.get("image", {}), report.get("pixel", {})
    values: dict[str, float | None] = {
        "image_auroc": image.get("auroc"),
        "image_ap": image.get("ap"),
        "image_f1_max": image.get("f1_max"),
    }
    for tnr, tpr in (image.get("tpr_at_tnr") or {}).items():
        values[f"tpr_at_tnr_{tnr}"] = tpr
    values["pixel_auroc"] = pixel.get("auroc")
    values["pixel_f1_max"] = pixel.get("f1_max")
    for limit, value in (pixel.get("aupro") or {}).items():
        values[f"aupro_{limit}"] = value
    for subset, entry in (report.get("spro") or {}).items():
        for limit, value in entry.get("auspro", {}).items():
            values[f"auspro_{subset}_{limit}"] = value
    return values


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def _evenly_spaced(count: int, total: int) -> list[int]:
    if total <= count:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, count)})


def time_inference(detector: Any, images: Sequence[np.ndarray], batch_sizes: Sequence[int], repeats: int) -> dict[str, float]:
    """Median milliseconds per image of ``predict_batch`` over ``images`` at each batch size
    (decoded arrays, so file decoding is not timed; one warm-up batch first)."""
    original = detector.batch_size
    result: dict[str, float] = {}
    try:
        for batch_size in batch_sizes:
            detector.batch_size = batch_size
            detector.predict_batch(list(images[:batch_size]))  # warm-up
            passes = []
            for _ in range(repeats):
                started = time.perf_counter()
                for start in range(0, len(images), batch_size):
                    detector.predict_batch(list(images[start : start + batch_size]))
                passes.append((time.perf_counter() - started) / len(images))
            result[str(batch_size)] = float(np.median(passes)) * 1e3
    finally:
        detector.batch_size = original
    return result


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Fit, evaluate, time and save one combination; returns its result record.

    ``job["threads"]`` sets torch's intra-op threads for the run (restored afterwards).
    """
    import torch

    threads = torch.get_num_threads()
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    try:
        return _run_job(job)
    finally:
        torch.set_num_threads(threads)


TRAIN_TNRS = (0.9, 0.95, 0.99)


def training_threshold_metrics(normal_train_scores: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                               tnrs: Sequence[float] = TRAIN_TNRS) -> dict[str, float | None]:
    """TPR at TNR with thresholds from training images only (the AutoVI protocol).

    For each target TNR t the threshold is `metrics.normal_quantile_threshold` of the held-out
    training scores (the detector's own calibration scores: leave-one-out, k-fold or held-out
    split, as its method declares); a test image is flagged when its score is above it.

    Returns:
        ``train_tpr_at_tnr_<t>``: the fraction of defective test images flagged;
        ``train_tnr_at_tnr_<t>``: the fraction of good test images not flagged (how well the
        training threshold carries over; t on exchangeable data). None without such images.
    """
    from defectlens.metrics import normal_quantile_threshold

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    good, defective = scores[~labels], scores[labels]
    values: dict[str, float | None] = {}
    for tnr in tnrs:
        threshold = normal_quantile_threshold(normal_train_scores, tnr)
        values[f"train_tpr_at_tnr_{tnr}"] = float((defective > threshold).mean()) if defective.size else None
        values[f"train_tnr_at_tnr_{tnr}"] = float((good <= threshold).mean()) if good.size else None
    return values


def held_out_normal_scores(detector: Any) -> np.ndarray:
    """The held-out normal training scores the detector's thresholds were set from (sorted)."""
    if detector.normal_scores is None:
        raise ConfigError("the detector kept no held-out normal scores (not fitted?)")
    return np.asarray(detector.normal_scores.scores, dtype=np.float64)


def _training_inputs(dataset: Any, job: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The job's training set: all train images, a few-shot subset, and/or augmented copies."""
    from defectlens.data.variants import few_shot_subset, with_augmented_copies

    images = list(dataset.train_images())
    info: dict[str, Any] = {"available": len(images)}
    if job.get("train_subset"):
        chosen = few_shot_subset(len(images), int(job["train_subset"]), job["seed"])
        images = [images[i] for i in chosen]
        info["subset"] = [path.name for path in images]
    if job.get("augment"):
        spec = job["augment"]
        images = with_augmented_copies(images, spec.get("augmentation", "autovi"), int(spec.get("copies", 1)), job["seed"])
        info["augmented_copies"] = int(spec.get("copies", 1))
    info["fitted_on"] = len(images)
    return images, info


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    import torch

    from defectlens.data.datasets import open_dataset
    from defectlens.data.images import read_image
    from defectlens.data.variants import WindowSpec, crop_category
    from defectlens.detector import Detector
    from defectlens.evaluation import evaluate_run
    from defectlens.methods import METHODS

    if job["method"] not in METHODS:
        raise ConfigError(f"method {job['method']!r} is not registered in this defectlens build "
                          f"(registered: {', '.join(sorted(METHODS))})")
    with tempfile.TemporaryDirectory(prefix="defectlens-bench-") as folder:
        root, window_info = Path(job["category_path"]), None
        if job.get("window"):
            root = Path(folder) / "window" / root.name
            window_info = crop_category(job["category_path"], root, WindowSpec.from_dict(job["window"]))
        dataset = open_dataset(root)
        if not hasattr(dataset, "train_images"):
            raise DatasetError(f"{job['category_path']} has no train/good folder")
        train, train_info = _training_inputs(dataset, job)
        detector = Detector(method=job["method"], backbone=job["backbone"], image_size=job["image_size"],
                            seed=job["seed"], **job["detector"], **job["method_options"])
        started = time.perf_counter()
        detector.fit(train)
        fit_seconds = time.perf_counter() - started
        report, run = evaluate_run(detector, dataset)
        metrics = flat_metrics(report)
        if job.get("train_thresholds"):
            labels = np.asarray([sample.label for sample in run.samples])
            metrics.update(training_threshold_metrics(held_out_normal_scores(detector), run.scores, labels))
        if job.get("report_dir"):
            from defectlens.report import write_html_report

            title = f"{job['category']} · {job['method_label']} · seed {job['seed']} {job.get('variant') or ''}".strip()
            write_html_report(report, run, job["report_dir"], title=title)
        model_bytes = detector.save(Path(folder) / "model.dlens").stat().st_size
        samples = dataset.test_samples()
        chosen = [samples[i] for i in _evenly_spaced(job["timing_images"], len(samples))]
        images = [read_image(sample.path) for sample in chosen] if job["batch_sizes"] else []
        inference = time_inference(detector, images, job["batch_sizes"], job["timing_repeats"]) if images else {}
    info = detector.fit_info
    return {
        **{key: job[key] for key in JOB_KEYS if key in job},
        "status": "ok",
        "error": None,
        "fit_s": fit_seconds,
        "fit_detail": {"feature_s": info.feature_seconds, "method_s": info.method_seconds,
                       "calibration_s": info.calibration_seconds, "num_images": info.num_images,
                       "method": info.method},
        "train": train_info,
        "window_info": window_info,
        "eval_ms_per_image": report["timing"]["ms_per_image"],
        "infer_ms_per_image": inference,
        "timing_images": len(images),
        "peak_rss_mb": _peak_rss_mb(),
        "model_mb": model_bytes / 1e6,
        "threshold": detector.threshold,
        "torch_threads": torch.get_num_threads(),
        "metrics": metrics,
        "report": report,
    }


JOB_KEYS = ("category", "category_path", "method", "method_label", "method_options", "backbone", "image_size", "seed",
            "experiment", "variant", "train_subset", "augment", "window")


def job_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a run: (experiment, variant, category, method label, backbone, seed)."""
    return (record.get("experiment") or "main", record.get("variant") or "", record["category"], record["method_label"],
            record["backbone"], int(record["seed"]))


def _failed(job: dict[str, Any], message: str) -> dict[str, Any]:
    return {**{key: job[key] for key in JOB_KEYS if key in job},
            "status": "error", "error": message, "metrics": {}, "report": None}


def _child(job: dict[str, Any], connection: Any) -> None:
    try:
        record = run_job(job)
    except BaseException as error:  # noqa: BLE001 - every failure is reported to the parent
        record = _failed(job, f"{error.__class__.__name__}: {error}\n{traceback.format_exc(limit=6)}")
    from defectlens.report.json_report import to_jsonable

    connection.send(to_jsonable(record))
    connection.close()


def execute_jobs(jobs: Sequence[dict[str, Any]], start_method: str = "spawn", workers: int = 1) -> Iterator[dict[str, Any]]:
    """Run jobs, each in a fresh process (``workers`` at a time); yields records as they end.

    ``start_method="inline"`` runs them in this process instead (fast, for tests; peak RSS is
    then that of the whole process so far, not the run's own).
    """
    if start_method == "inline":
        from defectlens.report.json_report import to_jsonable

        for job in jobs:
            try:
                record = run_job(job)
            except Exception as error:  # noqa: BLE001
                record = _failed(job, f"{error.__class__.__name__}: {error}\n{traceback.format_exc(limit=6)}")
            yield to_jsonable(record)
        return
    import multiprocessing

    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(["defectlens.benchmark", "defectlens.detector", "defectlens.evaluation"])
    pending = list(jobs)
    running: dict[Any, tuple[Any, dict[str, Any]]] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(job, sender), name=f"defectlens-bench-{job['category']}")
                process.start()
                sender.close()
                running[receiver] = (process, job)
            ready = set(wait(list(running) + [process.sentinel for process, _ in running.values()]))
            for receiver in list(running):
                process, job = running[receiver]
                if receiver not in ready and process.sentinel not in ready:
                    continue
                try:
                    record = receiver.recv()
                except (EOFError, OSError):
                    process.join()
                    record = _failed(job, f"worker process exited with code {process.exitcode} before reporting "
                                          "(killed for memory?)")
                process.join()
                receiver.close()
                del running[receiver]
                yield record
    finally:
        for process, _ in running.values():
            process.terminate()
            process.join()


# ------------------------------------------------------------------------------------------
# summary tables with Welch marking
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str  # a metrics key, or a top-level record key / "infer_ms_per_image.<b>"
    title: str
    higher_is_better: bool
    digits: int


def quality_columns(records: Sequence[dict[str, Any]]) -> list[Column]:
    columns = [Column("image_auroc", "Image AUROC", True, 3), Column("image_f1_max", "Image F1-max", True, 3),
               Column("pixel_auroc", "Pixel AUROC", True, 3), Column("aupro_0.3", "AUPRO@0.3", True, 3),
               Column("aupro_0.05", "AUPRO@0.05", True, 3)]
    if any(record.get("metrics", {}).get("auspro_all_0.05") is not None for record in records):
        columns.append(Column("auspro_all_0.05", "AUsPRO@0.05", True, 3))
    return columns


def cost_columns(records: Sequence[dict[str, Any]]) -> list[Column]:
    sizes: list[str] = []
    for record in records:
        for size in record.get("infer_ms_per_image") or {}:
            if size not in sizes:
                sizes.append(size)
    sizes.sort(key=int)
    return ([Column("fit_s", "Fit s", False, 1)]
            + [Column(f"infer_ms_per_image.{size}", f"ms/img b{size}", False, 1) for size in sizes]
            + [Column("peak_rss_mb", "Peak RSS MB", False, 0), Column("model_mb", "Model MB", False, 2)])


def record_value(record: dict[str, Any], key: str) -> float | None:
    if key.startswith("infer_ms_per_image."):
        value = (record.get("infer_ms_per_image") or {}).get(key.split(".", 1)[1])
    elif key in (record.get("metrics") or {}):
        value = record["metrics"][key]
    else:
        value = record.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def significantly_different(a: Sequence[float], b: Sequence[float], alpha: float = SIGNIFICANCE) -> bool:
    """Two-sided Welch t-test at ``alpha``. With zero variance on both sides, different means
    count as different; fewer than 2 values on a side: different unless the means are equal."""
    from scipy import stats

    a_values, b_values = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if np.isclose(a_values.mean(), b_values.mean(), rtol=0.0, atol=1e-12):
        return False
    if a_values.size < 2 or b_values.size < 2:
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_value = stats.ttest_ind(a_values, b_values, equal_var=False).pvalue
    if not np.isfinite(p_value):
        return True  # both variances zero and means differ
    return bool(p_value < alpha)


def mark_best(groups: dict[Any, list[float]], higher_is_better: bool, alpha: float = SIGNIFICANCE) -> dict[Any, str]:
    """``{group: "best" | "tie" | ""}``: the best mean, and the groups not significantly
    different from it (Welch, two-sided, ``alpha``)."""
    valid = {key: values for key, values in groups.items() if values}
    if not valid:
        return {key: "" for key in groups}
    means = {key: float(np.mean(values)) for key, values in valid.items()}
    best = max(means, key=means.get) if higher_is_better else min(means, key=means.get)
    marks = {key: "" for key in groups}
    for key, values in valid.items():
        if key == best:
            marks[key] = "best"
        elif not significantly_different(valid[best], values, alpha):
            marks[key] = "tie"
    return marks


def mean_std_cell(values: Sequence[float], digits: int, mark: str) -> str:
    """``mean ± std`` (sample std), **bold** for the best, *italic* for a tie, an en dash without values."""
    if not values:
        return "–"
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"**{text}**" if mark == "best" else f"*{text}*" if mark == "tie" else text


def _mean_over_categories(ok: Sequence[dict[str, Any]], rows: list[tuple[str, str]], categories: list[str]
                          ) -> tuple[list[str], list[dict[str, Any]]]:
    """Per (method, backbone, seed): averages over the categories every row completed."""
    complete = [category for category in categories
                if all(any(r["category"] == category and (r["method_label"], r["backbone"]) == row for r in ok)
                       for row in rows)]
    synthetic: list[dict[str, Any]] = []
    if len(complete) < 2:
        return complete, synthetic
    seeds = sorted({r["seed"] for r in ok})
    for method_label, backbone in rows:
        for seed in seeds:
            chosen = [r for r in ok if (r["method_label"], r["backbone"], r["seed"]) == (method_label, backbone, seed)
                      and r["category"] in complete]
            if len({r["category"] for r in chosen}) != len(complete):
                continue
            keys = {key for r in chosen for key in r.get("metrics", {})}
            sizes = {size for r in chosen for size in (r.get("infer_ms_per_image") or {})}

            def mean_of(getter: Callable[[dict[str, Any]], Any]) -> float | None:
                values = [getter(r) for r in chosen]
                values = [float(v) for v in values if v is not None]
                return float(np.mean(values)) if len(values) == len(chosen) else None

            synthetic.append({
                "category": f"mean ({len(complete)})", "method_label": method_label, "backbone": backbone, "seed": seed,
                "metrics": {key: mean_of(lambda r, key=key: r["metrics"].get(key)) for key in keys},
                "infer_ms_per_image": {size: mean_of(lambda r, size=size: (r.get("infer_ms_per_image") or {}).get(size))
                                       for size in sizes},
                **{key: mean_of(lambda r, key=key: r.get(key)) for key in ("fit_s", "peak_rss_mb", "model_mb")},
            })
    return complete, synthetic


def _with_variant_label(record: dict[str, Any]) -> dict[str, Any]:
    experiment = record.get("experiment") or "main"
    extra = " ".join(part for part in ("" if experiment == "main" else experiment, record.get("variant") or "") if part)
    return {**record, "method_label": f"{record['method_label']} [{extra}]"} if extra else record


def summary_tables(records: Sequence[dict[str, Any]], alpha: float = SIGNIFICANCE) -> str:
    """Markdown tables (quality, then cost) of mean ± std over seeds, Welch-marked per category.

    Runs of other experiments than "main" (or with a variant) get rows of their own.
    """
    records = [_with_variant_label(record) for record in records]
    ok = [record for record in records if record.get("status") == "ok"]
    if not ok:
        return "No successful run.\n"
    categories = list(dict.fromkeys(record["category"] for record in ok))
    rows = list(dict.fromkeys((record["method_label"], record["backbone"]) for record in ok))
    _, means = _mean_over_categories(ok, rows, categories)
    all_records = list(ok) + means
    if means:
        categories.append(means[0]["category"])
    seeds = sorted({record["seed"] for record in ok})
    parts = []
    for title, columns in (("Detection quality", quality_columns(ok)), ("Cost (this machine)", cost_columns(ok))):
        header = ["Category", "Method", "Backbone", "Seeds"] + [column.title for column in columns]
        lines: list[list[str]] = []
        for category in categories:
            in_category = [r for r in all_records if r["category"] == category]
            values = {column.key: {row: [v for r in in_category if (r["method_label"], r["backbone"]) == row
                                         for v in [record_value(r, column.key)] if v is not None]
                                   for row in rows} for column in columns}
            marks = {column.key: mark_best(values[column.key], column.higher_is_better, alpha) for column in columns}
            for row in rows:
                count = len({r["seed"] for r in in_category if (r["method_label"], r["backbone"]) == row})
                if not count:
                    continue
                lines.append([category, row[0], row[1], str(count)]
                             + [mean_std_cell(values[c.key][row], c.digits, marks[c.key][row]) for c in columns])
        widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]

        def render(cells: Sequence[str]) -> str:
            return "| " + " | ".join(cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i])
                                     for i, cell in enumerate(cells)) + " |"

        rule = "| " + " | ".join("-" * widths[i] if i < 3 else "-" * (widths[i] - 1) + ":" for i in range(len(header))) + " |"
        parts.append(f"### {title}\n\n" + "\n".join([render(header), rule] + [render(line) for line in lines]))
    legend = (f"mean ± std over seeds {seeds}. Per category and column: **bold** = best mean; *italic* = not "
              f"significantly different from the best (two-sided Welch t-test, p >= {alpha:g}). "
              "AUPRO / AUsPRO at the FPR limit given; ms/img bN = inference at batch size N.")
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        legend += f" {len(failed)} run(s) failed and are left out (see results.jsonl)."
    return "\n\n".join(parts) + "\n\n" + legend + "\n"


# ------------------------------------------------------------------------------------------
# result files
# ------------------------------------------------------------------------------------------
CSV_FIRST = ["run_id", "finished_at", "config", "experiment", "variant", "category", "method", "method_label",
             "method_options", "backbone", "image_size", "seed", "status", "fit_s", "eval_ms_per_image", "peak_rss_mb", "model_mb", "torch_threads"]


def csv_row(record: dict[str, Any]) -> dict[str, Any]:
    row = {key: record.get(key) for key in CSV_FIRST}
    row["method_options"] = json.dumps(record.get("method_options") or {}, sort_keys=True)
    for size, value in (record.get("infer_ms_per_image") or {}).items():
        row[f"infer_ms_b{size}"] = value
    row.update(record.get("metrics") or {})
    row["error"] = (record.get("error") or "").splitlines()[0] if record.get("error") else ""
    return {key: "" if value is None else value for key, value in row.items()}


def append_csv(path: Path, record: dict[str, Any]) -> None:
    """Append one row; when the row brings new columns the file is rewritten with them."""
    row = csv_row(record)
    if path.exists() and path.stat().st_size:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            missing = [key for key in row if key not in header]
            existing = list(reader) if missing else None
        if existing is not None:
            header += missing
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=header, restval="")
                writer.writeheader()
                writer.writerows(existing)
        with open(path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=header, restval="").writerow(row)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row), restval="")
        writer.writeheader()
        writer.writerow(row)


def read_results(path: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """Records of ``results.jsonl`` (all, or one benchmark run's)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if run_id is None or record.get("run_id") == run_id:
                    records.append(record)
    return records


def _environment() -> dict[str, Any]:
    import torch

    return {"defectlens": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "platform": platform.platform()}


@dataclass
class BenchmarkResult:
    run_id: str
    records: list[dict[str, Any]]
    table: str
    jsonl_path: Path
    csv_path: Path
    summary_path: Path

    @property
    def failures(self) -> int:
        return sum(record.get("status") != "ok" for record in self.records)


def _report_dir(out: Path, job: dict[str, Any]) -> str:
    parts = [job.get("experiment") or "main", job.get("variant") or "", job["category"], job["method_label"], job["backbone"]]
    name = "__".join(part for part in parts if part)
    return str(out / "reports" / "".join(c if c.isalnum() or c in "._-" else "_" for c in name))


def run_benchmark(config: BenchmarkConfig | str | Path, out_dir: str | Path,
                  progress: ProgressCallback | None = None, jobs: Sequence[dict[str, Any]] | None = None,
                  resume: bool = False, tables: Callable[[Sequence[dict[str, Any]]], str] | None = None) -> BenchmarkResult:
    """Run every combination of ``config``; append results under ``out_dir``; build the tables.

    Args:
        jobs: the runs (default ``config.jobs()``; protocols make their own).
        resume: skip runs whose key (`job_key`) already has a successful record of this config
            in ``out_dir/results.jsonl`` (an interrupted benchmark goes on where it stopped).
        tables: records -> Markdown tables (default `summary_tables` of this run's records).
        progress: ``progress(description, done, total)`` before and after every run.
    """
    if not isinstance(config, BenchmarkConfig):
        config = load_config(config)
    from defectlens.report.json_report import dumps

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # time, process and a random part: two runs in one second of one process stay apart
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}-{secrets.token_hex(3)}"
    jsonl_path, csv_path = out / "results.jsonl", out / "results.csv"
    environment = _environment()
    jobs = list(config.jobs() if jobs is None else jobs)
    if resume and jsonl_path.exists():
        done = {job_key(r) for r in read_results(jsonl_path) if r.get("status") == "ok" and r.get("config") == config.name}
        jobs = [job for job in jobs if job_key(job) not in done]
    for job in jobs:
        if job.get("html_report"):
            job["report_dir"] = _report_dir(out, job)
    records: list[dict[str, Any]] = []
    if progress:
        progress(f"{config.name}: {len(jobs)} runs", 0, len(jobs))
    for record in execute_jobs(jobs, config.start_method, config.workers):
        record.update({"run_id": run_id, "config": config.name, "config_file": config.source,
                       "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "start_method": config.start_method, "environment": environment})
        records.append(record)
        with open(jsonl_path, "a", encoding="utf-8") as handle:
            handle.write(dumps(record, indent=None) + "\n")
        append_csv(csv_path, record)
        if progress:
            status = "" if record["status"] == "ok" else " FAILED"
            variant = f" {record['variant']}" if record.get("variant") else ""
            progress(f"{record.get('experiment', 'main')}{variant} {record['category']} {record['method_label']} "
                     f"seed {record['seed']}{status}", len(records), len(jobs))
    table = (tables or summary_tables)(records)
    summary_path = out / f"summary-{run_id}.md"
    summary_path.write_text(f"# Benchmark {config.name} ({run_id})\n\n{table}", encoding="utf-8")
    return BenchmarkResult(run_id, records, table, jsonl_path, csv_path, summary_path)


def iter_failures(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    for record in records:
        if record.get("status") != "ok":
            first = (record.get("error") or "").splitlines()[0] if record.get("error") else "unknown error"
            variant = f" {record['variant']}" if record.get("variant") else ""
            yield (f"{record.get('experiment', 'main')}{variant} {record['category']} {record['method_label']} "
                   f"{record['backbone']} seed {record['seed']}: {first}")
