"""The command line's Ray options: --shards / --resume without --ray are usage errors, and
--init is refused with --ray (no cluster needed)."""

from __future__ import annotations

from defectlens.cli import main


def test_ray_options_need_ray(train_images, model_file, tmp_path, capsys):
    data = str(train_images[0].parent)
    assert main(["fit", "--data", data, "--out", str(tmp_path / "m.dlens"), "--shards", "2", "-q"]) == 2
    assert "--shards goes with --ray" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_file), str(train_images[0]), "--out", str(tmp_path / "o"), "--resume"]) == 2
    assert "--resume goes with --ray" in capsys.readouterr().err
    assert main(["fit", "--data", data, "--out", str(tmp_path / "m.dlens"), "--init", str(model_file), "--ray", "local"]) == 2
    assert "--init (fine-tuning) is not supported with --ray" in capsys.readouterr().err
