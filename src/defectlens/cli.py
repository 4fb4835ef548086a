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
from defectlens.errors import ConfigError, DefectlensError, ImageReadError
from defectlens.progress import ProgressBars
from defectlens.model_cli import add_upgrade_model_parser
from defectlens.export.cli import add_export_parser, add_runtime_option
from defectlens.threads import configured_threads, set_threads
from defectlens.service.cli import (
    add_export_reviewed_parser, add_monitor_parser, add_serve_parser, add_token_parser,
)

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


# ---------------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    from defectlens.detector import Detector

    options = {**given_options(args, args.detector_options), **given_options(args, args.method_options)}
    detector, auto = _auto_detector(args) if args.auto else (Detector(method=args.method, **options), None)
    progress = ProgressBars(not args.quiet)
    if args.ray or args.shards is not None:
        from defectlens.distributed.commands import fit_on_ray

        fit_on_ray(args, detector, progress)
    else:
        detector.fit(args.data, progress=progress, init=args.init, validation=args.validation)
    if auto:
        detector.fit_info.auto = auto
    if args.f1_validation:
        from defectlens.data.datasets import open_dataset

        samples = open_dataset(args.f1_validation).test_samples()
        detector.calibrate([s.path for s in samples], progress=progress, labels=[s.label for s in samples])
    progress.close()
    path = detector.save(args.out)
    info = detector.fit_info
    print(
        f"fitted {args.method} on {info.num_images} images in "
        f"{info.feature_seconds + info.method_seconds + info.calibration_seconds:.1f} s; model written to {path}"
    )
    print(describe_thresholds(info.calibration, detector.threshold, detector.review_threshold))
    return EXIT_OK


