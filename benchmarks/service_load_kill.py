"""Load + kill: N inspections from K clients while the server is SIGKILLed and restarted; then
check that the log holds each accepted inspection exactly once, with its files readable.

    python benchmarks/service_load_kill.py --backend postgres --requests 240 --clients 8
    python benchmarks/service_load_kill.py --backend both --model transistor.dlens --images DIR

Backends: ``postgres`` (a private cluster from Debian's PostgreSQL on 127.0.0.1, or --db URL),
``sqlite`` (a WAL file), ``both``. Each request carries its own ``Idempotency-Key``; a client
whose request died with the server (connection reset, 5xx) retries it with the same key once the
server is back, as a careful client would. The server is killed (SIGKILL, no shutdown) after
--kill-at of the requests were acknowledged, and started again on the same database and store.

Checked at the end: every request acknowledged (N accepted), rows in the log = N, no request
key or id twice, every acknowledged id in the log under its key, every stored file present,
named by its SHA-256 and (pictures) a decodable PNG. With --no-idempotency-key the requests
carry no key: then rows may exceed the acknowledged count by the inspections committed just
before the kill whose answer was lost - the count is reported. Exit code 0 when all checks hold.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.service.conftest import ServerProcess, db_rows  # noqa: E402
from tests.service.postgres import PrivateCluster  # noqa: E402


def load_images(folder: str | None, workdir: Path) -> list[tuple[str, bytes]]:
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif"))
    else:
        from defectlens.demo import build_demo_dataset

        root = build_demo_dataset(workdir / "bricks-test", train_count=2, test_good=4, per_kind=2)
        files = sorted((root / "test").rglob("*.png"))
    if not files:
        raise SystemExit("no images found")
    return [(f"{path.parent.name}_{path.name}", path.read_bytes()) for path in files]


def fit_tiny_model(workdir: Path) -> Path:
    from defectlens.demo import build_demo_dataset
    from defectlens.detector import Detector

    root = build_demo_dataset(workdir / "bricks", train_count=12, test_good=2, per_kind=1)
    path = workdir / "bricks.dlens"
    Detector(method="patchcore", image_size=64, coreset_ratio=0.1, calibration_images=20).fit(
        sorted((root / "train" / "good").glob("*.png"))).save(path)
    return path


class Load:
    """K client threads working through N requests; retries until acknowledged or the deadline."""

    def __init__(self, server: ServerProcess, images: list[tuple[str, bytes]], requests: int, clients: int,
                 keys: bool, deadline_s: float) -> None:
        self.server, self.images, self.clients, self.keys = server, images, clients, keys
        self.pending = list(range(requests))
        self.lock = threading.Lock()
        self.acknowledged: dict[int, tuple[str, str | None]] = {}  # request -> (id, key)
        self.request_keys = {index: uuid.uuid4().hex if keys else None for index in range(requests)}
        self.failures = 0  # attempts that died (reset, refused, 5xx) and were retried
        self.deadline = time.monotonic() + deadline_s

    def worker(self) -> None:
        client = httpx.Client(base_url=self.server.url, timeout=60)
        while time.monotonic() < self.deadline:
            with self.lock:
                if not self.pending:
                    break
                index = self.pending.pop(0)
            name, data = self.images[index % len(self.images)]
            key = self.request_keys[index]
            try:
                response = client.post("/v1/inspect", files={"image": (name, data, "image/png")},
                                       headers={"Idempotency-Key": key} if key else None)
                done = response.status_code == 200
            except httpx.HTTPError:
                done = False
                client.close()
                client = httpx.Client(base_url=self.server.url, timeout=60)
            with self.lock:
                if done:
                    self.acknowledged[index] = (response.json()["id"], key)
                else:
                    self.failures += 1
                    if self.keys:
                        self.pending.append(index)  # retried later with the same key
            if not done:
                time.sleep(0.3)
        client.close()


def check_store(server: ServerProcess, load: Load, requests: int) -> dict:
    rows = db_rows(server.db_url)
    ids = [value[0] for value in load.acknowledged.values()]
    keys = [row["request_key"] for row in rows.values() if row["request_key"]]
    unreadable = []
    for row in rows.values():
        for column in ("image_path", "preview_path", "base_path", "heatmap_path", "mask_path", "map_path"):
            path = server.store / row[column]
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != path.stem:
                unreadable.append(f"{row['id']} {column}")
            elif path.suffix == ".png" and not path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
                unreadable.append(f"{row['id']} {column} (not a PNG)")
    return {
        "requests": requests,
        "accepted": len(load.acknowledged),
        "rows": len(rows),
        "duplicate_ids": len(ids) - len(set(ids)),
        "duplicate_keys": len(keys) - len(set(keys)),
        "acknowledged_missing": sum(1 for inspection_id in ids if inspection_id not in rows),
        "key_mismatch": sum(1 for inspection_id, key in load.acknowledged.values()
                            if inspection_id in rows and rows[inspection_id]["request_key"] != key),
        "unreadable_files": len(unreadable),
        "retried_attempts": load.failures,
    }


def run_backend(backend: str, args: argparse.Namespace, model: Path, images: list, workdir: Path) -> dict:
    cluster = None
    if backend == "postgres" and not args.db:
        cluster = PrivateCluster()
        cluster.start()
        db_url = cluster.create_database(f"loadkill_{uuid.uuid4().hex[:8]}")
    else:
        db_url = args.db if backend == "postgres" else None
    server = ServerProcess([str(model)], workdir / backend, extra=["--no-access-log", "--queue-limit", "64"],
                           db_url=db_url)
    try:
        server.start(timeout=300)
        load = Load(server, images, args.requests, args.clients, not args.no_idempotency_key, args.deadline)
        threads = [threading.Thread(target=load.worker) for _ in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        while len(load.acknowledged) < args.kill_at * args.requests and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        at_kill = len(load.acknowledged)
        server.stop(signal.SIGKILL)
        killed = time.perf_counter()
        server.start(timeout=300)
        restart_s = time.perf_counter() - killed
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        result = check_store(server, load, args.requests)
    finally:
        server.stop()
        if cluster is not None:
            cluster.stop()
    keyed = not args.no_idempotency_key
    result.update(backend=backend, acknowledged_at_kill=at_kill, restart_s=round(restart_s, 1), wall_s=round(wall, 1),
                  idempotency_keys=keyed)
    exact = result["rows"] == result["accepted"] == args.requests if keyed else result["rows"] >= result["accepted"]
    result["ok"] = bool(exact and not result["duplicate_ids"] and not result["duplicate_keys"]
                        and not result["acknowledged_missing"] and not result["key_mismatch"]
                        and not result["unreadable_files"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite", "both"), default="both")
    parser.add_argument("--db", help="PostgreSQL URL to use instead of a private cluster (postgresql+psycopg://...)")
    parser.add_argument("--model", help="model file (default: fit a tiny PatchCore on the brick data set)")
    parser.add_argument("--images", help="folder of images to send (default: the brick test images)")
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kill-at", type=float, default=0.5, help="kill after this share of requests was acknowledged")
    parser.add_argument("--deadline", type=float, default=900.0, help="give up retrying after this many seconds")
    parser.add_argument("--no-idempotency-key", action="store_true", help="send no Idempotency-Key (no retries)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="defectlens-loadkill-"))
    model = Path(args.model) if args.model else fit_tiny_model(workdir)
    images = load_images(args.images, workdir)
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    results = [run_backend(backend, args, model, images, workdir) for backend in backends]
    for result in results:
        print(f"{result['backend']:8s}: {result['requests']} requests from {args.clients} clients, killed after "
              f"{result['acknowledged_at_kill']} acknowledged, back in {result['restart_s']} s; "
              f"accepted {result['accepted']}, rows {result['rows']}, duplicate ids {result['duplicate_ids']}, "
              f"duplicate keys {result['duplicate_keys']}, acknowledged but missing {result['acknowledged_missing']}, "
              f"unreadable files {result['unreadable_files']}, attempts retried {result['retried_attempts']}, "
              f"{result['wall_s']} s -> {'OK' if result['ok'] else 'FAILED'}")
    return 0 if all(result["ok"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
