"""defectlens command line: a thin layer over `Detector`, the evaluation and the data tools.

Detector and method options of `fit` are generated from their constructors (`cli_options`):
a new method's hyper-parameters appear here without an edit (`defectlens fit --method X --help`).

Exit codes: 0 success, 1 some inputs failed (the rest were processed), 2 usage or data error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from defectlens._version import __version__
from defectlens.cli_options import add_constructor_options, given_options, peek_option
from defectlens.errors import DefectlensError, ImageReadError
from defectlens.progress import ProgressBars
from defectlens.service.cli import add_serve_parser

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


# ---------------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    from defectlens.detector import Detector

    options = {**given_options(args, args.detector_options), **given_options(args, args.method_options)}
    detector = Detector(method=args.method, **options)
    progress = ProgressBars(not args.quiet)
    detector.fit(args.data, progress=progress, init=args.init)
    if args.f1_validation:
        from defectlens.data.datasets import open_dataset

        samples = open_dataset(args.f1_validation).test_samples()
        detector.calibrate([s.path for s in samples], progress=progress, labels=[s.label for s in samples])
    progress.close()
    path = detector.save(args.out)
    info = detector.fit_info
    print(
        f"fitted {args.method} on {info.num_images} images in "
        f"{info.feature_seconds + info.method_seconds + info.calibration_seconds:.1f} s; "
        f"threshold {detector.threshold:.4g}; model written to {path}"
    )
    return EXIT_OK


def cmd_meld(args: argparse.Namespace) -> int:
    from defectlens.meld import meld_detectors

    detector = meld_detectors(args.models, args.size, seed=args.seed, max_epochs=args.epochs)
    if args.calibrate:
        progress = ProgressBars(not args.quiet)
        detector.calibrate(args.calibrate, progress=progress)
        progress.close()
    path = detector.save(args.out)
    print(
        f"melded {len(args.models)} models into a coreset of {detector.method.memory_bank.shape[0]} vectors in "
        f"{detector.fit_info.method_seconds:.1f} s; threshold {detector.threshold:.4g} "
        f"({detector.fit_info.calibration.get('source', 'calibrated')}); model written to {path}"
    )
    return EXIT_OK


def _expand_predict_inputs(inputs: Sequence[str]) -> list[Path]:
    from defectlens.data.datasets import list_images

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        paths.extend(list_images(path) if path.is_dir() else [path])
    return paths


def cmd_predict(args: argparse.Namespace) -> int:
    from defectlens.detector import Detector
    from defectlens.outputs import ResultsWriter, output_stems

    detector = Detector.load(args.model)
    paths = _expand_predict_inputs(args.inputs)
    stems = dict(zip(paths, output_stems(paths)))
    failures = anomalous = 0
    with ResultsWriter(args.out) as writer:
        outcomes = detector.iter_predictions(paths, threshold=args.threshold)
        for path, outcome in tqdm(outcomes, total=len(paths), desc="predicting", unit="img", disable=args.quiet):
            if isinstance(outcome, ImageReadError):
                failures += 1
                tqdm.write(f"error: {outcome}", file=sys.stderr)
                writer.write_error(path, outcome)
                continue
            writer.write(stems[path], outcome)
            anomalous += outcome.is_anomalous
    inspected = len(paths) - failures
    print(
        f"{inspected} of {len(paths)} images inspected: {anomalous} NOT OK, {inspected - anomalous} OK, "
        f"{failures} failed; results in {writer.results_path}"
    )
    return EXIT_SOME_FAILED if failures else EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from defectlens.errors import ConfigError
    from defectlens.evaluation import evaluate_maps_run, evaluate_run
    from defectlens.report import write_reports

    if args.maps:
        report, run = evaluate_maps_run(args.maps, args.data, args.scores, threshold=args.threshold)
    else:
        if args.scores or args.threshold is not None:
            raise ConfigError("--scores and --threshold go with --maps (a model has its own scores and threshold)")
        from defectlens.detector import Detector

        detector = Detector.load(args.model)
        progress = ProgressBars(not args.quiet)
        report, run = evaluate_run(detector, args.data, progress=progress)
        progress.close()
    written = write_reports(report, run, json_path=args.json, markdown_path=args.markdown, html_dir=args.report)
    image, pixel = report["image"], report["pixel"]
    summary = (
        f"image AUROC {_fmt(image['auroc'])}  pixel AUROC {_fmt(pixel['auroc'])}  "
        f"AUPRO@0.3 {_fmt(pixel['aupro'].get('0.3'))}"
    )
    if "spro" in report:
        summary += f"  AUsPRO@0.05 {_fmt(report['spro']['all']['auspro'].get('0.05'))}"
    print(summary)
    for kind, path in written.items():
        print(f"{kind} report written to {path}")
    return EXIT_OK


def cmd_benchmark(args: argparse.Namespace) -> int:
    from defectlens.benchmark import iter_failures, load_config, run_benchmark

    config = load_config(args.config)
    bar = tqdm(total=len(config.jobs()), desc="benchmark", unit="run", disable=args.quiet)

    def progress(stage: str, done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.set_postfix_str(stage)

    result = run_benchmark(config, args.out, progress=progress)
    bar.close()
    print(result.table)
    for failure in iter_failures(result.records):
        print(f"failed: {failure}", file=sys.stderr)
    print(f"results appended to {result.jsonl_path} and {result.csv_path}; tables in {result.summary_path}")
    return EXIT_SOME_FAILED if result.failures else EXIT_OK


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def cmd_synth(args: argparse.Namespace) -> int:
    from defectlens.data.datasets import training_images
    from defectlens.data.synthetic import make_synthetic_testset

    out = make_synthetic_testset(training_images(args.data), args.kind, args.count, Path(args.out), seed=args.seed)
    print(f"synthetic '{args.kind}' test set written to {out}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from defectlens.demo import run_demo

    return run_demo(Path(args.out), quiet=args.quiet)


# ---------------------------------------------------------------------------------- parsers
def _add_fit_parser(commands: Any, argv: Sequence[str]) -> None:
    from defectlens.backbones import available_backbones
    from defectlens.detector import Detector
    from defectlens.methods import METHODS, method_class

    method = peek_option(argv, "--method", "patchcore")
    method = method if method in METHODS else "patchcore"  # an unknown name is refused by --method's choices
    fit = commands.add_parser(
        "fit", help="learn a model from defect-free images",
        description="Learn a model from defect-free images. The method options listed are those of --method "
        f"(here {method}); `defectlens fit --method NAME --help` lists another method's.",
    )
    fit.add_argument("--data", required=True, help="MVTec category root (uses train/good) or a folder of good images")
    fit.add_argument("--out", required=True, help="model file to write (e.g. part.dlens)")
    fit.add_argument("--method", default="patchcore", choices=sorted(METHODS))
    fit.add_argument("--init", metavar="MODEL", help="start from this model's state (fine-tuning; methods that support it)")
    fit.add_argument("--f1-validation", metavar="ROOT", help="after fitting, set the F1-optimal threshold on this "
                     "labelled set (MVTec layout: test/good and test/<defect>) instead of the normal-only one")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    detector_names = add_constructor_options(
        fit.add_argument_group("detector options"), Detector, skip=("method",), choices={"backbone": available_backbones()}
    )
    cls = method_class(method)
    method_names = add_constructor_options(
        fit.add_argument_group(f"{method} options"), cls, skip=detector_names, choices=cls.option_choices
    )
    fit.set_defaults(handler=cmd_fit, detector_options=detector_names, method_options=method_names)


def _add_meld_parser(commands: Any) -> None:
    meld = commands.add_parser("meld", help="merge the coresets of models with the same features (no images)")
    meld.add_argument("models", nargs="+", metavar="MODEL", help="model files (patchcore or sequential_patchcore)")
    meld.add_argument("--size", type=int, required=True, help="M, vectors in the merged coreset")
    meld.add_argument("--out", required=True, help="model file to write")
    meld.add_argument("--epochs", type=int, default=10, help="most passes over the union of the coresets")
    meld.add_argument("--seed", type=int, default=0)
    meld.add_argument("--calibrate", metavar="FOLDER", help="set the threshold from these held-out normal images "
                      "(default: the largest of the models' thresholds)")
    meld.add_argument("-q", "--quiet", action="store_true")
    meld.set_defaults(handler=cmd_meld)


def _add_predict_parser(commands: Any) -> None:
    predict = commands.add_parser("predict", help="inspect images with a model")
    predict.add_argument("--model", required=True)
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    predict.add_argument("--out", required=True, help="folder for results.jsonl, heatmaps/ and masks/")
    predict.add_argument("--threshold", type=float, help="override the model's threshold")
    predict.add_argument("-q", "--quiet", action="store_true")
    predict.set_defaults(handler=cmd_predict)


def _add_evaluate_parser(commands: Any) -> None:
    evaluate = commands.add_parser("evaluate", help="measure a model, or anomaly maps of any program, on a labelled test set")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model file written by `defectlens fit`")
    source.add_argument("--maps", metavar="MAPS_DIR", help="anomaly maps of any program, one float TIFF (or .npy) per "
                        "test image: MAPS_DIR/test/<defect>/<stem>.tiff, each the size of its image")
    evaluate.add_argument("--data", required=True, help="category root with test/ and ground_truth/ "
                          "(MVTec AD, MVTec LOCO AD and AutoVI layouts are recognized)")
    evaluate.add_argument("--scores", help="with --maps: image scores, JSON {relative_path: score} or CSV path,score "
                          "(default: each map's maximum)")
    evaluate.add_argument("--threshold", type=float, help="with --maps: the decision threshold of those maps' program")
    evaluate.add_argument("--json", help="write the report as JSON here")
    evaluate.add_argument("--markdown", metavar="OUT.md", help="write a Markdown summary here")
    evaluate.add_argument("--report", metavar="DIR", help="write a self-contained HTML report to DIR/index.html")
    evaluate.add_argument("-q", "--quiet", action="store_true")
    evaluate.set_defaults(handler=cmd_evaluate)


def _add_tool_parsers(commands: Any) -> None:
    from defectlens.data.synthetic import SYNTHETIC_KINDS

    benchmark = commands.add_parser("benchmark", help="fit and evaluate every method x backbone x category x seed of a config")
    benchmark.add_argument("--config", required=True, help="benchmark config, JSON or TOML (see benchmarks/*.json)")
    benchmark.add_argument("--out", default="benchmarks/results", help="results.jsonl and results.csv are appended "
                           "here, and a summary-<run>.md written (default: benchmarks/results)")
    benchmark.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    benchmark.set_defaults(handler=cmd_benchmark)

    synth = commands.add_parser("synth", help="make a test set with synthetic defects from good images")
    synth.add_argument("--data", required=True, help="folder of good images (or MVTec root: train/good)")
    synth.add_argument("--kind", required=True, choices=SYNTHETIC_KINDS)
    synth.add_argument("--count", type=int, default=20, help="defective images to make")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=cmd_synth)

    demo = commands.add_parser("demo", help="fit and evaluate on a small data set built offline")
    demo.add_argument("--out", default="demo_output")
    demo.add_argument("-q", "--quiet", action="store_true")
    demo.set_defaults(handler=cmd_demo)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` tells `fit` which method's options to offer (--method)."""
    parser = argparse.ArgumentParser(
        prog="defectlens",
        description="Industrial visual anomaly detection: learn from good images, inspect new ones.",
    )
    parser.add_argument("--version", action="version", version=f"defectlens {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_fit_parser(commands, argv)
    _add_meld_parser(commands)
    _add_predict_parser(commands)
    _add_evaluate_parser(commands)
    _add_tool_parsers(commands)
    add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(arguments).parse_args(arguments)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args))
    except DefectlensError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
