"""Batch inspection on Ray: many images, one model loaded once per worker, results streamed.

    predict(model, paths, out_dir, address=...)     results.jsonl + heatmaps/ + masks/
    evaluate_run(model, dataset, address=...)       the report of `evaluation.evaluate_run`

The driver cuts the input list into chunks aligned to the model's batch size (so every model
pass sees the same images as in a single-process run) and hands them to a pool of
`InspectionWorker` actors (`ray.util.ActorPool`); only paths travel, each worker reads its
images itself. A worker renders and writes the heat maps and masks with the one writer
(`outputs.ResultsWriter`) into the output folder (storage every node sees) and returns the
chunk's results rows; the driver appends them to ``results.jsonl`` as chunks complete, with a
progress bar.

Faults: a worker killed mid-chunk is restarted by Ray (``max_restarts``) and its chunk retried
(``max_task_retries``); files are keyed by input (rewriting a heat map is harmless) and a row
is written only when its chunk has completed, once per input (the driver keeps the set).
``resume=True`` reads ``results.jsonl`` first (a torn last line is dropped) and skips the
chunks whose inputs all have a row. An unreadable image gets an ``error`` row, as in
``defectlens predict``, and the job goes on.

Paths: a Ray worker's working directory is the one its node was started in, not the driver's,
so workers read and write absolute paths (made on the driver); the rows still name each input
and picture as the caller spelled them, as a single-process run does.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import ray
from ray.util import ActorPool

from defectlens.distributed.cluster import connect
from defectlens.distributed.remote import DEFAULT_RETRIES, load_model, model_bytes
from defectlens.errors import ConfigError, ImageReadError
from defectlens.outputs import ResultsWriter, output_stems
from defectlens.results import Prediction

ProgressCallback = Callable[[str, int, int], None]
RESULTS_NAME = "results.jsonl"


@dataclass(frozen=True)
class Chunk:
    """Consecutive inputs of the job: their global indices, paths (as given), output stems and
    the absolute paths the workers read."""

    indices: list[int]
    paths: list[str]
    stems: list[str]
    reads: list[str]

    @property
    def key(self) -> int:
        return self.indices[0]


@dataclass
class ChunkResult:
    """A finished chunk: per input its results row (a JSON line as `ResultsWriter` wrote it),
    its verdict (None for a failed input) and its error message (None when inspected)."""

    indices: list[int]
    lines: list[str]
    verdicts: list[str | None]
    errors: list[str | None]
    worker_pid: int = 0


@dataclass
class BatchSummary:
    """What a batch job did. ``inspected``/``failed`` count this run; ``skipped`` the inputs
    ``resume`` found done; ``verdicts`` counts this run's verdicts."""

    total: int
    inspected: int = 0
    failed: int = 0
    skipped: int = 0
    verdicts: dict[str, int] = field(default_factory=lambda: {"OK": 0, "REVIEW": 0, "NOT OK": 0})
    results_path: str = ""
    seconds: float = 0.0
    workers: int = 0
    worker_pids: list[int] = field(default_factory=list)
    worker_peak_rss_megabytes: list[float] = field(default_factory=list)


