"""Fuzz a running inspection service with >= 1,000 hostile requests; count what came back.

    python benchmarks/service_fuzz.py [--model M.dlens] [--clients 4] [--json out.json]

Starts `defectlens serve` (default limits, SQLite log in a temporary folder; without --model a
tiny PatchCore is fitted on the offline brick data set first) and sends, from --clients
parallel keep-alive connections:

- every file of the hostile corpus (benchmarks/hostile_corpus.py: >= 1,000 files - random
  bytes behind magic numbers, truncations, corrupt chunks, decompression bombs in PNG / TIFF /
  JPEG / GIF / WebP / BMP, NaN / inf float TIFFs, 16-bit, palette, CMYK, multi-page, odd
  formats, mutations) under its upload name;
- the corpus's hostile file names (path traversal, NUL, CR/LF, bidi overrides, lone
  surrogates, ...) with a valid image, sent as raw UTF-8 bytes;
- near-limit valid images (about 16 megapixels: PNG, JPEG, float32 TIFF), inspected for real;
- bad model names and thresholds, and hostile GET parameters (huge offsets, long ids, odd dates).

Counts 2xx / 4xx / 5xx, hangs (no answer within --timeout s), dropped connections (the client
saw a reset or a protocol error), answers that leak (exception names, SQL, server paths, long
bodies) or lack the security headers; checks that the log holds exactly one row per 200; and
samples the server's RSS every 50 ms (peak, and the kernel's VmHWM). Exit code 0 when the
targets hold: 0 5xx, 0 hangs, 0 dropped, 0 leaks, rows = accepted, peak RSS < --max-rss-mb.
"""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.service.conftest import ServerProcess, db_rows  # noqa: E402
from tests.service.fuzzing import build_hostile_corpus, multipart, problems  # noqa: E402

BAD_MODELS = ["", " ", "nope", "../bricks", "bricks\x00", "bricks\n", "BRICKS", "a" * 1000, "'; DROP TABLE inspections;--",
              "%00", "\u202ebricks", "bricks/../bricks", "{{7*7}}", "null", "[]", "\ud800"]
BAD_THRESHOLDS = ["nan", "NaN", "inf", "-inf", "-1", "-0.0001", "1e309", "abc", "0x1p3", "1" * 500, "None", "[]", "1,5",
                  "\x00", "1e-400", " 3 ", "+5", "٣"]
GET_ABUSE = [
    ("/v1/inspections", {"offset": "9223372036854775808"}), ("/v1/inspections", {"offset": "-1"}),
    ("/v1/inspections", {"offset": "1e3"}), ("/v1/inspections", {"limit": "99999999999999999999"}),
    ("/v1/inspections", {"limit": "0"}), ("/v1/inspections", {"since": "0001-01-01T00:00:00+01:00"}),
    ("/v1/inspections", {"until": "9999-12-31T23:59:59-01:00"}), ("/v1/inspections", {"since": "2024-02-30"}),
    ("/v1/inspections", {"since": "x" * 5000}), ("/v1/inspections", {"model": "\x00"}),
    ("/v1/inspections", {"model": "a" * 5000}), ("/v1/inspections", {"verdict": "maybe"}),
    ("/v1/inspections", {"is_anomalous": "perhaps"}), ("/v1/inspections", {"verdict": "ok", "is_anomalous": "true"}),
    ("/v1/inspections/" + "x" * 8000, {}), ("/v1/inspections/..%2F..%2Fetc%2Fpasswd", {}),
    ("/v1/inspections/%00", {}), ("/v1/inspections/" + "0" * 32, {}), ("/v1/inspections/" + "0" * 32 + "/image.png", {}),
    ("/v1/inspections/nope/heatmap.png", {"threshold": "nan"}), ("/v1/models", {"x": "y" * 3000}),
    ("/v1/monitor", {"window": "99999999999999999999"}), ("/v1/monitor", {"window": "-5"}),
    ("/v1/monitor", {"model": "\x00"}), ("/v1/monitor", {"model": "a" * 5000}),
    ("/v1/inspections/" + "0" * 32 + "/reviews", {}), ("/v1/inspections/" + "x" * 8000 + "/reviews", {}),
    ("/v1/inspections", {"verdict": "REVIEW", "is_anomalous": "true"}),
    ("/health", {"verbose": "1"}), ("/static/../../../../etc/passwd", {}), ("/static/%2e%2e/%2e%2e/etc/passwd", {}),
    ("/docs", {}), ("/openapi.json", {}), ("/nope", {}),
]


