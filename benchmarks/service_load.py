"""Load test of the inspection service: N requests from K parallel clients on 127.0.0.1.

Starts `defectlens serve` (as `python -m defectlens.service.cli`) on a free port with a fresh
database and store, fires the requests from K threads (one httpx client each), then checks
that every request succeeded and that the database holds exactly one row per request, each
with its files on disk. Prints throughput and client-side latency percentiles.

    python benchmarks/service_load.py --model transistor.dlens \
        --images /path/to/mvtec_ad/transistor/test --requests 200 --clients 8

`--url` points it at a running server instead (then the database is not checked).
Exit code 0 when there were no errors and the row count matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def collect_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
    return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(models: list[str], workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str, Path, Path]:
    port = free_port()
    db = workdir / "inspections.db"
    store = workdir / "store"
    command = [sys.executable, "-m", "defectlens.service.cli", "--host", "127.0.0.1", "--port", str(port),
               "--db", f"sqlite:///{db}", "--store", str(store), "--log-level", "warning", "--no-access-log", *extra]
    for model in models:
        command += ["--model", model]
    log = open(workdir / "server.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}):\n{(workdir / 'server.log').read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, db, store
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("server did not start within 180 s")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_load(url: str, images: list[tuple[str, bytes]], requests: int, clients: int, model: str | None) -> dict:
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    server_ms: list[float] = []
    ids: list[str] = []
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while True:
                with lock:
                    index = next(counter)
                if index >= requests:
                    return
                name, data = images[index % len(images)]
                fields = {"model": model} if model else {}
                started = time.perf_counter()
                try:
                    response = client.post("/v1/inspect", files={"image": (name, data, "image/png")}, data=fields)
                except httpx.HTTPError as error:
                    with lock:
                        errors.append(f"{name}: {error.__class__.__name__}: {error}")
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        body = response.json()
                        latencies.append(elapsed)
                        server_ms.append(body["latency_ms"])
                        ids.append(body["id"])
                    else:
                        errors.append(f"{name}: HTTP {response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "requests": requests,
        "clients": clients,
        "ok": len(ids),
        "errors": errors,
        "wall_s": wall,
        "throughput_img_s": len(ids) / wall if wall else float("nan"),
        "latency_ms": {
            "p50": 1000 * percentile(latencies, 50),
            "p95": 1000 * percentile(latencies, 95),
            "p99": 1000 * percentile(latencies, 99),
            "max": 1000 * max(latencies, default=float("nan")),
            "mean": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
        },
        "server_latency_ms": {"p50": percentile(server_ms, 50), "p95": percentile(server_ms, 95)},
        "ids": ids,
    }


def check_log(db: Path, store: Path, ids: list[str]) -> tuple[int, list[str]]:
    connection = sqlite3.connect(db)
    try:
        rows = connection.execute("SELECT id, image_path, heatmap_path, mask_path, map_path FROM inspections").fetchall()
    finally:
        connection.close()
    problems = []
    by_id = {row[0]: row[1:] for row in rows}
    for inspection_id in ids:
        if inspection_id not in by_id:
            problems.append(f"{inspection_id}: acknowledged but not in the database")
            continue
        for relative in by_id[inspection_id]:
            if not (store / relative).is_file():
                problems.append(f"{inspection_id}: file {relative} missing")
    return len(rows), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="[NAME=]MODEL for the server (repeatable)")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders (searched recursively)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--use-model", help="model name sent with each request (default: the server's default)")
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--workdir", help="database and store of the started server (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    files = collect_images(args.images)
    if not files:
        parser.error("no images found")
    images = [(f"{path.parent.name}_{path.name}", path.read_bytes()) for path in files]

    process = None
    db = store = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        if not args.model:
            parser.error("give --model (or --url of a running server)")
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="defectlens-load-"))
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        process, url, db, store = start_server(args.model, workdir, [])
        print(f"server up in {time.perf_counter() - started:.1f} s at {url} (db {db})")
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        chosen = args.use_model or models["default"]
        info = next(item for item in models["items"] if item["name"] == chosen)
        print(f"model {chosen}: {info['method']} {info['backbone']} {info['image_size']} px; "
              f"{len(images)} distinct images; {args.requests} requests from {args.clients} clients")
        results = run_load(url, images, args.requests, args.clients, args.use_model)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)

    rows, problems = (None, [])
    if db is not None:
        rows, problems = check_log(db, store, results["ids"])
        expected = health["inspections"] + args.requests
        if rows != expected:
            problems.append(f"the database holds {rows} rows, expected {expected}")
    latency = results["latency_ms"]
    print(f"{results['ok']}/{args.requests} ok, {len(results['errors'])} errors, "
          f"{rows if rows is not None else 'unchecked'} rows in the database")
    print(f"throughput {results['throughput_img_s']:.2f} images/s over {results['wall_s']:.1f} s")
    print(f"client latency p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms, p99 {latency['p99']:.0f} ms, "
          f"max {latency['max']:.0f} ms")
    print(f"server latency_ms p50 {results['server_latency_ms']['p50']:.0f}, p95 {results['server_latency_ms']['p95']:.0f}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for line in (results["errors"] + problems)[:20]:
        print(f"  problem: {line}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        document = {key: value for key, value in results.items() if key != "ids"}
        document.update(rows=rows, problems=problems, model=info, images=len(images), cpus=os.cpu_count())
        Path(args.json).write_text(json.dumps(document, indent=2), encoding="utf-8")
    return 0 if not results["errors"] and not problems and results["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
