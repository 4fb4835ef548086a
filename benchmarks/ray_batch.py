"""Batch inspection on a local two-node Ray cluster: throughput with 1 and 2 workers, peak
memory per worker, the count check, a worker SIGKILLed mid-job, and per-image costs.

    .venv/bin/python benchmarks/ray_make_images.py --count 5000 --out /tmp/defectlens-ray-images
    flock /tmp/defectlens-cpu.lock nice -n 5 .venv/bin/python benchmarks/ray_batch.py \\
        --images /tmp/defectlens-ray-images --out /tmp/defectlens-ray-batch

The model (fitted first if ``--model`` does not exist): PatchCore, coreset ratio 0.01, 256 px,
on transistor train/good. The cluster: `LocalCluster` (head + 1 worker node, 1 CPU each).
The kill test runs the command line (`defectlens predict --ray ADDRESS`) and SIGKILLs one
``ray::InspectionWorker`` process once a quarter of the rows are written. Results: a JSON
summary in OUT/summary.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from defectlens import distributed
from defectlens.data.datasets import list_images
from defectlens.detector import Detector
from defectlens.distributed.cluster import LocalCluster
from defectlens.outputs import ResultsWriter


def fit_model(path: Path, data: Path) -> None:
    torch.set_num_threads(2)
    detector = Detector(method="patchcore", coreset_ratio=0.01, image_size=256, seed=0)
    detector.fit(data / "train" / "good").save(path)


def per_image_costs(model: Path, paths: list[Path], count: int) -> dict[str, float]:
    """Milliseconds per image on one thread: decode + ROI, backbone, memory-bank search, map
    chain + verdict (the rest of `iter_predictions`), rendering + writing the PNGs."""
    torch.set_num_threads(1)
    detector = Detector.load(model)
    chosen = [path for path in paths if "broken" not in path.name][:count]
    detector.predict_batch(chosen[: detector.batch_size])  # warm up
    timings = collections.Counter()
    for start in range(0, len(chosen), detector.batch_size):
        chunk = chosen[start : start + detector.batch_size]
        tick = time.perf_counter()
        prepared = [detector.preparation.prepare(path, index)[0] for index, path in enumerate(chunk)]
        timings["decode"] += time.perf_counter() - tick
        tick = time.perf_counter()
        features = detector.encode(prepared)
        timings["backbone"] += time.perf_counter() - tick
        tick = time.perf_counter()
        detector.method.patch_scores(features)
        timings["search"] += time.perf_counter() - tick
        tick = time.perf_counter()
        predictions = detector.predict_batch(chunk)
        timings["predict_total"] += time.perf_counter() - tick
        with tempfile.TemporaryDirectory() as folder, ResultsWriter(folder) as writer:
            tick = time.perf_counter()
            for path, prediction in zip(chunk, predictions):
                writer.write(path.stem, prediction)
            timings["render_write"] += time.perf_counter() - tick
    costs = {name: 1e3 * seconds / len(chosen) for name, seconds in timings.items()}
    costs["chain_verdict"] = costs["predict_total"] - costs["decode"] - costs["backbone"] - costs["search"]
    costs["total"] = costs["predict_total"] + costs["render_write"]
    return costs


def count_check(results: Path, paths: list[Path]) -> dict[str, int]:
    rows = [json.loads(line)["path"] for line in results.read_text(encoding="utf-8").splitlines()]
    counts = collections.Counter(rows)
    expected = {str(path) for path in paths}
    return {
        "inputs": len(paths), "rows": len(rows), "distinct": len(counts),
        "missing": len(expected - set(counts)), "duplicates": sum(1 for value in counts.values() if value > 1),
        "foreign": len(set(counts) - expected),
    }


def batch_run(model: Path, paths: list[Path], out: Path, workers: int) -> dict[str, object]:
    summary = distributed.predict(model, paths, out, workers=workers)
    return {
        "workers": workers, "seconds": round(summary.seconds, 1), "images_per_second": round(len(paths) / summary.seconds, 2),
        "inspected": summary.inspected, "failed": summary.failed,
        "peak_rss_megabytes_per_worker": [round(value) for value in summary.worker_peak_rss_megabytes],
        "count_check": count_check(out / "results.jsonl", paths),
    }


def kill_run(cluster: LocalCluster, model: Path, images: Path, paths: list[Path], out: Path) -> dict[str, object]:
    command = [sys.executable, "-m", "defectlens.cli", "predict", "--model", str(model), str(images), "--out", str(out),
               "--ray", cluster.address, "-q"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results, killed, rows_at_kill = out / "results.jsonl", None, 0
    while process.poll() is None:
        time.sleep(0.5)
        rows = results.read_text(encoding="utf-8").count("\n") if results.is_file() else 0
        if killed is None and rows >= len(paths) // 4:
            workers = [pid for pid, command_line in cluster.node_processes() if command_line.startswith("ray::InspectionWorker")]
            if workers:
                killed, rows_at_kill = workers[0], rows
                os.kill(killed, signal.SIGKILL)
    stdout, stderr = process.communicate()
    return {
        "exit_code": process.returncode, "seconds": round(time.perf_counter() - started, 1), "killed_pid": killed,
        "rows_when_killed": rows_at_kill, "killed_pid_still_running": bool(killed and Path(f"/proc/{killed}").exists()),
        "stdout": stdout.strip().splitlines()[-1:], "reported_errors": stderr.count("error: cannot read image"),
        "count_check": count_check(results, paths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="/tmp/defectlens-ray-images")
    parser.add_argument("--data", default="../shared/data/mvtec_ad/transistor")
    parser.add_argument("--model", default="/tmp/defectlens-ray-patchcore.dlens")
    parser.add_argument("--out", default="/tmp/defectlens-ray-batch")
    parser.add_argument("--workers", default="1,2", help="worker counts to time (empty: only the kill test)")
    parser.add_argument("--cost-images", type=int, default=64, help="images of the per-image cost measurement")
    args = parser.parse_args()
    model, out = Path(args.model), Path(args.out)
    if not model.is_file():
        fit_model(model, Path(args.data))
    paths = list_images(Path(args.images))
    summary: dict[str, object] = {"images": len(paths), "model": str(model), "cpu_count": os.cpu_count()}
    summary["per_image_ms_one_thread"] = {k: round(v, 2) for k, v in per_image_costs(model, paths, args.cost_images).items()}
    print(json.dumps(summary, indent=1), flush=True)
    cluster = LocalCluster(nodes=2, cpus_per_node=1, object_store_megabytes=200, temp_dir=out / "ray")
    cluster.start()
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        for workers in [int(value) for value in args.workers.split(",") if value]:
            summary[f"workers_{workers}"] = batch_run(model, paths, out / f"workers_{workers}", workers)
            print(json.dumps(summary[f"workers_{workers}"]), flush=True)
        summary["kill_test"] = kill_run(cluster, model, Path(args.images), paths, out / "kill")
        print(json.dumps(summary["kill_test"]), flush=True)
    finally:
        ray.shutdown()
        cluster.stop()
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print("\n| run | workers | images/s | peak RSS per worker (MB) | rows | missing | duplicates |")
    print("|---|---|---|---|---|---|---|")
    for key, run in summary.items():
        if isinstance(run, dict) and "count_check" in run:
            check = run["count_check"]
            print(f"| {key} | {run.get('workers', 2)} | {run.get('images_per_second', '-')} | "
                  f"{run.get('peak_rss_megabytes_per_worker', '-')} | {check['rows']} | {check['missing']} | {check['duplicates']} |")


if __name__ == "__main__":
    main()