def near_limit_images() -> list[tuple[str, bytes]]:
    """Valid images just under the default 16-megapixel limit (inspected for real)."""
    import tifffile
    from PIL import Image

    side = 3990
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))], -1)
    rgb = rgb.astype(np.uint8)
    files = []
    for fmt, name in (("PNG", "big.png"), ("JPEG", "big.jpg")):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, fmt)
        files.append((name, buffer.getvalue()))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (rgb[:, :, 0] / 255.0).astype(np.float32), compression="zlib")
    files.append(("big_float.tif", buffer.getvalue()))
    return files


def fit_tiny_model(workdir: Path) -> Path:
    from defectlens.demo import build_demo_dataset
    from defectlens.detector import Detector

    root = build_demo_dataset(workdir / "bricks", train_count=12, test_good=2, per_kind=1)
    images = sorted((root / "train" / "good").glob("*.png"))
    path = workdir / "bricks.dlens"
    Detector(method="patchcore", image_size=64, coreset_ratio=0.1, calibration_images=20).fit(images).save(path)
    return path


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.stop = pid, 0, threading.Event()

    def read(self, field: str) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_kib = max(self.peak_kib, self.read("VmRSS"))
            time.sleep(0.05)


def build_requests(corpus_dir: Path, manifest: dict, valid: bytes) -> list[dict]:
    requests = []
    for entry in manifest["entries"]:
        requests.append({"kind": f"corpus:{entry['category']}", "name": entry["upload_name"],
                         "content": (corpus_dir / entry["file"]).read_bytes(), "fields": {}})
    for hostile in manifest["hostile_filenames"]:
        requests.append({"kind": "filename", "name": hostile["name"], "content": valid, "fields": {}})
    for name, data in near_limit_images():
        requests.append({"kind": "near_limit", "name": name, "content": data, "fields": {}})
    for model, threshold in itertools.product(BAD_MODELS, [None, "0.5"]):
        requests.append({"kind": "bad_model", "name": "part.png", "content": valid, "fields": {"model": model,
                                                                                         "threshold": threshold}})
    for threshold in BAD_THRESHOLDS:
        requests.append({"kind": "bad_threshold", "name": "part.png", "content": valid, "fields": {"threshold": threshold}})
    requests.append({"kind": "no_file", "name": None, "content": None, "fields": {"image": "text, not a file"}})
    requests.append({"kind": "wrong_field", "name": "a.png", "content": valid, "fields": {}, "field": "file"})
    for path, params in GET_ABUSE:
        requests.append({"kind": "get", "path": path, "params": params})
    return requests


def send(client: httpx.Client, request: dict) -> httpx.Response:
    if request["kind"] == "get":
        return client.get(request["path"], params=request["params"])
    body, content_type = multipart(request["fields"], request["name"], request["content"], request.get("field", "image"))
    return client.post("/v1/inspect", content=body, headers={"Content-Type": content_type})


def run(url: str, requests: list[dict], clients: int, timeout: float) -> dict:
    queue = list(enumerate(requests))
    lock = threading.Lock()
    outcomes: list[dict] = [{} for _ in requests]

    def worker() -> None:
        client = httpx.Client(base_url=url, timeout=timeout)
        while True:
            with lock:
                if not queue:
                    break
                index, request = queue.pop()
            started = time.perf_counter()
            try:
                response = send(client, request)
                sent = tuple(str(v) for v in (request.get("name"), *request.get("fields", {}).values(),
                                               *request.get("params", {}).values()) if v)
                outcome = {"status": response.status_code, "problems": problems(
                    response.status_code, response.headers, response.text, sent)}
            except httpx.TimeoutException:
                outcome = {"status": "hang", "problems": ["no answer"]}
                client.close()
                client = httpx.Client(base_url=url, timeout=timeout)
            except httpx.TransportError as error:
                outcome = {"status": "dropped", "problems": [f"{type(error).__name__}: {error}"[:200]]}
                client.close()
                client = httpx.Client(base_url=url, timeout=timeout)
            outcome.update(kind=request["kind"], seconds=time.perf_counter() - started,
                           name=str(request.get("name") or request.get("path"))[:80])
            outcomes[index] = outcome
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"outcomes": outcomes, "wall_s": time.perf_counter() - started}


