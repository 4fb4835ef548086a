"""How many CPU threads the library computes with (torch intra-op, the pruned search, runtimes).

On a machine other programs also load, torch's default (one thread per core) oversubscribes:
measured on 2 busy cores, 2 threads ran 3-11x slower than 1 (threads spin-waiting on each
other). ``auto_threads`` therefore takes the cores not already busy: the usable cores minus the
1-minute load average, at least 1. ``--threads N`` on the command line (every command) and
``Detector(threads=N)`` set it explicitly; ``--threads 0`` leaves torch's own default.

Results do not depend on the thread count: the pruned search is exact whatever the split, and
PaDiM's precisions come from numpy/LAPACK, not a batched torch inverse (``ops.gaussian``).
"""

from __future__ import annotations

import os
import sys

from defectlens.errors import ConfigError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def auto_threads() -> int:
    """Usable cores minus the ones already busy (1-minute load average, rounded), at least 1."""
    cores = usable_cores()
    try:
        busy = int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        busy = 0
    return max(1, min(cores, cores - busy))


def resolve_threads(threads: int | str | None) -> int | None:
    """"auto" -> ``auto_threads()``; 0 or None -> None (leave the default); N >= 1 -> N."""
    if threads is None or threads == 0 or threads == "0":
        return None
    if threads == "auto":
        return auto_threads()
    try:
        count = int(threads)
    except (TypeError, ValueError):
        raise ConfigError(f"threads must be a positive integer, 0 or 'auto', got {threads!r}") from None
    if count < 0:
        raise ConfigError(f"threads must be a positive integer, 0 or 'auto', got {threads!r}")
    return count or None


def set_threads(threads: int | str | None) -> int | None:
    """Apply a thread count process-wide; returns the count set (None: left as it was).

    torch, if imported, is set now; libraries not imported yet (torch, onnxruntime, OpenVINO)
    read ``OMP_NUM_THREADS`` when they load, which is set too - torch is never imported here.
    ``"auto"`` leaves a ``OMP_NUM_THREADS`` the user set alone.
    """
    global _CONFIGURED
    if threads == "auto" and "OMP_NUM_THREADS" in os.environ:
        return None
    count = resolve_threads(threads)
    if count is None:
        return None
    _CONFIGURED = count
    os.environ["OMP_NUM_THREADS"] = str(count)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(count)
    return count


def configured_threads() -> int | None:
    """The count last set by ``set_threads`` (None: never set)."""
    return _CONFIGURED


_CONFIGURED: int | None = None
