"""The registry of single methods by name (`METHODS`, `method_class`, `build_method`).

Adding a method: write its file (a subclass of `AnomalyMethod`) and add one line to METHODS.
Composite methods (the ensemble) build their members through this module and are registered
by `defectlens.methods` itself, so that no import circle forms.
"""

from __future__ import annotations

from typing import Any

from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod
from defectlens.methods.cflow import CFlow
from defectlens.methods.draem import Draem
from defectlens.methods.dsr import DSR
from defectlens.methods.efficientad import EfficientAD
from defectlens.methods.fcdd import Fcdd
from defectlens.methods.fcdd_fpn import FcddFpn
from defectlens.methods.fpn_autoencoder import FpnAutoencoder
from defectlens.methods.padim import Padim
from defectlens.methods.patchcore import PatchCore
from defectlens.methods.reverse_distillation import ReverseDistillation
from defectlens.methods.sequential_patchcore import SequentialPatchCore
from defectlens.methods.spade import Spade
from defectlens.methods.ssim_autoencoder import SsimAutoencoder
from defectlens.methods.student_teacher import StudentTeacher
from defectlens.methods.supervised_fpn import SupervisedFpn

METHODS: dict[str, type[AnomalyMethod]] = {
    PatchCore.name: PatchCore,
    Padim.name: Padim,
    SequentialPatchCore.name: SequentialPatchCore,
    Draem.name: Draem,
    CFlow.name: CFlow,
    Spade.name: Spade,
    FpnAutoencoder.name: FpnAutoencoder,
    SsimAutoencoder.name: SsimAutoencoder,
    Fcdd.name: Fcdd,
    FcddFpn.name: FcddFpn,
    SupervisedFpn.name: SupervisedFpn,
    ReverseDistillation.name: ReverseDistillation,
    StudentTeacher.name: StudentTeacher,
    EfficientAD.name: EfficientAD,
    DSR.name: DSR,
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
