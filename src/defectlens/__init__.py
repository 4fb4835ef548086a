"""defectlens: industrial visual anomaly detection and segmentation, offline, on a CPU.

>>> from defectlens import Detector
>>> det = Detector(method="patchcore").fit("data/transistor/train/good")
>>> report = defectlens.evaluate(det, defectlens.datasets.MVTecAD("data/transistor"))

Heavy modules (torch) load on first use of these names, so `import defectlens` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from defectlens._version import __version__

_LAZY = {
    "Detector": ("defectlens.detector", "Detector"),
    "Prediction": ("defectlens.detector", "Prediction"),
    "evaluate": ("defectlens.evaluation", "evaluate"),
    "datasets": ("defectlens.data.datasets", None),
}

__all__ = ["Detector", "Prediction", "__version__", "datasets", "evaluate"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'defectlens' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
