"""EfficientAD: accuracy against the training budget (steps) on one category, and the loss curves.

For each budget: fit from scratch with ``max_steps`` = the budget (every other option at its
default, the lr drop at 95 % of each budget), evaluate on the test set and record image AUROC,
pixel AUROC, AUPRO@0.3, image F1-max, the F1 at the model's own threshold, the training
minutes and the final training loss. Writes ``OUT/efficientad_budget.{json,md,png}`` (accuracy
per budget, and the running training loss of every budget); runs are appended to
``OUT/runs.jsonl`` first, so an interrupted run resumes.

    flock /tmp/defectlens-cpu.lock nice -n 5 .venv/bin/python benchmarks/efficientad_budget.py \\
        --budgets 250 500 1000 2000 --out benchmarks/results/efficientad_budget
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
           ("image_f1_max", "image F1-max"), ("image_f1_threshold", "image F1 @ own threshold"),
           ("train_minutes", "train min"), ("final_loss", "final loss"))


def run(steps: int, args: argparse.Namespace) -> dict[str, Any]:
    from defectlens.data.datasets import MVTecAD
    from defectlens.detector import Detector
    from defectlens.evaluation import evaluate

    root = args.data_root / args.category
    options = json.loads(args.options) if args.options else {}
    detector = Detector(method="efficientad", image_size=args.image_size, seed=args.seed, batch_size=16,
                        max_steps=steps, **options)
    started = time.perf_counter()
    detector.fit(root)
    fit_seconds = time.perf_counter() - started
    report = evaluate(detector, MVTecAD(root))
    summary = detector.fit_info.method
    return {
        "steps": steps, "category": args.category, "seed": args.seed, "options": options,
        "image_auroc": report["image"]["auroc"], "pixel_auroc": report["pixel"]["auroc"],
        "aupro_0.3": report["pixel"]["aupro"]["0.3"], "image_f1_max": report["image"]["f1_max"],
        "image_f1_threshold": report["image"]["at_threshold"]["f1"],
        "train_minutes": summary["seconds"] / 60.0, "fit_minutes": fit_seconds / 60.0,
        "final_loss": summary["final_loss"], "loss_history": summary["loss_history"],
        "ms_per_image": report["timing"]["ms_per_image"],
    }


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["steps"] for r in results]
    for key, name in COLUMNS[:5]:
        axes[0].plot(steps, [r[key] for r in results], marker="o", label=name)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("training steps (batch 1)")
    axes[0].set_ylabel("test metric")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    for result in results:
        history = result["loss_history"]
        axes[1].plot(history["step"], history["loss"], label=f"{result['steps']} steps")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("running training loss (L_hard + L_AE + L_STAE)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("DEFECTLENS_DATA") or REPO.parent / "shared" / "data"))
    parser.add_argument("--category", default="mvtec_ad/transistor")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--budgets", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--options", default="", help="other efficientad options as JSON, e.g. '{\"learning_rate\": 1e-3}'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "efficientad_budget")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    options = json.loads(args.options) if args.options else {}

    def key(r: dict[str, Any]) -> tuple:
        return r["steps"], r["category"], r["seed"], json.dumps(r.get("options", {}), sort_keys=True)

    for steps in args.budgets:
        wanted = (steps, args.category, args.seed, json.dumps(options, sort_keys=True))
        if any(key(r) == wanted for r in done):
            continue
        result = run(steps, args)
        print(json.dumps({k: v for k, v in result.items() if k != "loss_history"}), flush=True)
        with log.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        done.append(result)
    chosen = sorted((r for r in done if key(r)[1:] == (args.category, args.seed, json.dumps(options, sort_keys=True))
                     and r["steps"] in args.budgets), key=lambda r: r["steps"])
    lines = [f"EfficientAD-S accuracy vs training steps: {args.category} ({args.image_size} px), seed {args.seed}, "
             f"batch 1, options {options or 'default'}, {args.threads} threads.\n",
             "| steps | " + " | ".join(n for _, n in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for r in chosen:
        lines.append(f"| {r['steps']} | " + " | ".join(f"{r[k]:.1f}" if k == "train_minutes" else f"{r[k]:.3f}"
                                                    for k, _ in COLUMNS) + " |")
    markdown = "\n".join(lines) + "\n"
    (args.out / "efficientad_budget.md").write_text(markdown)
    (args.out / "efficientad_budget.json").write_text(json.dumps(chosen, indent=1))
    plot(chosen, args.out / "efficientad_budget.png", f"EfficientAD-S on {args.category}: accuracy vs training steps")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
