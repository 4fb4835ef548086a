"""Batch inspection on a two-node Ray cluster: the same results.jsonl rows, heat maps and masks
as `defectlens predict` in one process (bad files included), a SIGKILLed worker retried with
no input missing or written twice, `--resume`, and `evaluate --ray`."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from defectlens import distributed
from defectlens.cli import main
from defectlens.detector import Detector
from defectlens.errors import ImageReadError
from defectlens.evaluation import evaluate_run


def _rows(out: Path) -> dict[str, dict]:
    """results.jsonl keyed by path (asserting each path once), with out/ made relative."""
    rows: dict[str, dict] = {}
    for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert row["path"] not in rows, f"{row['path']} written twice"
        for key in ("heatmap", "mask"):
            if key in row:
                row[key] = str(Path(row[key]).relative_to(out))
        rows[row["path"]] = row
    return rows


def _copies(images: list[Path], count: int, folder: Path) -> list[Path]:
    """``count`` distinct input paths (links to the given images, round robin)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        link = folder / f"part_{index:04d}.png"
        link.symlink_to(images[index % len(images)])
        paths.append(link)
    return paths


@pytest.fixture
def bad_files(tmp_path) -> list[Path]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG broken")
    text = tmp_path / "notes.png"
    text.write_text("not an image", encoding="utf-8")
    return [corrupt, text]


def test_batch_predict_equals_single_process_predict(
    address, model_file, test_images, bad_files, tmp_path, capsys, monkeypatch, one_thread
):
    # relative paths, from a working directory the workers do not share (theirs is where their
    # node was started): they must still read these inputs and write into this --out
    monkeypatch.chdir(tmp_path)
    links = _copies(test_images, len(test_images), tmp_path / "in")
    relative = [path.relative_to(tmp_path) for path in [*links[:4], bad_files[0], *links[4:], bad_files[1]]]
    inputs = [str(path) for path in relative]
    single, cluster = Path("single"), Path("cluster")
    assert main(["predict", "--model", str(model_file), *inputs, "--out", str(single), "-q"]) == 1
    assert main(["predict", "--model", str(model_file), *inputs, "--out", str(cluster), "--ray", address, "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("error: cannot read image") == 4  # each bad file reported by both runs
    assert "9 of 11 images inspected" in captured.out and "2 failed" in captured.out
    expected, got = _rows(single), _rows(cluster)
    assert got == expected  # per image the same verdict, score, p-value, reasons, defects, file names
    assert {path for path, row in got.items() if "error" in row} == {bad_files[0].name, bad_files[1].name}
    for row in expected.values():
        for key in ("heatmap", "mask"):
            if key in row:
                assert (cluster / row[key]).read_bytes() == (single / row[key]).read_bytes()


def test_a_killed_worker_is_retried_and_every_input_is_written_once(address, model_file, test_images, tmp_path, one_thread):
    inputs = _copies(test_images, 48, tmp_path / "inputs")
    reference = {str(path): prediction.score for path, prediction in
                 zip(inputs, Detector.load(model_file).predict_batch([str(path) for path in inputs]))}
    killed: list[int] = []

    def kill_the_other_worker(result, pool) -> None:
        if not killed:  # after the first chunk: kill the worker that is in the middle of its chunk
            busy = [pid for pid in pool.pids() if pid != result.worker_pid]
            killed.append(busy[0])
            os.kill(busy[0], signal.SIGKILL)

    out = tmp_path / "out"
    summary = distributed.predict(model_file, inputs, out, chunk_batches=1, workers=2, on_chunk=kill_the_other_worker)
    assert killed and killed[0] not in summary.worker_pids and len(summary.worker_pids) == 2  # restarted by Ray
    assert (summary.inspected, summary.failed, summary.skipped) == (48, 0, 0)
    rows = _rows(out)  # asserts no path twice
    assert sorted(rows) == sorted(reference)
    np.testing.assert_allclose([rows[path]["score"] for path in reference], list(reference.values()), rtol=1e-6)
    assert all((out / row["heatmap"]).is_file() and (out / row["mask"]).is_file() for row in rows.values())


def test_resume_skips_what_is_done(address, model_file, test_images, tmp_path):
    inputs = _copies(test_images, 24, tmp_path / "inputs")
    out = tmp_path / "out"
    first = distributed.predict(model_file, inputs, out, chunk_batches=1)
    assert first.inspected == 24
    complete = _rows(out)
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    done = {json.loads(line)["path"] for line in lines[:10]}
    # stopped mid-job: 10 rows made it, the 11th was torn mid-write
    (out / "results.jsonl").write_text("".join(lines[:10]) + lines[10][:25], encoding="utf-8")
    chunks: list[list[int]] = []
    resumed = distributed.predict(model_file, inputs, out, chunk_batches=1, resume=True,
                                  on_chunk=lambda result, pool: chunks.append(result.indices))
    assert (resumed.skipped, resumed.inspected) == (10, 14)
    redone = {str(inputs[index]) for chunk in chunks for index in chunk}
    assert redone >= {str(path) for path in inputs} - done  # every missing input was inspected ...
    assert len(chunks) < 6  # ... and chunks whose inputs were all done were skipped (6 chunks of 4)
    assert _rows(out) == complete  # each input exactly once, as in the uninterrupted run
    again = distributed.predict(model_file, inputs, out, resume=True)
    assert (again.skipped, again.inspected, again.workers) == (24, 0, 0)  # nothing left: no cluster work


def test_evaluate_on_ray_gives_the_single_process_report_and_resumes(
    address, model_file, transistor_root, tmp_path, one_thread
):
    category = tmp_path / "category"
    images = {kind: sorted((transistor_root / "test" / kind).glob("*.png"))[:3] for kind in ("good", "bent_lead")}
    for kind, paths in images.items():
        (category / "test" / kind).mkdir(parents=True)
        (category / "ground_truth" / kind).mkdir(parents=True)
        for image in paths:
            (category / "test" / kind / image.name).symlink_to(image)
            if kind != "good":
                mask = transistor_root / "ground_truth" / kind / f"{image.stem}_mask.png"
                (category / "ground_truth" / kind / mask.name).symlink_to(mask)
    broken = category / "test" / "good" / images["good"][2].name
    broken.unlink()
    broken.write_bytes(b"\x89PNG broken")  # stops the evaluation, as in one process
    state = tmp_path / "state"
    with pytest.raises(ImageReadError, match=broken.name):
        distributed.evaluate_run(model_file, category, state_dir=state, chunk_batches=1)
    kept = sorted(state.glob("chunk-*.npz"))
    assert len(kept) == 1  # the chunk without the bad file (6 images in chunks of 4)
    broken.unlink()
    broken.symlink_to(images["good"][2])
    calls: list[tuple[int, int]] = []
    report, run = distributed.evaluate_run(model_file, category, state_dir=state, resume=True, chunk_batches=1,
                                           progress=lambda stage, done, total: calls.append((done, total)))
    assert calls[0][1] == 6 and calls[0][0] in (2, 4)  # the kept chunk was read, not predicted again
    assert not state.exists()  # removed once the report is made
    expected, expected_run = evaluate_run(Detector.load(model_file), category)
    np.testing.assert_array_equal(run.scores, expected_run.scores)
    assert run.verdicts == expected_run.verdicts
    for key in ("image", "pixel", "per_defect_type", "model"):
        assert report[key] == expected[key]
