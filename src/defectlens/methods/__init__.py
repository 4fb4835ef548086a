"""Anomaly-detection methods: one file per method, all built on the shared parts."""

from __future__ import annotations

from typing import Any

from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod
from defectlens.methods.padim import Padim
from defectlens.methods.patchcore import PatchCore
from defectlens.methods.sequential_patchcore import SequentialPatchCore

METHODS: dict[str, type[AnomalyMethod]] = {
    PatchCore.name: PatchCore,
    Padim.name: Padim,
    SequentialPatchCore.name: SequentialPatchCore,
}


def build_method(name: str, **options: Any) -> AnomalyMethod:
    """Instantiate a method by name with its hyper-parameters; unknown names/options -> ConfigError."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**options)
    except TypeError as error:
        raise ConfigError(f"bad option for method {name!r}: {error}") from None


__all__ = ["METHODS", "AnomalyMethod", "Padim", "PatchCore", "SequentialPatchCore", "build_method"]
