"""Evaluation metrics, pooled over a data set, with the field's exact definitions.

* :mod:`~defectlens.metrics.image` - image AUROC, average precision, F1-max, TPR at a TNR set
  from normal images only, confusion counts at a threshold.
* :mod:`~defectlens.metrics.pixel` - pixel AUROC, AUPRO and the PRO curve (official MVTec AD
  definition), pixel F1-max, pixel confusion counts; exact and streaming (bounded memory).
* :mod:`~defectlens.metrics.spro` - sPRO curve and AUsPRO (MVTec LOCO AD), exact, with a
  loader for LOCO's ground-truth layout.
* :mod:`~defectlens.metrics.instances` - defect-wise (instance) recall per defect class.

Shared conventions: a binary decision flags ``score > threshold``; an undefined metric (one
class only, no defect region, ...) is ``None``. Maps may differ in size between images and
may be given lazily (a sequence of zero-argument loaders, or any object with ``__len__`` and
``__getitem__``).
"""

from __future__ import annotations

from defectlens.metrics.image import (
    DEFAULT_TNRS,
    TprAtTnr,
    average_precision,
    classification_at_threshold,
    counts_summary,
    f1_max,
    image_auroc,
    image_scores_from_maps,
    normal_quantile_threshold,
    tpr_at_tnr,
)
from defectlens.metrics.instances import (
    DEFAULT_COVERAGES,
    DefectClassRecall,
    DefectWiseRecall,
    defect_wise_recall,
)
from defectlens.metrics.pixel import (
    DEFAULT_PRO_LIMITS,
    PixelMetrics,
    ProCurve,
    aupro,
    pixel_auroc,
    pixel_classification_at_threshold,
    pixel_f1_max,
    pixel_metrics,
    pro_curve,
    trapezoid_area,
)
from defectlens.metrics.spro import (
    DEFAULT_SPRO_LIMITS,
    DefectType,
    LocoGroundTruth,
    SproCurve,
    auspro,
    channels_per_image,
    load_defects_config,
    read_channel_dir,
    spro_curve,
)

__all__ = [
    "DEFAULT_COVERAGES",
    "DEFAULT_PRO_LIMITS",
    "DEFAULT_SPRO_LIMITS",
    "DEFAULT_TNRS",
    "DefectClassRecall",
    "DefectType",
    "DefectWiseRecall",
    "LocoGroundTruth",
    "PixelMetrics",
    "ProCurve",
    "SproCurve",
    "TprAtTnr",
    "aupro",
    "auspro",
    "average_precision",
    "channels_per_image",
    "classification_at_threshold",
    "counts_summary",
    "defect_wise_recall",
    "f1_max",
    "image_auroc",
    "image_scores_from_maps",
    "load_defects_config",
    "normal_quantile_threshold",
    "pixel_auroc",
    "pixel_classification_at_threshold",
    "pixel_f1_max",
    "pixel_metrics",
    "pro_curve",
    "read_channel_dir",
    "spro_curve",
    "tpr_at_tnr",
    "trapezoid_area",
]
