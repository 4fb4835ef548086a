"""`defectlens upgrade-model`: re-seal a model file whose origin the user vouches for.

Version-1 model files (written before the seal) are refused on load because their threshold
or preprocessing could have been edited unnoticed; this command writes a sealed (version-2)
copy. It also seals a file under a model key (HMAC). Wired into the main CLI with
`add_upgrade_model_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from defectlens.errors import ConfigError

# artifact (torch, safetensors) is imported inside the commands: `defectlens --help` stays fast.


def add_model_key_option(parser: argparse.ArgumentParser) -> None:
    """--model-key-file: the HMAC key for sealing and checking model files (else the environment)."""
    parser.add_argument(
        "--model-key-file", metavar="FILE",
        help="file holding the model key (HMAC seal); default: $DEFECTLENS_MODEL_KEY (the key) or "
        "$DEFECTLENS_MODEL_KEY_FILE (a file)",
    )


def use_model_key_file(args: argparse.Namespace) -> None:
    """Put --model-key-file (when given) in force for this process."""
    if getattr(args, "model_key_file", None):
        from defectlens import artifact

        artifact.set_model_key(artifact.read_model_key_file(args.model_key_file))


def add_upgrade_model_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `upgrade-model` command to an argparse sub-parser collection; returns its parser."""
    upgrade = subparsers.add_parser(
        "upgrade-model",
        help="re-seal a model file you trust (version-1 files, or to seal under a model key)",
        description="Write a sealed copy of a model file: its metadata (threshold, preprocessing, method settings) "
        "and tensors are covered by a SHA-256, or an HMAC with the model key. Only run it on a file whose origin "
        "you vouch for: the command trusts its current contents.",
    )
    upgrade.add_argument("model", help="model file to re-seal (version 1, or version 2 sealed without a key)")
    upgrade.add_argument("--out", required=True, help="sealed model file to write (may not be the input)")
    add_model_key_option(upgrade)
    upgrade.set_defaults(handler=cmd_upgrade_model)
    return upgrade


def cmd_upgrade_model(args: argparse.Namespace) -> int:
    from defectlens import artifact

    use_model_key_file(args)
    source, out = Path(args.model), Path(args.out)
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ConfigError("--out must be a new file, not the model itself (keep the original until the copy works)")
    written = artifact.upgrade_model(source, out)
    algorithm = "HMAC-SHA256 (model key)" if artifact.model_key() else "SHA-256"
    print(f"sealed {source} -> {written} ({algorithm} over metadata and tensors)")
    return 0