def _auto_detector(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``fit --auto``: the candidate the synthetic validation picks, with the user's detector options."""
    from defectlens.autoconfig import auto_configure
    from defectlens.detector import Detector

    if given_options(args, args.method_options):
        raise ConfigError("--auto chooses the method: leave out method options")
    options = given_options(args, args.detector_options)

    def make_detector(**params: Any) -> Detector:
        return Detector(**{**options, **params})

    result = auto_configure(make_detector, args.data, budget_minutes=args.budget_minutes, seed=options.get("seed", 0),
                            report=None if args.quiet else lambda line: print(f"  {line}", file=sys.stderr))
    print(result.table())
    print(f"chosen: {result.chosen.name}")
    return make_detector(**result.chosen.params), result.to_dict()


def describe_thresholds(calibration: dict[str, Any], threshold: float | None, review: float | None) -> str:
    """What the thresholds are and how sure they are, for people."""
    lines = []
    for name, value, key in (("NOT OK", threshold, "threshold"), ("REVIEW", review, "review_threshold")):
        estimate = calibration.get(key)
        if value is None:
            continue
        if not estimate:
            lines.append(f"{name} threshold {value:.4g}")
            continue
        low, high = estimate["fpr_interval"]
        lines.append(
            f"{name} threshold {value:.4g} ({estimate['model']}): target FPR {estimate['target_fpr']:g}, estimated "
            f"{estimate['estimated_fpr']:.3g} (95 % interval {low:.3g}-{high:.3g}) from {estimate['num_scores']} "
            f"held-out good images; smallest FPR they support {estimate['supported_min_fpr']:.3g}"
        )
    lines += [f"warning: {warning}" for warning in calibration.get("warnings", [])]
    return "\n".join(lines)


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


def cmd_rules(args: argparse.Namespace) -> int:
    import json

    from defectlens.cli_options import structured_value
    from defectlens.detector import Detector
    from defectlens.rules import InspectionRules, region_of

    detector = Detector.load(args.model)
    changes: dict[str, Any] = {} if not args.clear else InspectionRules().to_dict()
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        changes[key.strip()] = structured_value(value)
    for name in ("care", "dont_care"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = region_of(structured_value(value) if value.lstrip().startswith("[") else value)
    if args.zone:
        changes["zones"] = [structured_value(zone) for zone in args.zone]
    if changes:
        detector.rules = (InspectionRules() if args.clear else detector.rules).with_changes(**changes)
        path = detector.save(args.out or args.model)
        print(f"rules written to {path}")
    print(json.dumps(detector.rules.to_dict(), indent=2) if args.show or not changes else _rules_summary(detector.rules))
    return EXIT_OK


def _rules_summary(rules: Any) -> str:
    document = rules.to_dict()
    parts = [f"{key} {document[key]}" for key in ("min_defect_area_px", "min_defect_area_mm2", "mm_per_px", "max_defect_count")
             if document[key]]
    parts += [f"{name} region" for name in ("care", "dont_care") if getattr(rules, name)]
    parts += [f"zone {zone.name!r}" for zone in rules.zones]
    return "rules: " + (", ".join(parts) if parts else "none (the score against the thresholds decides)")


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from defectlens.detector import Detector

    detector = Detector.load(args.model)
    if args.target_fpr is not None:
        detector.target_fpr = args.target_fpr
    if args.review_fpr is not None:
        detector.review_fpr = args.review_fpr if args.review_fpr > 0 else None
    progress = ProgressBars(not args.quiet)
    detector.calibrate(args.good, progress=progress)
    progress.close()
    path = detector.save(args.out or args.model)
    print(f"recalibrated on {args.good}; model written to {path}")
    print(describe_thresholds(detector.fit_info.calibration, detector.threshold, detector.review_threshold))
    return EXIT_OK


def _expand_predict_inputs(inputs: Sequence[str]) -> list[Path]:
    from defectlens.data.datasets import list_images

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        paths.extend(list_images(path) if path.is_dir() else [path])
    return paths


def cmd_predict(args: argparse.Namespace) -> int:
    from defectlens.outputs import ResultsWriter, output_stems

    if args.runtime != "torch":  # a folder of `defectlens export`, run without torch
        from defectlens.export.runtime import ExportedDetector

        if args.ray or args.resume:
            raise ConfigError("--ray and --resume run torch models (--runtime torch)")
        detector: Any = ExportedDetector(args.model, args.runtime, threads=configured_threads())
    else:
        from defectlens.detector import Detector

        detector = Detector.load(args.model)
    paths = _expand_predict_inputs(args.inputs)
    if args.ray or args.resume:
        from defectlens.distributed.commands import predict_on_ray

        return predict_on_ray(args, detector, paths)
    stems = dict(zip(paths, output_stems(paths)))
    failures = 0
    verdicts = {"OK": 0, "REVIEW": 0, "NOT OK": 0}
    with ResultsWriter(args.out) as writer:
        outcomes = detector.iter_predictions(paths, threshold=args.threshold)
        for path, outcome in tqdm(outcomes, total=len(paths), desc="predicting", unit="img", disable=args.quiet):
            if isinstance(outcome, ImageReadError):
                failures += 1
                tqdm.write(f"error: {outcome}", file=sys.stderr)
                writer.write_error(path, outcome)
                continue
            writer.write(stems[path], outcome)
            verdicts[outcome.verdict] += 1
    inspected = len(paths) - failures
    review = f"{verdicts['REVIEW']} REVIEW, " if detector.review_threshold is not None else ""
    print(
        f"{inspected} of {len(paths)} images inspected: {verdicts['NOT OK']} NOT OK, {review}{verdicts['OK']} OK, "
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
        if args.ray or args.resume:
            from defectlens.distributed.commands import evaluate_on_ray

            report, run = evaluate_on_ray(args, detector, progress)
        else:
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
    import dataclasses

    from defectlens.autovi_protocol import PROTOCOLS, load_protocol_config, run_protocol
    from defectlens.benchmark import iter_failures, load_config, run_benchmark
    from defectlens.errors import ConfigError

    config_path = args.config or ("benchmarks/autovi_protocol.json" if args.protocol == "autovi" else None)
    if config_path is None:
        raise ConfigError("benchmark needs --config CONFIG (or --protocol autovi, whose default config is "
                          "benchmarks/autovi_protocol.json)")
    config = load_config(config_path)
    protocol = args.protocol or config.document.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ConfigError(f"{config_path}: unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol:
        config = load_protocol_config(config_path)
    if args.categories:
        names = [name for name in args.categories.split(",") if name]
        unknown = sorted(set(names) - {category.name for category in config.categories})
        if unknown:
            raise ConfigError(f"--categories: {', '.join(unknown)} not in {config_path}")
        config = dataclasses.replace(config, categories=[c for c in config.categories if c.name in names])
    methods = [name for name in args.methods.split(",") if name] if args.methods else None
    experiments = [name for name in args.experiments.split(",") if name] if args.experiments else None
    if experiments and not protocol:
        raise ConfigError("--experiments goes with a protocol (--protocol autovi)")
    bar = tqdm(desc="benchmark", unit="run", disable=args.quiet)

    def progress(stage: str, done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.set_postfix_str(stage)
        bar.refresh()

    if protocol:
        outcome = run_protocol(config, args.out, experiments, methods, args.resume, progress)
        result, table = outcome.benchmark, outcome.table
    else:
        if methods:
            config = dataclasses.replace(config, methods=[m for m in config.methods if m.name in methods or m.display in methods])
        result = run_benchmark(config, args.out, progress=progress, resume=args.resume)
        table = result.table
    bar.close()
    print(table)
    for failure in iter_failures(result.records):
        print(f"failed: {failure}", file=sys.stderr)
    print(f"results appended to {result.jsonl_path} and {result.csv_path}; tables in {result.summary_path}")
    if protocol:
        for kind, path in outcome.outputs.items():
            print(f"protocol {kind}: {path}")
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
    fit.add_argument("--validation", metavar="DIR", help="good images never fitted on, added to the held-out "
                     "calibration scores (default: validation/good of a category root, as MVTec LOCO ships it)")
    fit.add_argument("--f1-validation", metavar="ROOT", help="after fitting, set the F1-optimal threshold on this "
                     "labelled set (MVTec layout: test/good and test/<defect>) instead of the normal-only one")
    fit.add_argument("--auto", action="store_true", help="choose method, layers, blur, backbone or ensemble without "
                     "defect images: candidates scored on synthetic anomalies pasted into held-out training images "
                     "(the choice and every candidate's scores are printed and stored in the model)")
    fit.add_argument("--budget-minutes", type=float, metavar="M", help="with --auto: stop trying candidates after M minutes")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    fit.add_argument("--ray", metavar="ADDRESS|local", help="fit on a Ray cluster (HOST:PORT of its head) or a local "
                     "Ray instance (local): the training images are sharded and the shard models melded")
    fit.add_argument("--shards", type=int, metavar="N", help="with --ray: shards of the training images (default 4)")
    detector_names = add_constructor_options(
        fit.add_argument_group("detector options"), Detector, skip=("method", "threads"), choices={"backbone": available_backbones()}
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
    predict.add_argument("--ray", metavar="ADDRESS|local", help="inspect on a Ray cluster (HOST:PORT) or a local Ray "
                         "instance (local); inputs and --out must be on storage every node sees")
    predict.add_argument("--resume", action="store_true", help="with --ray: skip the inputs OUT/results.jsonl has a row for")
    add_runtime_option(predict)
    predict.set_defaults(handler=cmd_predict)


def _add_model_parsers(commands: Any) -> None:
    rules = commands.add_parser(
        "rules", help="show or edit a model's inspection rules (no refit)",
        description="Inspection rules stored in the model: care / don't-care regions, minimum defect area, maximum "
        "defect count, per-zone thresholds (see defectlens.rules). Geometry is in pixels of the prepared image.",
    )
    rules.add_argument("model", metavar="MODEL")
    rules.add_argument("--set", action="append", metavar="KEY=VALUE", help="set a rule, e.g. min_defect_area_px=50, "
                       "max_defect_count=1, min_defect_area_mm2=0.5, mm_per_px=0.05 (repeatable)")
    rules.add_argument("--care", metavar="MASK.png|POLYGONS", help="inspect only here: a mask image or a JSON list of polygons")
    rules.add_argument("--dont-care", dest="dont_care", metavar="MASK.png|POLYGONS", help="never inspect here")
    rules.add_argument("--zone", action="append", metavar="JSON", help='a zone, e.g. \'{"name": "seal", "polygons": '
                       '[[[0,0],[50,0],[50,20]]], "threshold_scale": 0.8, "min_area_px": 10}\' (repeatable; replaces the zones)')
    rules.add_argument("--clear", action="store_true", help="start from no rules")
    rules.add_argument("--show", action="store_true", help="print the rules as JSON")
    rules.add_argument("--out", help="write the model here (default: in place)")
    rules.set_defaults(handler=cmd_rules)

    recalibrate = commands.add_parser("recalibrate", help="set a model's thresholds from new good images (no refit)")
    recalibrate.add_argument("model", metavar="MODEL")
    recalibrate.add_argument("--good", required=True, metavar="DIR", help="good images the model was not fitted on")
    recalibrate.add_argument("--target-fpr", type=float, help="FPR of the NOT OK threshold (default: the model's)")
    recalibrate.add_argument("--review-fpr", type=float, help="FPR of the REVIEW threshold (0: none; default: the model's)")
    recalibrate.add_argument("--out", help="write the model here (default: in place)")
    recalibrate.add_argument("-q", "--quiet", action="store_true")
    recalibrate.set_defaults(handler=cmd_recalibrate)


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
    evaluate.add_argument("--ray", metavar="ADDRESS|local", help="predict the test images on a Ray cluster (HOST:PORT) "
                          "or a local Ray instance (local)")
    evaluate.add_argument("--resume", action="store_true", help="with --ray: reuse the predictions a stopped run kept")
    evaluate.set_defaults(handler=cmd_evaluate)


def _add_tool_parsers(commands: Any) -> None:
    from defectlens.data.synthetic import SYNTHETIC_KINDS

    benchmark = commands.add_parser("benchmark", help="fit and evaluate every method x backbone x category x seed of a config")
    benchmark.add_argument("--config", help="benchmark config, JSON or TOML (see benchmarks/*.json); with --protocol "
                           "autovi the default is benchmarks/autovi_protocol.json")
    benchmark.add_argument("--protocol", choices=["autovi"], help="run a study's protocol over the config's methods and "
                           "categories: autovi = eight seeds, training-image thresholds, and the augmentation, window-size "
                           "and few-shot experiments (a config may also say \"protocol\": \"autovi\")")
    benchmark.add_argument("--experiments", metavar="A,B", help="with a protocol: only these experiments "
                           "(main, augmentation, window, few_shot)")
    benchmark.add_argument("--methods", metavar="A,B", help="only these methods of the config (names or labels)")
    benchmark.add_argument("--categories", metavar="A,B", help="only these categories of the config (names)")
    benchmark.add_argument("--resume", action="store_true", help="skip runs that already have a successful record in "
                           "OUT/results.jsonl (go on after an interruption)")
    benchmark.add_argument("--out", default="benchmarks/results", help="results.jsonl and results.csv are appended "
                           "here, and a summary-<run>.md written (default: benchmarks/results); a protocol also "
                           "writes <config name>.md/.json/.csv/.html and few_shot.png")
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
    parser.add_argument("--threads", metavar="N|auto", default="auto", help="CPU threads, on every command (may "
                        "also follow the command): N, auto (default: the cores not already busy) or 0 (torch's default)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_fit_parser(commands, argv)
    _add_meld_parser(commands)
    _add_predict_parser(commands)
    _add_evaluate_parser(commands)
    _add_model_parsers(commands)
    _add_tool_parsers(commands)
    add_serve_parser(commands)
    add_token_parser(commands)
    add_monitor_parser(commands)
    add_export_reviewed_parser(commands)
    add_upgrade_model_parser(commands)
    add_export_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    arguments, threads = _take_threads(arguments)
    args = build_parser(arguments).parse_args(arguments)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        set_threads(threads)
        return int(args.handler(args))
    except DefectlensError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _take_threads(arguments: list[str]) -> tuple[list[str], str]:
    """``--threads N`` / ``--threads=N`` wherever it stands (before or after the command)."""
    rest, threads, k = [], "auto", 0
    while k < len(arguments):
        item = arguments[k]
        if item == "--threads" and k + 1 < len(arguments):
            threads, k = arguments[k + 1], k + 2
            continue
        if item.startswith("--threads="):
            threads = item.split("=", 1)[1]
        else:
            rest.append(item)
        k += 1
    return rest, threads


if __name__ == "__main__":
    sys.exit(main())
