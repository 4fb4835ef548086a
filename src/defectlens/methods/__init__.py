"""Anomaly-detection methods: one file per method, all built on the shared parts.

Adding a method: write its file (a subclass of `AnomalyMethod`) and add one line to METHODS.
"""

from __future__ import annotations

from typing import Any

from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod, MethodContext
from defectlens.methods.padim import Padim
from defectlens.methods.patchcore import PatchCore
from defectlens.methods.sequential_patchcore import SequentialPatchCore

METHODS: dict[str, type[AnomalyMethod]] = {
    PatchCore.name: PatchCore,
    Padim.name: Padim,
    SequentialPatchCore.name: SequentialPatchCore,
}


def method_class(name: str) -> type[AnomalyMethod]:
    """The registered class called ``name``; ConfigError listing the names otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(name: str, **options: Any) -> AnomalyMethod:
    """Instantiate a method by name with its hyper-parameters; unknown names/options -> ConfigError."""
    cls = method_class(name)
    unknown = sorted(set(options) - set(cls.parameters()))
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {unknown}; its options: {', '.join(cls.parameters())}")
    try:
        return cls(**options)
    except TypeError as error:
        raise ConfigError(f"bad option for method {name!r}: {error}") from None


__all__ = ["METHODS", "AnomalyMethod", "MethodContext", "Padim", "PatchCore", "SequentialPatchCore", "build_method", "method_class"]