@ray.remote(max_restarts=DEFAULT_RETRIES, max_task_retries=DEFAULT_RETRIES)
class InspectionWorker:
    """Holds one loaded model and inspects chunks of images (one actor per worker process).

    Args:
        model: the model file's bytes (from the object store; loaded once, here).
        key: the driver's model key, for model files sealed with one.
        device: where the model runs.
        out_dir: the job's output folder (heatmaps/, masks/), absolute, or None (evaluation: no files).
        threshold: overrides the model's threshold, or None.
        job: the job's name (names this worker's temporary row files).
        out_label: the output folder as the caller spelled it (the rows' picture paths).
    """

    def __init__(
        self, model: bytes, key: bytes | None, device: str, out_dir: str | None, threshold: float | None, job: str,
        out_label: str | None = None,
    ) -> None:
        self.detector = load_model(model, key, device)
        self.out_dir = out_dir
        self.out_label = Path(out_label or out_dir or ".")
        self.threshold = threshold
        self.job = job

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_megabytes(self) -> float:
        """This worker process's peak resident memory (VmHWM), in MiB."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def inspect(self, chunk: Chunk) -> ChunkResult:
        """Predict a chunk; write its pictures into out_dir and return its rows."""
        assert self.out_dir is not None
        rows = Path(tempfile.gettempdir()) / f"defectlens-{self.job}-{chunk.key}.jsonl"
        lines: list[str] = []
        verdicts: list[str | None] = []
        errors: list[str | None] = []
        # an absolute results_name puts the writer's rows in this worker-local scratch file; the
        # rows returned name the input and pictures as the caller did (out_label, chunk.paths)
        with ResultsWriter(self.out_dir, results_name=str(rows), append=False) as writer:
            outcomes = self.detector.iter_predictions(chunk.reads, self.threshold)
            for position, (path, (_, outcome)) in enumerate(zip(chunk.paths, outcomes)):
                if isinstance(outcome, ImageReadError):
                    error = ImageReadError(path, outcome.reason)
                    row = writer.write_error(path, error)
                    verdicts.append(None)
                    errors.append(str(error))
                else:
                    outcome.source = path
                    row = writer.write(chunk.stems[position], outcome)
                    for key, folder in (("heatmap", "heatmaps"), ("mask", "masks")):
                        row[key] = str(self.out_label / folder / Path(row[key]).name)
                    verdicts.append(outcome.verdict)
                    errors.append(None)
                lines.append(json.dumps(row) + "\n")  # as ResultsWriter writes a row
        rows.unlink()
        return ChunkResult(chunk.indices, lines, verdicts, errors, os.getpid())

    def predict(self, chunk: Chunk) -> tuple[int, list[Prediction | tuple[str, str]]]:
        """The chunk's key and its predictions without their prepared images (evaluation); an
        unreadable input comes back as (path, reason)."""
        results: list[Prediction | tuple[str, str]] = []
        for path, (_, outcome) in zip(chunk.paths, self.detector.iter_predictions(chunk.reads, self.threshold)):
            if isinstance(outcome, ImageReadError):
                results.append((path, outcome.reason))
            else:
                outcome.image, outcome.source = None, path
                results.append(outcome)
        return chunk.key, results


def _chunks(paths: Sequence[str], stems: Sequence[str], size: int, skip: Sequence[bool]) -> list[Chunk]:
    """Chunks of ``size`` consecutive inputs (a multiple of the batch size), without the
    chunks whose inputs are all done."""
    chunks = []
    for start in range(0, len(paths), size):
        indices = list(range(start, min(start + size, len(paths))))
        if all(skip[index] for index in indices):
            continue
        chunks.append(Chunk(indices, [paths[i] for i in indices], [stems[i] for i in indices],
                            [os.path.abspath(paths[i]) for i in indices]))
    return chunks


def done_inputs(results_path: Path, paths: Sequence[str]) -> list[bool]:
    """Per input, whether ``results_path`` already has its row (a row per occurrence of a path);
    a torn last line (a driver stopped mid-write) is cut off the file."""
    if not results_path.is_file():
        return [False] * len(paths)
    data = results_path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(results_path, "r+b") as file:
            file.truncate(len(complete))
    counts: collections.Counter[str] = collections.Counter()
    for line in complete.decode("utf-8").splitlines():
        try:
            counts[str(json.loads(line)["path"])] += 1
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    flags = []
    for path in paths:
        flags.append(counts[path] > 0)
        counts[path] -= 1
    return flags


class _Pool:
    """The job's actors: one `InspectionWorker` per worker, the model put once in the object store."""

    def __init__(
        self, ray_module: Any, model: Any, out_dir: str | None, threshold: float | None, workers: int | None,
        cpus_per_worker: float, retries: int,
    ) -> None:
        from defectlens import artifact

        data = model_bytes(model)
        self.detector = load_model(data) if not hasattr(model, "iter_predictions") else model
        self.job = hashlib.sha256(data).hexdigest()[:12] + f"-{os.getpid()}-{time.time_ns()}"
        if workers is None:
            workers = max(1, int(ray_module.cluster_resources().get("CPU", 1) // cpus_per_worker))
        options = {"num_cpus": cpus_per_worker, "max_restarts": retries, "max_task_retries": retries}
        # put once; held here for the pool's life, since a restarted actor reads its constructor
        # arguments again (Ray frees an argument it put itself once the actor has started:
        # ray-project/ray#53727, the restart then fails)
        self.model_ref = ray_module.put(data)
        self.actors = [
            InspectionWorker.options(**options).remote(
                self.model_ref, artifact.model_key(), self.detector.device,
                None if out_dir is None else os.path.abspath(out_dir), threshold, self.job, out_dir,
            )
            for _ in range(workers)
        ]
        self.ray = ray_module

    def map(self, method: str, chunks: Sequence[Chunk]) -> Iterator[Any]:
        """Results of ``method`` over the chunks, as they complete."""
        pool = ActorPool(self.actors)
        return pool.map_unordered(lambda actor, chunk: getattr(actor, method).remote(chunk), chunks)

    def pids(self) -> list[int]:
        return self.ray.get([actor.pid.remote() for actor in self.actors])

    def peak_rss_megabytes(self) -> list[float]:
        return self.ray.get([actor.peak_rss_megabytes.remote() for actor in self.actors])


def predict(
    model: Any, inputs: Sequence[str | Path], out_dir: str | Path, address: str | None = None,
    threshold: float | None = None, resume: bool = False, workers: int | None = None, chunk_batches: int = 2,
    cpus_per_worker: float = 1.0, retries: int = DEFAULT_RETRIES, progress: ProgressCallback | None = None,
    on_error: Callable[[str], None] | None = None, on_chunk: Callable[[ChunkResult, "_Pool"], None] | None = None,
) -> BatchSummary:
    """Inspect image files on a Ray cluster, writing what `defectlens predict` writes.

    Args:
        model: a fitted `Detector` or a model file.
        inputs: image paths (folders already expanded), each readable by every worker.
        out_dir: results.jsonl, heatmaps/ and masks/ (on storage every node sees).
        address: "local", "HOST:PORT" or None (see `cluster.connect`).
        threshold: overrides the model's threshold.
        resume: skip the inputs that out_dir/results.jsonl already has a row for.
        workers: actors (default: the cluster's CPUs / cpus_per_worker).
        chunk_batches: model batches per chunk (a chunk is what a worker gets at once and
            what a killed worker redoes).
        cpus_per_worker: CPUs each actor reserves (its torch threads).
        retries: restarts of a dead worker and retries of its chunk.
        progress: progress(stage, done, total), images done (the CLI draws a bar).
        on_error: called with each failed input's message.
        on_chunk: called with each finished chunk and the pool (tests: kill a worker mid-job).
    """
    paths = [str(path) for path in inputs]
    if not paths:
        raise ConfigError("predict needs at least one input image")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    stems = output_stems([Path(path) for path in paths])
    summary = BatchSummary(len(paths), results_path=str(results_path))
    started = time.perf_counter()
    done = done_inputs(results_path, paths) if resume else [False] * len(paths)
    summary.skipped = sum(done)
    if summary.skipped == len(paths):  # resumed after the last row: nothing to start a cluster for
        summary.seconds = time.perf_counter() - started
        return summary
    with connect(address) as ray_module:
        pool = _Pool(ray_module, model, str(out), threshold, workers, cpus_per_worker, retries)
        chunks = _chunks(paths, stems, pool.detector.batch_size * max(1, chunk_batches), done)
        summary.workers = len(pool.actors)
        finished = summary.skipped
        if progress:
            progress("inspecting", finished, len(paths))
        with open(results_path, "a", encoding="utf-8") as results:
            for result in pool.map("inspect", chunks):
                for index, line, verdict, error in zip(result.indices, result.lines, result.verdicts, result.errors):
                    if done[index]:
                        continue  # a row already in results.jsonl (resume) or from an earlier copy of this chunk
                    results.write(line)
                    done[index] = True
                    finished += 1
                    if error is not None:
                        summary.failed += 1
                        if on_error:
                            on_error(error)
                    else:
                        summary.inspected += 1
                        summary.verdicts[str(verdict)] += 1
                results.flush()
                if progress:
                    progress("inspecting", finished, len(paths))
                if on_chunk:
                    on_chunk(result, pool)
        summary.worker_pids = pool.pids()
        summary.worker_peak_rss_megabytes = pool.peak_rss_megabytes()
    summary.seconds = time.perf_counter() - started
    return summary


# ---------------------------------------------------------------------------------- evaluation
def _save_predictions(file: Path, predictions: Sequence[Prediction | tuple[str, str]]) -> None:
    """A chunk's predictions as .npz (maps float32, masks bool, the rest as JSON; no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for position, item in enumerate(predictions):
        if isinstance(item, tuple):
            meta.append({"error": list(item)})
            continue
        arrays[f"map_{position}"] = item.anomaly_map
        arrays[f"mask_{position}"] = item.mask
        meta.append({key: value for key, value in asdict(item).items() if key not in ("anomaly_map", "mask", "image")})
    arrays["meta"] = np.array(json.dumps(meta))
    temporary = file.with_name(file.name + ".tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, file)


def _load_predictions(file: Path) -> list[Prediction | tuple[str, str]]:
    with np.load(file, allow_pickle=False) as arrays:
        meta = json.loads(str(arrays["meta"]))
        items: list[Prediction | tuple[str, str]] = []
        for position, fields in enumerate(meta):
            if "error" in fields:
                items.append((fields["error"][0], fields["error"][1]))
            else:
                items.append(Prediction(anomaly_map=arrays[f"map_{position}"], mask=arrays[f"mask_{position}"], **fields))
        return items


class ClusterDetector:
    """A fitted detector whose `predict_batch` runs on the cluster, for `evaluation.evaluate_run`
    (which predicts ``batch_size`` images per call: here every test image in one call).

    Chunks' predictions are kept in ``state_dir`` as they complete; with ``resume`` the chunks
    already there are read instead of predicted again.
    """

    def __init__(
        self, detector: Any, pool: _Pool, state_dir: Path, resume: bool, progress: ProgressCallback | None,
        chunk_batches: int,
    ) -> None:
        self._detector = detector
        self._pool = pool
        self.state_dir = state_dir
        self.resume = resume
        self.progress = progress
        self.chunk_batches = chunk_batches
        self.batch_size = 2**62  # evaluate_run: hand every image over in one predict_batch call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)

    def predict_batch(self, images: Sequence[str | Path], threshold: float | None = None) -> list[Prediction]:
        paths = [str(path) for path in images]
        chunks = _chunks(paths, [""] * len(paths), self._detector.batch_size * max(1, self.chunk_batches), [False] * len(paths))
        results: dict[int, list[Prediction | tuple[str, str]]] = {}
        missing = []
        for chunk in chunks:
            file = self.state_dir / f"chunk-{chunk.key:08d}.npz"
            if self.resume and file.is_file():
                results[chunk.key] = _load_predictions(file)
            else:
                missing.append(chunk)
        done = sum(len(results[key]) for key in results)
        if self.progress:
            self.progress("evaluating", done, len(paths))
        for key, predictions in self._pool.map("predict", missing):
            if not any(isinstance(item, tuple) for item in predictions):  # a chunk with a bad file is redone
                _save_predictions(self.state_dir / f"chunk-{key:08d}.npz", predictions)
            results[key] = predictions
            done += len(predictions)
            if self.progress:
                self.progress("evaluating", done, len(paths))
        ordered = [item for key in sorted(results) for item in results[key]]
        for item in ordered:
            if isinstance(item, tuple):
                raise ImageReadError(*item)
        return ordered  # type: ignore[return-value]


def evaluate_run(
    model: Any, dataset: Any, address: str | None = None, resume: bool = False, state_dir: str | Path | None = None,
    workers: int | None = None, chunk_batches: int = 2, cpus_per_worker: float = 1.0, retries: int = DEFAULT_RETRIES,
    progress: ProgressCallback | None = None,
) -> tuple[dict[str, Any], Any]:
    """`evaluation.evaluate_run` with the test images predicted on a Ray cluster: the same
    report (per image the same predictions as a single-process run).

    Args:
        model: a fitted `Detector` or a model file.
        dataset: a data set object or its root folder (as `evaluation.evaluate_run` takes it).
        resume: reuse the chunks a stopped run with the same model and data kept in ``state_dir``.
        state_dir: where finished chunks are kept until the report is written (default: a
            folder in the temporary directory named after the model's and the test images'
            digest); removed after a successful run.
        workers, chunk_batches, cpus_per_worker, retries, progress: as in `predict`.
    """
    from defectlens.data.datasets import open_dataset
    from defectlens.evaluation import evaluate_run as single_process_evaluate_run

    dataset = open_dataset(dataset) if isinstance(dataset, (str, Path)) else dataset
    data = model_bytes(model)
    digest = hashlib.sha256(data)
    for sample in dataset.test_samples():
        digest.update(str(sample.path).encode() + b"\0")
    folder = Path(state_dir) if state_dir else Path(tempfile.gettempdir()) / f"defectlens-evaluate-{digest.hexdigest()[:16]}"
    if folder.exists() and not resume:
        for stale in folder.glob("chunk-*"):
            stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    with connect(address) as ray_module:
        pool = _Pool(ray_module, model, None, None, workers, cpus_per_worker, retries)
        cluster_detector = ClusterDetector(pool.detector, pool, folder, resume, progress, chunk_batches)
        report, run = single_process_evaluate_run(cluster_detector, dataset)
    for finished in folder.glob("chunk-*"):
        finished.unlink()
    folder.rmdir()
    return report, run
