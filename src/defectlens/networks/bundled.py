"""Weights files shipped inside the package (``networks/weights/``), each with its recorded
SHA-256, so that a damaged or tampered installation is refused instead of used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class BundledWeights:
    """A file under `WEIGHTS_DIR` and the SHA-256 it must have."""

    file: str
    sha256: str

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file
