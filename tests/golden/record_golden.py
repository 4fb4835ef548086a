"""Record the golden values of tests/unit/test_golden.py from the code as it stands.

Run once, before a refactor that must not change behaviour:
    .venv/bin/python tests/golden/record_golden.py
It fits each configuration of CONFIGS on a fixed subset of transistor with a fixed seed,
writes the per-image scores and the threshold to golden.json and the small model files to
this folder (they are committed: model files written by the old code must keep loading).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from tests.golden.golden_configs import CONFIGS, golden_test_images, golden_train_images  # noqa: E402


def main() -> None:
    from defectlens.detector import Detector

    results = {}
    for name, options in CONFIGS.items():
        detector = Detector(**options).fit(golden_train_images())
        scores = [prediction.score for prediction in detector.predict_batch(golden_test_images())]
        detector.save(HERE / f"{name}.dlens")
        results[name] = {"threshold": detector.threshold, "scores": scores}
        print(name, detector.threshold, scores[:3])
    (HERE / "golden.json").write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