def summarize(outcomes: list[dict]) -> dict:
    classes = collections.Counter()
    per_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        status = outcome["status"]
        label = status if isinstance(status, str) else f"{status // 100}xx"
        classes[label] += 1
        per_kind[outcome["kind"].split(":")[0]][str(status)] += 1
    return {"classes": dict(classes), "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file to serve (default: fit a tiny PatchCore on the brick data set)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds without an answer that count as a hang")
    parser.add_argument("--seed", type=int, default=0, help="hostile corpus seed")
    parser.add_argument("--max-rss-mb", type=float, default=1536.0, help="peak server RSS target (MiB)")
    parser.add_argument("--workdir", help="keep the corpus, store and log here (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument, repeatable")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="defectlens-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest = build_hostile_corpus(workdir / "corpus", seed=args.seed)
    model = Path(args.model) if args.model else fit_tiny_model(workdir)
    valid = next((workdir / "corpus" / e["file"]).read_bytes() for e in manifest["entries"] if e["description"] == "png_rgb")
    requests = build_requests(workdir / "corpus", manifest, valid)
    print(f"{len(requests)} requests ({manifest['files']} corpus files) prepared in {time.perf_counter() - started:.0f} s")

    server = ServerProcess([str(model)], workdir / "server", extra=["--no-access-log", *args.serve_arg]).start(timeout=300)
    sampler = RssSampler(server.process.pid)
    sampler.start()
    try:
        rss_start = sampler.read("VmRSS")
        result = run(server.url, requests, args.clients, args.timeout)
        alive = httpx.get(f"{server.url}/health", timeout=30).status_code
        hwm = sampler.read("VmHWM")
    finally:
        sampler.stop.set()
        server.stop()
    outcomes = result["outcomes"]
    accepted = sum(1 for o, r in zip(outcomes, requests) if r["kind"] != "get" and o["status"] == 200)
    rows = len(db_rows(server.db_url))
    summary = summarize(outcomes)
    flawed = [o for o in outcomes if o["problems"]]
    slowest = sorted(outcomes, key=lambda o: o["seconds"], reverse=True)[:5]
    peak_mib = max(sampler.peak_kib, hwm) / 1024

    print(f"{len(outcomes)} requests from {args.clients} clients in {result['wall_s']:.0f} s; server healthy after: {alive}")
    print("answers: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["classes"].items())))
    for kind, counts in summary["per_kind"].items():
        print(f"  {kind:14s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"accepted inspections {accepted}, rows in the log {rows}")
    print(f"server RSS: {rss_start / 1024:.0f} MiB after start, peak {peak_mib:.0f} MiB (sampled every 50 ms and VmHWM)")
    print("slowest: " + "; ".join(f"{o['name']} {o['status']} {o['seconds']:.1f} s" for o in slowest))
    for outcome in flawed[:20]:
        print(f"  PROBLEM {outcome['kind']} {outcome['name']!r}: {outcome['problems']}")
    classes = summary["classes"]
    ok = (not classes.get("5xx") and not classes.get("hang") and not classes.get("dropped") and not flawed
          and rows == accepted and peak_mib < args.max_rss_mb and alive == 200 and len(outcomes) >= 1000)
    if args.json:
        document = {"requests": len(outcomes), "clients": args.clients, "wall_s": result["wall_s"], **summary,
                    "accepted": accepted, "rows": rows, "problems": len(flawed), "peak_rss_mib": peak_mib,
                    "rss_after_start_mib": rss_start / 1024, "targets_met": ok, "cpus": os.cpu_count()}
        Path(args.json).write_text(json.dumps(document, indent=2))
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
