"""``defectlens export MODEL --format onnx|openvino --out DIR`` and the runtimes of ``predict``."""

from __future__ import annotations

import argparse
from typing import Any

from defectlens.export.runtime import RUNTIMES

PREDICT_RUNTIMES = ("torch", *RUNTIMES)


def cmd_export(args: argparse.Namespace) -> int:
    from defectlens.detector import Detector
    from defectlens.export import export_detector

    detector = Detector.load(args.model)
    out = export_detector(detector, args.out, args.format, source=args.model)
    print(f"exported {detector.method_name} ({args.format}) to {out}; threshold {detector.threshold:.4g}; "
          f"run it with: defectlens predict --model {out} --runtime {'openvino' if args.format == 'openvino' else 'onnxruntime'} ...")
    return 0


def add_export_parser(commands: Any) -> None:
    from defectlens.export import FORMATS

    export = commands.add_parser(
        "export", help="export a model to ONNX / OpenVINO, to run without torch",
        description="Write the model as one graph (normalisation, backbone, scoring, upsampling, blur) with its "
        "thresholds and rules beside it (defectlens_export.json). `defectlens predict --model DIR --runtime "
        "onnxruntime|openvino` runs it without torch. Covers PatchCore, Sequential PatchCore and PaDiM on whole "
        "images (no tiling, no circular padding).",
    )
    export.add_argument("model", metavar="MODEL", help="model file written by `defectlens fit`")
    export.add_argument("--format", default="onnx", choices=FORMATS, help="onnx, or openvino (ONNX + OpenVINO IR)")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write (created if missing)")
    export.set_defaults(handler=cmd_export)


def add_runtime_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", default="torch", choices=PREDICT_RUNTIMES,
                        help="torch (a .dlens model), or onnxruntime / openvino (a folder written by `defectlens "
                        "export`; torch is not imported)")
