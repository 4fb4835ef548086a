"""The command line's ``--ray`` / ``--shards`` / ``--resume`` branches of fit, predict and
evaluate (`defectlens.cli` calls these; they only translate arguments)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from defectlens.errors import ConfigError
from defectlens.progress import ProgressBars

DEFAULT_SHARDS = 4


def _require_ray_option(args: argparse.Namespace, option: str) -> None:
    if not args.ray:
        raise ConfigError(f"{option} goes with --ray ADDRESS|local")


def fit_on_ray(args: argparse.Namespace, detector: Any, progress: ProgressBars) -> None:
    """``fit --ray ADDRESS|local [--shards N]``."""
    from defectlens import distributed

    _require_ray_option(args, "--shards")
    if args.init:
        raise ConfigError("--init (fine-tuning) is not supported with --ray: fit the initial model's method on one machine")
    shards = DEFAULT_SHARDS if args.shards is None else args.shards
    distributed.fit(detector, args.data, address=args.ray, shards=shards, progress=progress, validation=args.validation)


def predict_on_ray(args: argparse.Namespace, detector: Any, paths: Sequence[Path]) -> int:
    """``predict --ray ADDRESS|local [--resume]``; returns the exit code (1 if an input failed)."""
    from tqdm import tqdm

    from defectlens import distributed

    _require_ray_option(args, "--resume")
    progress = ProgressBars(not args.quiet)
    summary = distributed.predict(
        args.model, paths, args.out, address=args.ray, threshold=args.threshold, resume=args.resume, progress=progress,
        on_error=lambda message: tqdm.write(f"error: {message}", file=sys.stderr),
    )
    progress.close()
    verdicts = summary.verdicts
    review = f"{verdicts['REVIEW']} REVIEW, " if detector.review_threshold is not None else ""
    skipped = f", {summary.skipped} skipped (already in results.jsonl)" if summary.skipped else ""
    print(
        f"{summary.inspected} of {summary.total} images inspected: {verdicts['NOT OK']} NOT OK, {review}{verdicts['OK']} OK, "
        f"{summary.failed} failed{skipped}; {summary.workers} Ray workers, {summary.seconds:.1f} s; "
        f"results in {summary.results_path}"
    )
    return 1 if summary.failed else 0


def evaluate_on_ray(args: argparse.Namespace, detector: Any, progress: ProgressBars) -> tuple[dict[str, Any], Any]:
    """``evaluate --model M --ray ADDRESS|local [--resume]``: the report and the run."""
    from defectlens import distributed

    _require_ray_option(args, "--resume")
    return distributed.evaluate_run(args.model, args.data, address=args.ray, resume=args.resume, progress=progress)
