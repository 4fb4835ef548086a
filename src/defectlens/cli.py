"""defectlens command line: a thin layer over `Detector`, the evaluation and the data tools.

Exit codes: 0 success, 1 some inputs failed (the rest were processed), 2 usage or data error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from defectlens import __version__
from defectlens.errors import DefectlensError, ImageReadError
from defectlens.service.cli import add_serve_parser

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


class ProgressBars:
    """A `progress(stage, done, total)` callback drawing one tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="step" if total == 1 else "img", leave=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Method hyper-parameters given on the command line (only those that were set)."""
    names = (
        "coreset_ratio", "num_neighbors", "projection_dim", "covariance", "reduction", "reduced_dim", "chunk_size",
        "coreset_size", "epochs",
    )
    options = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "reweight", False):
        options["reweight"] = True
    return options


def cmd_fit(args: argparse.Namespace) -> int:
    from defectlens.detector import Detector

    detector = Detector(
        method=args.method,
        backbone=args.backbone,
        image_size=args.image_size,
        layers=args.layers,
        weights=args.weights,
        device=args.device,
        batch_size=args.batch_size,
        blur_sigma=args.blur_sigma,
        target_fpr=args.target_fpr,
        seed=args.seed,
        pool_size=args.pool_size,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        augmentation=_augmentation(args.augmentation),
        **_method_options(args),
    )
    progress = ProgressBars(not args.quiet)
    detector.fit(args.data, progress=progress, init=args.init)
    progress.close()
    path = detector.save(args.out)
    info = detector.fit_info
    print(
        f"fitted {args.method} on {info.num_images} images in "
        f"{info.feature_seconds + info.method_seconds + info.calibration_seconds:.1f} s; "
        f"threshold {detector.threshold:.4g}; model written to {path}"
    )
    return EXIT_OK


def _augmentation(value: str | None) -> Any:
    """--augmentation: a preset name, a JSON list of step dicts, or a JSON file holding one."""
    if not value:
        return None
    from defectlens.errors import ConfigError

    try:
        if value.lstrip().startswith("["):
            return json.loads(value)
        if Path(value).is_file():
            return json.loads(Path(value).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"--augmentation {value!r} is not valid JSON ({error})") from None
    return value


def cmd_meld(args: argparse.Namespace) -> int:
    from defectlens.detector import meld_detectors

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


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """Unique file stems for outputs (parent folder prepended where names collide)."""
    stems = [path.stem for path in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{index:05d}_{path.parent.name}_{path.stem}" for index, path in enumerate(paths)]


def cmd_predict(args: argparse.Namespace) -> int:
    from defectlens.data.images import save_png
    from defectlens.detector import Detector
    from defectlens.visualize import mask_image, overlay_heatmap

    detector = Detector.load(args.model)
    paths = _expand_predict_inputs(args.inputs)
    out_dir = Path(args.out)
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    failures = 0
    anomalous = 0
    stems = dict(zip(paths, _output_stems(paths)))
    with open(out_dir / "results.jsonl", "a", encoding="utf-8") as results:
        outcomes = detector.iter_predictions(paths, threshold=args.threshold)
        for path, image, prediction in tqdm(outcomes, total=len(paths), desc="predicting", unit="img", disable=args.quiet):
            if isinstance(prediction, ImageReadError):
                failures += 1
                tqdm.write(f"error: {prediction}", file=sys.stderr)
                results.write(json.dumps({"path": str(path), "error": str(prediction)}) + "\n")
                continue
            heatmap_path = out_dir / "heatmaps" / f"{stems[path]}_heatmap.png"
            mask_path = out_dir / "masks" / f"{stems[path]}_mask.png"
            save_png(heatmap_path, overlay_heatmap(image, prediction.anomaly_map, prediction.threshold, prediction.mask))
            save_png(mask_path, mask_image(prediction.mask))
            anomalous += prediction.is_anomalous
            record = {
                "path": str(path),
                "score": prediction.score,
                "is_anomalous": prediction.is_anomalous,
                "threshold": prediction.threshold,
                "heatmap": str(heatmap_path),
                "mask": str(mask_path),
            }
            results.write(json.dumps(record) + "\n")
            results.flush()
    print(
        f"{len(paths) - failures} of {len(paths)} images inspected: {anomalous} NOT OK, "
        f"{len(paths) - failures - anomalous} OK, {failures} failed; results in {out_dir / 'results.jsonl'}"
    )
    return EXIT_SOME_FAILED if failures else EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from defectlens.errors import ConfigError
    from defectlens.evaluation import evaluate_maps_run, evaluate_run
    from defectlens.report import write_reports

    if args.maps:
        report, run = evaluate_maps_run(args.maps, args.data, args.scores)
    else:
        if args.scores:
            raise ConfigError("--scores goes with --maps (a model computes its own image scores)")
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


def _write_json(document: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2, default=_json_default), encoding="utf-8")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def cmd_synth(args: argparse.Namespace) -> int:
    from defectlens.data.datasets import training_images
    from defectlens.data.synthetic import make_synthetic_testset

    out = make_synthetic_testset(training_images(args.data), args.kind, args.count, Path(args.out), seed=args.seed)
    print(f"synthetic '{args.kind}' test set written to {out}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from defectlens.demo import run_demo

    return run_demo(Path(args.out), quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    from defectlens.backbones import available_backbones
    from defectlens.data.synthetic import SYNTHETIC_KINDS
    from defectlens.methods import METHODS
    from defectlens.methods.padim import COVARIANCE_MODELS
    from defectlens.ops.reduction import REDUCTIONS

    parser = argparse.ArgumentParser(
        prog="defectlens",
        description="Industrial visual anomaly detection: learn from good images, inspect new ones.",
    )
    parser.add_argument("--version", action="version", version=f"defectlens {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="learn a model from defect-free images")
    fit.add_argument("--data", required=True, help="MVTec category root (uses train/good) or a folder of good images")
    fit.add_argument("--out", required=True, help="model file to write (e.g. part.dlens)")
    fit.add_argument("--method", default="patchcore", choices=sorted(METHODS))
    fit.add_argument("--backbone", default="efficientnet_lite0", choices=available_backbones())
    fit.add_argument("--weights", help="local state-dict file for backbones without bundled weights")
    fit.add_argument("--layers", nargs="+", help="backbone layers (default: stride-8 and stride-16 stage ends)")
    fit.add_argument("--image-size", type=int, default=256, help="images are resized to this square side")
    fit.add_argument("--batch-size", type=int, default=16)
    fit.add_argument("--device", default="cpu")
    fit.add_argument("--blur-sigma", type=float, default=4.0, help="Gaussian blur of anomaly maps (pixels)")
    fit.add_argument("--target-fpr", type=float, default=0.01, help="normal images allowed above the threshold")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--pool-size", type=int, default=1, help="average pooling of patch scores before upsampling (1 = none)")
    fit.add_argument("--tile-size", type=int, help="cut images into overlapping tiles of this side at full resolution")
    fit.add_argument("--tile-overlap", type=int, default=32, help="pixels shared by neighbouring tiles (default 32)")
    patchcore = fit.add_argument_group("patchcore")
    patchcore.add_argument("--coreset-ratio", type=float, help="fraction of patches kept (default 0.1)")
    patchcore.add_argument("--num-neighbors", type=int, help="k nearest neighbours per patch score (default 1)")
    patchcore.add_argument("--projection-dim", type=int, help="random projection for coreset selection (128)")
    patchcore.add_argument("--reweight", action="store_true", help="paper's image-score reweighting")
    patchcore.add_argument("--chunk-size", type=int, help="most query x bank distances held at once")
    sequential = fit.add_argument_group("sequential_patchcore")
    sequential.add_argument("--coreset-size", type=int, help="M, memory-bank vectors of the streaming coreset (10000)")
    sequential.add_argument("--epochs", type=int, help="most passes over the training data (default 3)")
    sequential.add_argument("--augmentation", help="augmentation of epochs after the first: preset (light, autovi, "
                            "sequential) or a JSON list of steps (or a file holding one)")
    sequential.add_argument("--init", metavar="MODEL", help="start from this model's memory bank (fine-tuning)")
    padim = fit.add_argument_group("padim")
    padim.add_argument("--covariance", choices=COVARIANCE_MODELS, help="full (default), tied or global")
    padim.add_argument("--reduction", choices=REDUCTIONS, help="random (default) or negated_pca")
    padim.add_argument("--reduced-dim", type=int, help="channels kept (default 100)")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(handler=cmd_fit)

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

    predict = commands.add_parser("predict", help="inspect images with a model")
    predict.add_argument("--model", required=True)
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    predict.add_argument("--out", required=True, help="folder for results.jsonl, heatmaps/ and masks/")
    predict.add_argument("--threshold", type=float, help="override the model's threshold")
    predict.add_argument("-q", "--quiet", action="store_true")
    predict.set_defaults(handler=cmd_predict)

    evaluate = commands.add_parser("evaluate", help="measure a model, or anomaly maps of any program, on a labelled test set")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model file written by `defectlens fit`")
    source.add_argument("--maps", metavar="MAPS_DIR", help="anomaly maps of any program, one float TIFF (or .npy) per "
                        "test image: MAPS_DIR/test/<defect>/<stem>.tiff, each the size of its image")
    evaluate.add_argument("--data", required=True, help="category root with test/ and ground_truth/ "
                          "(MVTec AD, MVTec LOCO AD and AutoVI layouts are recognized)")
    evaluate.add_argument("--scores", help="with --maps: image scores, JSON {relative_path: score} or CSV path,score "
                          "(default: each map's maximum)")
    evaluate.add_argument("--json", help="write the report as JSON here")
    evaluate.add_argument("--markdown", metavar="OUT.md", help="write a Markdown summary here")
    evaluate.add_argument("--report", metavar="DIR", help="write a self-contained HTML report to DIR/index.html")
    evaluate.add_argument("-q", "--quiet", action="store_true")
    evaluate.set_defaults(handler=cmd_evaluate)

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

    add_serve_parser(commands)

    demo = commands.add_parser("demo", help="fit and evaluate on a small data set built offline")
    demo.add_argument("--out", default="demo_output")
    demo.add_argument("-q", "--quiet", action="store_true")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
