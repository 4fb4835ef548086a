"""`defectlens serve` start-up: broken models stop it with a clear message; argument parsing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from defectlens.errors import ConfigError
from defectlens.service.app import parse_model_spec
from defectlens.service.cli import add_serve_parser, main


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"", "not a defectlens model file"),
        (b"garbage that is not safetensors", "not a defectlens model file"),
        (None, "model file not found"),
    ],
)
def test_a_broken_model_stops_the_start_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], brick_model: Path, content: bytes | None, phrase: str
) -> None:
    broken = tmp_path / "broken.dlens"
    if content is not None:
        broken.write_bytes(content)
    code = main(["--model", f"first={broken}", "--model", str(brick_model), "--store", str(tmp_path / "store"), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(broken) in err and phrase in err
    assert "Traceback" not in err


def test_a_truncated_second_model_stops_the_start(tmp_path: Path, capsys: pytest.CaptureFixture[str], brick_model: Path) -> None:
    truncated = tmp_path / "truncated.dlens"
    truncated.write_bytes(brick_model.read_bytes()[:4000])
    assert main(["--model", str(brick_model), "--model", str(truncated), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert str(truncated) in err and "Traceback" not in err


def test_bad_options_stop_the_start(tmp_path: Path, capsys: pytest.CaptureFixture[str], brick_model: Path) -> None:
    assert main(["--model", str(brick_model), "--model", str(brick_model), "--store", str(tmp_path)]) == 2
    assert "two models are named 'bricks'" in capsys.readouterr().err
    assert main(["--model", str(brick_model), "--db", "not a url", "--store", str(tmp_path)]) == 2
    assert "not a database URL" in capsys.readouterr().err
    assert main(["--model", str(brick_model), "--max-upload-mb", "0", "--store", str(tmp_path)]) == 2
    assert "--max-upload-mb" in capsys.readouterr().err


def test_model_specs() -> None:
    assert parse_model_spec("models/transistor.dlens") == ("transistor", Path("models/transistor.dlens"))
    assert parse_model_spec("line-3=models/t.dlens") == ("line-3", Path("models/t.dlens"))
    with pytest.raises(ConfigError, match="NAME="):
        parse_model_spec("/abs/odd=name.dlens")  # a path, and its stem is no valid name


def test_serve_parser_plugs_into_a_cli() -> None:
    parser = argparse.ArgumentParser(prog="defectlens")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--model", "a.dlens", "--model", "b=c.dlens", "--port", "9000", "--max-upload-mb", "5"])
    assert args.model == ["a.dlens", "b=c.dlens"] and args.port == 9000 and args.max_upload_mb == 5.0
    assert args.host == "127.0.0.1" and args.db is None and callable(args.handler)


def test_main_cli_has_serve() -> None:
    from defectlens import cli

    args = cli.build_parser().parse_args(["serve", "--model", "x.dlens"])
    assert args.handler.__name__ == "cmd_serve" and args.model == ["x.dlens"]
