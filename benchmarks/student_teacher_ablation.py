"""The student-teacher study's ablation (its Table 2) on our data, few-shot.

Rows are cumulative, as in the study: vanilla (plain mean cosine loss, no augmentation, no
corruption), + hard-case loss, + rotation, + brightness/contrast, + latent noise, + stained-shape
noise, + transfer noise. Each added setting takes the method's default value (read from
`StudentTeacher`'s signature, so the table follows the defaults). Transfer noise comes from the
other PIPED classes (for a PIPED class) or from all PIPED classes (for transistor) - never from
the category being evaluated.

Few-shot: per (category, seed) ``--shots`` training images (5) plus one more held out for the
map quantiles (Eq. 3; they do not change AUROC or F1-max) are drawn from train/good; the full
test set is evaluated. Columns: pixel AUROC, pixel F1 (F1-max over all pixels), image AUROC,
image F1 (F1-max). Results go to ``OUT/runs.jsonl`` (one line per run, appended, so an
interrupted benchmark resumes), ``OUT/ablation.json`` and ``OUT/ablation.md``.

    flock /tmp/defectlens-cpu.lock nice -n 5 .venv/bin/python benchmarks/student_teacher_ablation.py \\
        --seeds 0 1 --out benchmarks/results/student_teacher_ablation
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = (("pixel_auroc", "pixel AUROC"), ("pixel_f1", "pixel F1"), ("image_auroc", "image AUROC"), ("image_f1", "image F1"))


def default_data_root() -> Path:
    return Path(os.environ.get("DEFECTLENS_DATA") or REPO.parent / "shared" / "data")


def rows(transfer_from: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The cumulative rows: (label, StudentTeacher options)."""
    from defectlens.methods.student_teacher import StudentTeacher

    default = {name: p.default for name, p in inspect.signature(StudentTeacher.__init__).parameters.items()}
    options: dict[str, Any] = dict(hard_quantile=0.0, rotation_degrees=0.0, brightness=0.0, contrast=0.0,
                                   latent_noise_std=0.0, stain_probability=0.0, transfer_from=None)
    steps = [
        ("vanilla", {}),
        ("+ hard-case loss", {"hard_quantile": default["hard_quantile"]}),
        ("+ rotation", {"rotation_degrees": default["rotation_degrees"]}),
        ("+ brightness/contrast", {"brightness": default["brightness"], "contrast": default["contrast"]}),
        ("+ latent noise", {"latent_noise_std": default["latent_noise_std"]}),
        ("+ stained-shape noise", {"stain_probability": default["stain_probability"]}),
        ("+ transfer noise", {"transfer_from": transfer_from}),
    ]
    cumulative = []
    for label, change in steps:
        options = {**options, **change}
        cumulative.append((label, dict(options)))
    return cumulative


def transfer_folders(data_root: Path, category: str) -> list[str]:
    """Other products for transfer noise: every PIPED class but the evaluated one."""
    piped = data_root / "piped"
    return [str(path) for path in sorted(piped.iterdir()) if path.is_dir() and (path / "test").is_dir()
            and path.name != Path(category).name]


def few_shot(root: Path, shots: int, seed: int) -> list[Path]:
    """``shots + 1`` training images drawn with ``seed`` (the last one is held out for the quantiles)."""
    from defectlens.data.datasets import training_images

    images = training_images(root)
    chosen = np.random.default_rng([seed, 42]).permutation(len(images))[: shots + 1]
    return [images[k] for k in sorted(chosen.tolist())]


