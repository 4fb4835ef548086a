"""Model files are sealed whole: an edited threshold, preprocessing or method setting is refused
with one clear line; unsealed version-1 files are refused until `defectlens upgrade-model`
re-seals them; a model key (HMAC) makes a re-seal impossible without the key; `reseal` is the
legitimate way to change metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from defectlens import artifact, cli
from defectlens.detector import Detector
from defectlens.errors import ConfigError, ModelFileError
from tests.conftest import textured_images


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    detector = Detector(method="patchcore", image_size=64, batch_size=8, coreset_ratio=0.25)
    detector.fit(textured_images(8, seed=0))
    return detector.save(tmp_path_factory.mktemp("sealed") / "model.dlens")


@pytest.fixture(autouse=True)
def no_key(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv(artifact.MODEL_KEY_ENV, raising=False)
    monkeypatch.delenv(artifact.MODEL_KEY_FILE_ENV, raising=False)
    previous = artifact.set_model_key(None)
    yield
    artifact.set_model_key(previous)


def document_of(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["defectlens"])


def edited(source: Path, target: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy whose JSON header was edited by hand (the seal kept, as a tamperer would)."""
    document = document_of(source)
    edit(document)
    save_file(load_file(str(source)), str(target), metadata={"defectlens": json.dumps(document)})
    return target


def _set(path: list[str], value: object):  # type: ignore[no-untyped-def]
    def edit(document: dict) -> None:
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def test_the_seal_covers_the_whole_document(model_file: Path) -> None:
    document = document_of(model_file)
    assert document["format_version"] == artifact.FORMAT_VERSION == 2
    assert document["seal"]["algorithm"] == "sha256" and len(document["seal"]["digest"]) == 64
    assert artifact.compute_seal(document, None) == document["seal"]
    loaded = Detector.load(model_file)
    assert loaded.threshold == document["threshold"]


@pytest.mark.parametrize(
    ("what", "edit"),
    [
        ("threshold", _set(["threshold"], 97.19)),
        ("preprocessing: image size", _set(["detector", "image_size"], [32, 32])),
        ("preprocessing: ROI", _set(["detector", "preprocess"], {"version": 1, "steps": [{"kind": "crop", "box": [0, 0, 9, 9]}]})),
        ("method config", _set(["method_options", "num_neighbors"], 9)),
        ("method", _set(["method"], "padim")),
        ("fit summary", _set(["fit", "num_images"], 1000)),
        ("tensor checksum", _set(["tensors_sha256"], "0" * 64)),
        ("a new key", _set(["extra"], True)),
        ("seal removed", lambda document: document.pop("seal")),
    ],
)
def test_tampered_metadata_is_refused_with_one_clear_line(
    model_file: Path, tmp_path: Path, what: str, edit, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    tampered = edited(model_file, tmp_path / "tampered.dlens", edit)
    with pytest.raises(ModelFileError) as refused:
        Detector.load(tampered)
    message = str(refused.value)
    assert "\n" not in message and str(tampered) in message
    assert "seal" in message, (what, message)
    code = cli.main(["predict", "--model", str(tampered), str(tampered), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "seal" in err and "Traceback" not in err


def test_a_version_1_file_is_refused_until_it_is_re_sealed(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def unseal(document: dict) -> None:
        document.pop("seal")
        document["format_version"] = 1

    old = edited(model_file, tmp_path / "old.dlens", unseal)
    with pytest.raises(ModelFileError, match=r"version-1 .* defectlens upgrade-model .*old\.dlens --out"):
        Detector.load(old)
    new = tmp_path / "new.dlens"
    assert cli.main(["upgrade-model", str(old), "--out", str(new)]) == 0
    assert "sealed" in capsys.readouterr().out
    assert Detector.load(new).threshold == Detector.load(model_file).threshold
    assert cli.main(["upgrade-model", str(new), "--out", str(new)]) == 2  # never in place
    # an edited version-1 file is vouched for by the user; its tensors are still checked
    broken = edited(old, tmp_path / "broken.dlens", _set(["tensors_sha256"], "0" * 64))
    with pytest.raises(ModelFileError, match="checksum"):
        artifact.upgrade_model(broken, tmp_path / "never.dlens")


def test_a_model_key_seals_with_an_hmac(model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "model.key"
    key_file.write_text("correct horse battery staple\n")
    monkeypatch.setenv(artifact.MODEL_KEY_FILE_ENV, str(key_file))
    with pytest.raises(ModelFileError, match="sealed without a key"):
        Detector.load(model_file)  # a key in force: an unkeyed file could have been re-sealed by anyone
    keyed = artifact.upgrade_model(model_file, tmp_path / "keyed.dlens")
    assert document_of(keyed)["seal"]["algorithm"] == "hmac-sha256"
    assert Detector.load(keyed).threshold == document_of(model_file)["threshold"]  # loads with the key
    # the plain SHA-256 of an edited document does not help without the key
    forged = edited(keyed, tmp_path / "forged.dlens", _set(["threshold"], 97.19))
    document = document_of(forged)
    document["seal"] = {"algorithm": "hmac-sha256", "digest": artifact.compute_seal(document, b"guess")["digest"]}
    save_file(load_file(str(keyed)), str(forged), metadata={"defectlens": json.dumps(document)})
    with pytest.raises(ModelFileError, match="another model key"):
        Detector.load(forged)
    monkeypatch.delenv(artifact.MODEL_KEY_FILE_ENV)
    with pytest.raises(ModelFileError, match="sealed with a model key"):
        Detector.load(keyed)
    monkeypatch.setenv(artifact.MODEL_KEY_ENV, "another key")
    with pytest.raises(ModelFileError, match="another model key"):
        Detector.load(keyed)


def test_reseal_is_the_legitimate_edit(model_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "rules.dlens"
    artifact.reseal(model_file, {"threshold": 42.0, "rules": {"min_area_px": 5}}, out=copy)
    assert Detector.load(copy).threshold == 42.0 and document_of(copy)["rules"] == {"min_area_px": 5}
    before, after = load_file(str(model_file)), load_file(str(copy))
    assert sorted(before) == sorted(after) and all(np.array_equal(before[n].numpy(), after[n].numpy()) for n in before)
    with pytest.raises(ConfigError, match="seal"):
        artifact.reseal(copy, {"seal": {}})
    tampered = edited(copy, tmp_path / "tampered.dlens", _set(["threshold"], 1.0))
    with pytest.raises(ModelFileError, match="seal"):
        artifact.reseal(tampered, {"threshold": 2.0})  # an edited file cannot be laundered
