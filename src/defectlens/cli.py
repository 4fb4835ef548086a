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
    names = ("coreset_ratio", "num_neighbors", "projection_dim", "covariance", "reduction", "reduced_dim", "chunk_size")
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
        **_method_options(args),
    )
    progress = ProgressBars(not args.quiet)
    detector.fit(args.data, progress=progress)
    progress.close()
    path = detector.save(args.out)
    info = detector.fit_info
    print(
        f"fitted {args.method} on {info.num_images} images in "
        f"{info.feature_seconds + info.method_seconds + info.calibration_seconds:.1f} s; "
        f"threshold {detector.threshold:.4g}; model written to {path}"
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
    from defectlens.data.datasets import MVTecAD
    from defectlens.detector import Detector
    from defectlens.evaluation import evaluate

    detector = Detector.load(args.model)
    progress = ProgressBars(not args.quiet)
    report = evaluate(detector, MVTecAD(args.data), progress=progress)
    progress.close()
    _write_json(report, args.json)
    image, pixel = report["image"], report["pixel"]
    print(
        f"image AUROC {_fmt(image['auroc'])}  pixel AUROC {_fmt(pixel['auroc'])}  "
        f"AUPRO@0.3 {_fmt(pixel['aupro'].get('0.3'))}"
    )
    if args.json:
        print(f"report written to {args.json}")
    return EXIT_OK


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
    patchcore = fit.add_argument_group("patchcore")
    patchcore.add_argument("--coreset-ratio", type=float, help="fraction of patches kept (default 0.1)")
    patchcore.add_argument("--num-neighbors", type=int, help="k nearest neighbours per patch score (default 1)")
    patchcore.add_argument("--projection-dim", type=int, help="random projection for coreset selection (128)")
    patchcore.add_argument("--reweight", action="store_true", help="paper's image-score reweighting")
    patchcore.add_argument("--chunk-size", type=int, help="most query x bank distances held at once")
    padim = fit.add_argument_group("padim")
    padim.add_argument("--covariance", choices=COVARIANCE_MODELS, help="full (default), tied or global")
    padim.add_argument("--reduction", choices=REDUCTIONS, help="random (default) or negated_pca")
    padim.add_argument("--reduced-dim", type=int, help="channels kept (default 100)")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(handler=cmd_fit)

    predict = commands.add_parser("predict", help="inspect images with a model")
    predict.add_argument("--model", required=True)
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    predict.add_argument("--out", required=True, help="folder for results.jsonl, heatmaps/ and masks/")
    predict.add_argument("--threshold", type=float, help="override the model's threshold")
    predict.add_argument("-q", "--quiet", action="store_true")
    predict.set_defaults(handler=cmd_predict)

    evaluate = commands.add_parser("evaluate", help="measure a model on a labelled test set")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True, help="category root with test/ and ground_truth/")
    evaluate.add_argument("--json", help="write the report as JSON here")
    evaluate.add_argument("-q", "--quiet", action="store_true")
    evaluate.set_defaults(handler=cmd_evaluate)

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
