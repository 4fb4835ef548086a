"""The Ray runner: sharded fit that melds into one model, and batch inspection of large image
sets that survives lost workers. An optional extra: ``pip install 'defectlens[ray]'``.

    from defectlens import distributed
    distributed.fit(detector, "data/part/train/good", address="local", shards=4)
    distributed.predict("part.dlens", paths, "inspections/", address="10.0.0.1:6379", resume=True)
    report, run = distributed.evaluate_run("part.dlens", "data/part", address="local")

Thin layers over `Detector`: every number comes from the same code as in one process.
``defectlens fit|predict|evaluate --ray ADDRESS|local`` call these.
"""

from __future__ import annotations

from defectlens.distributed.cluster import LocalCluster, connect, require_ray

require_ray()

from defectlens.distributed.batch import BatchSummary, evaluate_run, predict  # noqa: E402
from defectlens.distributed.fit import fit  # noqa: E402

__all__ = ["BatchSummary", "LocalCluster", "connect", "evaluate_run", "fit", "predict"]