def run(category: str, size: int, label: str, options: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from defectlens.data.datasets import MVTecAD
    from defectlens.detector import Detector
    from defectlens.evaluation import evaluate

    root = args.data_root / category
    images = few_shot(root, args.shots, seed)
    detector = Detector(method="student_teacher", image_size=size, seed=seed, calibration_split=1.0 / len(images),
                        max_steps=args.max_steps, **options)
    started = time.perf_counter()
    detector.fit(images)
    fit_seconds = time.perf_counter() - started
    report = evaluate(detector, MVTecAD(root))
    return {
        "category": category, "row": label, "seed": seed, "shots": args.shots, "max_steps": args.max_steps,
        "held_out": detector.fit_info.calibration.get("num_scores"),
        "pixel_auroc": report["pixel"]["auroc"], "pixel_f1": report["pixel"]["f1_max"],
        "image_auroc": report["image"]["auroc"], "image_f1": report["image"]["f1_max"],
        "fit_seconds": fit_seconds, "final_loss": detector.fit_info.method["final_loss"],
        "options": {key: value for key, value in options.items() if key != "transfer_from"},
        "transfer_from": len(options.get("transfer_from") or []),
    }


def table(results: list[dict[str, Any]], labels: list[str], categories: list[str]) -> tuple[str, dict[str, Any]]:
    """Markdown table (mean over seeds per category, then the mean over categories) + its data."""
    summary: dict[str, Any] = {}
    lines = []
    for category in [*categories, "mean"]:
        lines += [f"\n**{category}**\n", "| row | " + " | ".join(name for _, name in METRICS) + " | seeds |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        previous = None
        for label in labels:
            chosen = [r for r in results if r["row"] == label and (category == "mean" or r["category"] == category)]
            if category == "mean":  # mean over categories of each seed's value
                seeds = sorted({r["seed"] for r in chosen})
                per_seed = [[r for r in chosen if r["seed"] == s] for s in seeds]
                values = {key: [float(np.mean([r[key] for r in group])) for group in per_seed if len(group) == len(categories)]
                          for key, _ in METRICS}
            else:
                values = {key: [r[key] for r in chosen] for key, _ in METRICS}
            means = {key: float(np.mean(v)) if v else None for key, v in values.items()}
            summary.setdefault(category, {})[label] = {**means, "seeds": len(values["image_auroc"])}
            cells = []
            for key, _ in METRICS:
                mean = means[key]
                text = "-" if mean is None else f"{mean:.3f}"
                if mean is not None and len(values[key]) > 1:
                    text += f" ± {np.std(values[key]):.3f}"
                if previous is not None and mean is not None and previous[key] is not None:
                    text += f" ({mean - previous[key]:+.3f})"
                cells.append(text)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(values['image_auroc'])} |")
            previous = means
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--categories", nargs="+", default=["mvtec_ad/transistor", "piped/PA_BRG01_RL", "piped/PA_FVN01_TL"])
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--rows", type=int, nargs="+", help="only these row numbers (0 = vanilla)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "student_teacher_ablation")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    key = lambda r: (r["category"], r["row"], r["seed"], r["shots"], r["max_steps"])  # noqa: E731
    finished = {key(r) for r in done}
    labels: list[str] = []
    for category in args.categories:
        size = 256 if category.startswith("mvtec") else 128
        for number, (label, options) in enumerate(rows(transfer_folders(args.data_root, category))):
            if label not in labels:
                labels.append(label)
            if args.rows and number not in args.rows:
                continue
            for seed in args.seeds:
                if (category, label, seed, args.shots, args.max_steps) in finished:
                    continue
                result = run(category, size, label, options, seed, args)
                print(json.dumps({k: v for k, v in result.items() if k != "options"}), flush=True)
                with log.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
                done.append(result)
    chosen = [r for r in done if r["shots"] == args.shots and r["max_steps"] == args.max_steps
              and r["category"] in args.categories and r["seed"] in args.seeds]
    markdown, summary = table(chosen, labels, args.categories)
    header = (f"Student-teacher ablation, {args.shots}-shot (+1 held-out image for the quantiles), {args.max_steps} steps, "
              f"seeds {args.seeds}; mean (± std over seeds) and the change from the row above.\n")
    (args.out / "ablation.md").write_text(header + markdown)
    (args.out / "ablation.json").write_text(json.dumps({"settings": {"shots": args.shots, "max_steps": args.max_steps,
                                                                     "seeds": args.seeds, "categories": args.categories},
                                                        "summary": summary, "runs": chosen}, indent=2))
    print(header + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
