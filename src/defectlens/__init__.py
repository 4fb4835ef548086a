"""defectlens: industrial visual anomaly detection and segmentation, offline, on a CPU."""

from __future__ import annotations

__version__ = "0.1.0"
