"""Own-threshold false alarms and misses, before and after the calibration with stated uncertainty.

For transistor (256 px) and the 12 PIPED classes (128 px), PatchCore and PaDiM: fit on
train/good, then judge test/good and the defective test images with the model's own
threshold. "before": defectlens 0.1's calibration (40 held-out images, the (1 - FPR) quantile);
"after": every training image held out, the conformal / generalized-Pareto-tail threshold.
Reported per category: the requested FPR, the stated estimate and 95 % interval (after), the
observed false-alarm rate on test/good and the miss rate on defects with Clopper-Pearson
intervals, and whether the observed false-alarm rate lies inside the stated interval.

    .venv/bin/python benchmarks/verdict_calibration.py [--target-fpr 0.01] [--review-fpr 0.05]
        [--methods patchcore padim] [--out benchmarks/results/verdict_calibration]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from defectlens.calibration import clopper_pearson  # noqa: E402
from defectlens.data.datasets import MVTecAD  # noqa: E402
from defectlens.detector import Detector  # noqa: E402

DATA = REPO.parent / "shared" / "data"
PIPED = ["PA_BDP01_TL", "PA_BFT01_TL", "PA_BRG01_RL", "PA_BRG02_RL", "PA_BRG03_TL", "PA_BTN01_RL", "PA_FLR01_TL",
         "PA_FLR02_TL", "PA_FVN01_TL", "PA_FVN02_RL", "PA_GLA01_TL", "PA_ZPB01_RL"]
SETTINGS = {
    "before": {"threshold_model": "quantile", "calibration_images": 40},
    "after": {"threshold_model": "tail", "calibration_images": None},
}


def categories() -> list[tuple[str, Path, int]]:
    return [("transistor", DATA / "mvtec_ad" / "transistor", 256)] + [(name, DATA / "piped" / name, 128) for name in PIPED]


def rates(verdicts: list[str], labels: np.ndarray) -> dict[str, Any]:
    good = [v for v, label in zip(verdicts, labels) if label == 0]
    bad = [v for v, label in zip(verdicts, labels) if label == 1]
    alarms, misses = sum(v == "NOT OK" for v in good), sum(v != "NOT OK" for v in bad)
    return {
        "false_alarm_rate": alarms / len(good), "false_alarm_interval": list(clopper_pearson(alarms, len(good))),
        "miss_rate": misses / len(bad), "miss_interval": list(clopper_pearson(misses, len(bad))),
        "review_good": sum(v == "REVIEW" for v in good) / len(good),
        "review_defective": sum(v == "REVIEW" for v in bad) / len(bad),
        "num_good": len(good), "num_defective": len(bad),
    }


def run_one(method: str, root: Path, size: int, setting: str, target: float, review: float | None) -> dict[str, Any]:
    dataset = MVTecAD(root)
    review_fpr = review if setting == "after" else None
    detector = Detector(method=method, image_size=size, target_fpr=target, review_fpr=review_fpr, **SETTINGS[setting])
    detector.fit(dataset.train_images())
    samples = dataset.test_samples()
    predictions = detector.predict_batch([sample.path for sample in samples])
    labels = np.asarray([sample.label for sample in samples])
    stated = detector.fit_info.calibration.get("threshold") or {}
    result = {"threshold": detector.threshold, "stated": stated, **rates([p.verdict for p in predictions], labels)}
    if stated:
        low, high = stated["fpr_interval"]
        # the promise a line relies on: no more false alarms than the stated upper bound
        result["observed_inside_stated"] = bool(result["false_alarm_rate"] <= high)
        result["intervals_overlap"] = bool(result["false_alarm_interval"][0] <= high)
    return result


def markdown(results: list[dict[str, Any]], target: float) -> str:
    lines = [f"Requested FPR {target:g}. Intervals are 95 % Clopper-Pearson.", "",
             "| category | method | before: FAR on test/good | before: miss rate | after: stated FPR (interval) | "
             "after: FAR on test/good | after: miss rate | after: REVIEW good / defective | FAR <= stated upper | "
             "intervals overlap |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(rate: float, interval: list[float]) -> str:
        return f"{rate:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"

    for row in results:
        before, after = row["before"], row["after"]
        stated = after["stated"]
        lines.append(
            f"| {row['category']} | {row['method']} | {cell(before['false_alarm_rate'], before['false_alarm_interval'])} | "
            f"{cell(before['miss_rate'], before['miss_interval'])} | "
            f"{stated['estimated_fpr']:.3g} [{stated['fpr_interval'][0]:.3f}, {stated['fpr_interval'][1]:.3f}] | "
            f"{cell(after['false_alarm_rate'], after['false_alarm_interval'])} | {cell(after['miss_rate'], after['miss_interval'])} | "
            f"{after['review_good']:.2f} / {after['review_defective']:.2f} | {'yes' if after['observed_inside_stated'] else 'NO'} | "
            f"{'yes' if after['intervals_overlap'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--review-fpr", type=float, default=0.05)
    parser.add_argument("--methods", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--categories", nargs="+", help="subset of category names")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "verdict_calibration"))
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from OUT/results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        for row in results:
            stated, after = row["after"]["stated"], row["after"]
            after["observed_inside_stated"] = after["false_alarm_rate"] <= stated["fpr_interval"][1]
            after["intervals_overlap"] = after["false_alarm_interval"][0] <= stated["fpr_interval"][1]
        print(markdown(results, args.target_fpr))
        return
    results = []
    for name, root, size in categories():
        if args.categories and name not in args.categories:
            continue
        for method in args.methods:
            row = {"category": name, "method": method}
            for setting in SETTINGS:
                row[setting] = run_one(method, root, size, setting, args.target_fpr, args.review_fpr)
            results.append(row)
            print(json.dumps({k: row[k] for k in ("category", "method")} | {
                s: {k: row[s][k] for k in ("false_alarm_rate", "miss_rate")} for s in SETTINGS}), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    table = markdown(results, args.target_fpr)
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
