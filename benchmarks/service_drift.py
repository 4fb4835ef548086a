"""Drift test (issue 15): good images whose brightness shifts step by step, judged by a model and
watched by the service's drift monitor (`defectlens.service.monitor`, the code behind
GET /v1/monitor). Reports, per step, the false-alarm share (NOT OK on good parts) and the
monitor's status on the newest --window scores, and whether the monitor flagged the shift
before the false-alarm share exceeded 3x its calibrated value.

    python benchmarks/service_drift.py [--train 60] [--per-step 40] [--step 0.03] [--steps 8]

Data: the offline brick crops (`defectlens.demo.build_demo_dataset`), a PatchCore at 64 px with
a 5 % NOT OK target FPR (so that 3x is measurable with few images); the brightness of step k is
``clip(pixels * (1 + k * step))``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from defectlens.demo import build_demo_dataset
from defectlens.detector import Detector
from defectlens.inputs import load_input
from defectlens.service.monitor import drift_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--per-step", type=int, default=40, help="good images judged per brightness step")
    parser.add_argument("--step", type=float, default=0.03, help="relative brightness change per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--window", type=int, default=40)
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args(argv)

    root = build_demo_dataset(Path(tempfile.mkdtemp(prefix="defectlens-drift-")), train_count=args.train,
                              test_good=args.per_step, per_kind=1)
    detector = Detector(method="patchcore", image_size=64, coreset_ratio=0.1, target_fpr=args.target_fpr)
    detector.fit(root / "train" / "good")
    good = [load_input(path)[0] for path in sorted((root / "test" / "good").glob("*.png"))]
    calibrated = detector.fit_info.calibration["threshold"]["estimated_fpr"]
    recent: list[float] = []
    rows, flagged_at, exceeded_at = [], None, None
    for step in range(args.steps + 1):
        factor = 1.0 + step * args.step
        predictions = detector.predict_batch([np.clip(image * factor, 0.0, 1.0) for image in good])
        scores = [float(p.score) for p in predictions]
        recent = (recent + scores)[-args.window:]
        report = drift_report("bricks", "-", recent, detector.normal_scores, detector.threshold, detector.review_threshold)
        share = float(np.mean([p.is_anomalous for p in predictions]))
        rows.append({"step": step, "brightness": factor, "false_alarm_share": share, "status": report.status,
                     "ks_p": report.ks_p_value, "ewma_z": report.ewma_z, "alarms": len(report.alarms)})
        if report.status == "drift" and flagged_at is None:
            flagged_at = step
        if share > 3 * max(calibrated, args.target_fpr) and exceeded_at is None:
            exceeded_at = step
        print(f"step {step} brightness x{factor:.2f}: false alarms {share:.1%}, monitor {report.status} "
              f"(KS p {report.ks_p_value if report.ks_p_value is None else round(report.ks_p_value, 4)}, "
              f"EWMA z {report.ewma_z if report.ewma_z is None else round(report.ewma_z, 2)})")
    early = flagged_at is not None and (exceeded_at is None or flagged_at < exceeded_at)
    print(f"calibrated FPR {calibrated:.3f}; monitor flagged at step {flagged_at}, false alarms above 3x at step "
          f"{exceeded_at}: {'flagged first' if early else 'NOT flagged first'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "flagged_at": flagged_at, "exceeded_at": exceeded_at,
                                               "calibrated_fpr": calibrated, "flagged_first": early}, indent=2))
    return 0 if early else 1


if __name__ == "__main__":
    sys.exit(main())
