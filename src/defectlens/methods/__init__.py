"""Anomaly-detection methods: one file per method, all built on the shared parts.

Adding a method: write its file (a subclass of `AnomalyMethod`) and add one line to METHODS in
`methods/registry.py`. The ensemble of several methods and backbones is registered here.
"""

from __future__ import annotations

from defectlens.methods.base import AnomalyMethod, MethodContext
from defectlens.methods.ensemble import Ensemble
from defectlens.methods.padim import Padim
from defectlens.methods.patchcore import PatchCore
from defectlens.methods.registry import METHODS, build_method, method_class
from defectlens.methods.sequential_patchcore import SequentialPatchCore

METHODS[Ensemble.name] = Ensemble

__all__ = ["METHODS", "AnomalyMethod", "Ensemble", "MethodContext", "Padim", "PatchCore", "SequentialPatchCore", "build_method", "method_class"]
