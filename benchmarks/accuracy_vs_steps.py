"""Accuracy of trained methods against their training budget (steps), on one category.

For each method and each step budget: fit from scratch with ``max_steps`` = the budget (every
other option at its default), evaluate on the test set, record image AUROC, pixel AUROC,
AUPRO@0.3, image F1-max and the training minutes. Writes ``OUT/accuracy_vs_steps.json``,
``OUT/accuracy_vs_steps.md`` and ``OUT/accuracy_vs_steps.png`` (runs are appended to
``OUT/runs.jsonl`` first, so an interrupted run resumes).

    flock /tmp/defectlens-cpu.lock nice -n 5 .venv/bin/python benchmarks/accuracy_vs_steps.py \\
        --methods student_teacher reverse_distillation --budgets 125 250 500 1000 \\
        --out benchmarks/results/accuracy_vs_steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COLUMNS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro_0.3", "AUPRO@0.3"),
           ("image_f1", "image F1"), ("train_minutes", "train min"))


def run(method: str, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    from defectlens.data.datasets import MVTecAD
    from defectlens.detector import Detector
    from defectlens.evaluation import evaluate

    root = args.data_root / args.category
    detector = Detector(method=method, image_size=args.image_size, seed=args.seed, batch_size=16, max_steps=steps)
    started = time.perf_counter()
    detector.fit(root)
    fit_seconds = time.perf_counter() - started
    report = evaluate(detector, MVTecAD(root))
    return {
        "method": method, "steps": steps, "category": args.category, "seed": args.seed,
        "image_auroc": report["image"]["auroc"], "pixel_auroc": report["pixel"]["auroc"],
        "aupro_0.3": report["pixel"]["aupro"]["0.3"], "image_f1": report["image"]["f1_max"],
        "train_minutes": detector.fit_info.method["seconds"] / 60.0, "fit_minutes": fit_seconds / 60.0,
        "final_loss": detector.fit_info.method["final_loss"],
        "loss_history": detector.fit_info.method["loss_history"],
    }


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in sorted({r["method"] for r in results}):
        chosen = sorted((r for r in results if r["method"] == method), key=lambda r: r["steps"])
        steps = [r["steps"] for r in chosen]
        for axis, key in zip(axes, ("image_auroc", "pixel_auroc", "aupro_0.3")):
            axis.plot(steps, [r[key] for r in chosen], marker="o", label=method)
    for axis, (_, name) in zip(axes, COLUMNS):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("training steps (batch 8)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("DEFECTLENS_DATA") or REPO.parent / "shared" / "data"))
    parser.add_argument("--category", default="mvtec_ad/transistor")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["student_teacher", "reverse_distillation"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[125, 250, 500, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy_vs_steps")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    for method in args.methods:
        for steps in args.budgets:
            if any((r["method"], r["steps"], r["category"], r["seed"]) == (method, steps, args.category, args.seed) for r in done):
                continue
            result = run(method, steps, args)
            print(json.dumps({k: v for k, v in result.items() if k != "loss_history"}), flush=True)
            with log.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            done.append(result)
    chosen = [r for r in done if r["category"] == args.category and r["seed"] == args.seed and r["method"] in args.methods
              and r["steps"] in args.budgets]
    lines = [f"Accuracy vs training steps: {args.category} ({args.image_size} px), seed {args.seed}, batch 8, "
             "everything else at the defaults.\n", "| method | steps | " + " | ".join(n for _, n in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for r in sorted(chosen, key=lambda r: (r["method"], r["steps"])):
        lines.append(f"| {r['method']} | {r['steps']} | " + " | ".join(f"{r[k]:.3f}" if k != "train_minutes" else f"{r[k]:.1f}"
                                                                      for k, _ in COLUMNS) + " |")
    markdown = "\n".join(lines) + "\n"
    (args.out / "accuracy_vs_steps.md").write_text(markdown)
    (args.out / "accuracy_vs_steps.json").write_text(json.dumps(chosen, indent=2))
    plot(chosen, args.out / "accuracy_vs_steps.png", f"{args.category}: accuracy vs training steps")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
