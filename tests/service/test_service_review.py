"""Three-state verdicts, operator reviews and drift monitoring through a real HTTP server:
REVIEW with its p-value and reasons in the API and the log; an audited review by an operator;
reviewed-good images exported and used by `defectlens recalibrate` (round trip); GET /v1/monitor
and `defectlens monitor --db URL` (offline) on a log whose scores drift."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest

from defectlens.calibration import NormalScoreModel
from defectlens.cli import main as cli_main
from defectlens.detector import Detector
from defectlens.service.monitor import drift_report, normal_scores_json
from defectlens.service.store import InspectionStore

from .conftest import ServerProcess


def inspect(client: httpx.Client, path: Path) -> dict:
    response = client.post("/v1/inspect", files={"image": (path.name, path.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture()
def client(review_server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=review_server.url, timeout=60) as http:
        yield http


def test_review_is_a_third_state_with_p_value_and_reasons(client: httpx.Client, review_server: ServerProcess,
                                                          brick_data: Path) -> None:
    good = inspect(client, brick_data / "test" / "good" / "000.png")
    stain = inspect(client, brick_data / "test" / "stain" / "000.png")
    assert good["verdict"] == "REVIEW" and good["is_anomalous"] is False
    assert good["review_threshold"] < good["score"] <= good["threshold"]
    assert 0 < good["p_value"] <= 1 and good["z_score"] is not None
    assert any("between review" in line for line in good["reasons"])
    assert stain["verdict"] == "NOT OK" and stain["is_anomalous"] is True and stain["p_value"] < good["p_value"]
    models = client.get("/v1/models").json()["items"]
    assert models[0]["review_threshold"] == pytest.approx(good["review_threshold"])

    listed = client.get("/v1/inspections", params={"verdict": "review", "limit": 1000}).json()
    assert good["id"] in {item["id"] for item in listed["items"]}
    assert all(item["verdict"] == "REVIEW" for item in listed["items"])
    with sqlite3.connect(review_server.db) as db:  # the log keeps the three states, the p-value and the reasons
        verdict, p_value, reasons = db.execute("SELECT verdict, p_value, reasons FROM inspections WHERE id = ?",
                                               (good["id"],)).fetchone()
    assert verdict == "REVIEW" and p_value == pytest.approx(good["p_value"]) and json.loads(reasons) == good["reasons"]
    # a what-if threshold from the client has one threshold: no REVIEW
    response = client.post("/v1/inspect", data={"threshold": str(good["score"] * 2)},
                           files={"image": ("g.png", (brick_data / "test" / "good" / "000.png").read_bytes(), "image/png")})
    assert response.json()["verdict"] == "OK" and response.json()["review_threshold"] is None


def test_an_operator_review_is_audited(client: httpx.Client, brick_data: Path) -> None:
    row = inspect(client, brick_data / "test" / "good" / "001.png")
    assert row["review"] is None
    first = client.post(f"/v1/inspections/{row['id']}/review", json={"decision": "defect", "operator": "ana"})
    second = client.post(f"/v1/inspections/{row['id']}/review",
                         json={"decision": "good", "operator": "  bo\x00b ", "note": "glare, part is fine"})
    assert first.status_code == second.status_code == 200, second.text
    audit = second.json()
    assert audit["operator"] == "bo b" and audit["note"] == "glare, part is fine" and audit["role"] == "write"
    assert audit["verdict"] == "REVIEW" and audit["image_sha256"] == row["image_sha256"]
    assert audit["model_sha256"] == row["model_sha256"] and audit["threshold"] == row["threshold"]
    assert audit["review_threshold"] == row["review_threshold"]
    trail = client.get(f"/v1/inspections/{row['id']}/reviews").json()["items"]
    assert [item["decision"] for item in trail] == ["defect", "good"]  # every decision kept, the newest counts
    again = client.get(f"/v1/inspections/{row['id']}").json()
    assert again["review"] == "good" and again["reviewed_by"] == "bo b"

    assert client.post(f"/v1/inspections/{row['id']}/review", json={"decision": "maybe", "operator": "x"}).status_code == 422
    assert client.post(f"/v1/inspections/{row['id']}/review", json={"decision": "good", "operator": ""}).status_code == 422
    assert client.post(f"/v1/inspections/{'0' * 32}/review", json={"decision": "good", "operator": "x"}).status_code == 404
    hostile = [b"not json", b"[]", b"null", b'{"decision": "good"}', b'{"decision": "good", "operator": 7}',
               ('{"decision": "good", "operator": "%s"}' % ("o" * 5000)).encode(),
               ('{"decision": "good", "operator": "x", "note": "%s"}' % ("n" * 5000)).encode(), b"\xff\xfe" * 100]
    for body in hostile:
        answer = client.post(f"/v1/inspections/{row['id']}/review", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 422 and len(answer.text) < 1000 and "Traceback" not in answer.text, (body[:40], answer.text)
    assert [item["decision"] for item in client.get(f"/v1/inspections/{row['id']}/reviews").json()["items"]] == ["defect", "good"]


def test_reviewed_good_images_export_and_recalibrate(client: httpx.Client, review_server: ServerProcess,
                                                     review_model: Path, brick_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    goods = [inspect(client, path) for path in sorted((brick_data / "test" / "good").glob("*.png"))]
    stain = inspect(client, brick_data / "test" / "stain" / "001.png")
    for row in goods:
        assert client.post(f"/v1/inspections/{row['id']}/review", json={"decision": "good", "operator": "cy"}).status_code == 200
    assert client.post(f"/v1/inspections/{stain['id']}/review", json={"decision": "defect", "operator": "cy"}).status_code == 200

    out = tmp_path / "reviewed"
    assert cli_main(["export-reviewed", "--db", review_server.db_url, "--store", str(review_server.store),
                     "--out", str(out), "--model", "review"]) == 0
    manifest = json.loads((out / "reviewed.json").read_text())
    exported = {entry["inspection_id"] for entry in manifest}
    assert {row["id"] for row in goods} <= exported and stain["id"] not in exported
    assert all(entry["decision"] == "good" and entry["operator"] for entry in manifest)
    for entry in manifest:  # the stored uploads, byte for byte
        assert (out / entry["file"]).is_file()
    assert sorted(p.name for p in out.glob("*.png")) == sorted(entry["file"] for entry in manifest)

    recalibrated = tmp_path / "recalibrated.dlens"
    assert cli_main(["recalibrate", str(review_model), "--good", str(out), "--out", str(recalibrated), "-q"]) == 0
    model = Detector.load(recalibrated)
    assert model.normal_scores is not None and model.normal_scores.size == len(manifest)
    served = {entry["inspection_id"]: entry["score"] for entry in manifest}
    # few images: the NOT OK threshold is the largest reviewed-good score (the served scores, same model)
    assert model.threshold == pytest.approx(max(served.values()), rel=1e-4)
    assert model.threshold != pytest.approx(Detector.load(review_model).threshold, rel=1e-3)
    capsys.readouterr()


def test_export_reviewed_without_reviews_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert cli_main(["export-reviewed", "--db", url, "--out", str(tmp_path / "out")]) == 2
    assert "no inspection has a newest review of 'good'" in capsys.readouterr().err


def test_monitor_endpoint_answers_per_model(client: httpx.Client, brick_data: Path) -> None:
    inspect(client, brick_data / "test" / "good" / "002.png")
    report = client.get("/v1/monitor").json()
    item = report["items"][0]
    assert item["model"] == "review" and item["window"] >= 1 and item["calibration_size"] > 0
    assert item["status"] in ("insufficient data", "ok", "drift")
    assert client.get("/v1/monitor", params={"window": 5}).status_code == 422
    assert client.get("/v1/monitor", params={"model": "nope"}).status_code == 404


# ----------------------------------------------------------------------------- drift maths, offline monitor
def _calibration(seed: int = 0, size: int = 200) -> NormalScoreModel:
    return NormalScoreModel(np.random.default_rng(seed).normal(10.0, 1.0, size))


def test_drift_report_is_quiet_on_normal_scores_and_flags_a_shift() -> None:
    normal = _calibration()
    threshold = float(np.quantile(normal.scores, 0.99))
    rng = np.random.default_rng(1)
    false_alarms = sum(
        drift_report("m", "s", rng.normal(10.0, 1.0, 200), normal, threshold).status == "drift" for _ in range(50)
    )
    assert false_alarms <= 2  # measured 1 in 200 (5 calibration sets x 40 windows): rare on good parts
    shifted = drift_report("m", "s", rng.normal(11.0, 1.0, 200), normal, threshold)
    assert shifted.status == "drift" and shifted.ks_p_value < 1e-6 and shifted.ewma_z > shifted.ewma_limit
    assert any("KS" in alarm for alarm in shifted.alarms)
    assert drift_report("m", "s", [10.0] * 5, normal, threshold).status == "insufficient data"
    assert drift_report("m", "s", [10.0] * 50, None, threshold).status == "no calibration"


def test_monitor_command_reads_the_log_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = InspectionStore(url)
    normal = _calibration()
    threshold = float(np.quantile(normal.scores, 0.99))
    for name, sha, mean in (("steady", "a" * 64, 10.0), ("shifted", "b" * 64, 12.0)):
        store.register_model(sha256=sha, name=name, threshold=threshold, normal_scores=normal_scores_json(normal))
        for index, score in enumerate(np.random.default_rng(2).normal(mean, 1.0, 100)):
            store.add(model_name=name, model_sha256=sha, image_sha256="c" * 64, width=8, height=8,
                      score=float(score), threshold=threshold, is_anomalous=bool(score > threshold), latency_ms=1.0,
                      image_path="i", heatmap_path="h", mask_path="m", map_path="p", id=f"{name[:2]}{index:030d}")
    store.close()
    assert cli_main(["monitor", "--db", url, "--model", "steady"]) == 0
    assert "steady" in (printed := capsys.readouterr().out) and "OK" in printed
    assert cli_main(["monitor", "--db", url]) == 1  # one model drifts
    printed = capsys.readouterr().out
    assert "shifted" in printed and "DRIFT" in printed and "KS" in printed
    assert cli_main(["monitor", "--db", url, "--json", "--window", "50"]) == 1
    reports = {item["model"]: item for item in json.loads(capsys.readouterr().out)}
    assert reports["steady"]["window"] == 50 and reports["shifted"]["share_above_threshold"] > 0.5
