"""Write a report dict as JSON: numpy values become plain numbers, NaN and infinities null."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path, PurePath
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy of ``value``: numpy scalars/arrays -> numbers/lists, paths -> str,
    dataclasses -> dicts, tuples/sets -> lists, and non-finite floats -> None (JSON has no
    NaN or infinity; an undefined metric is null in every report)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, np.ndarray):
        return [to_jsonable(item) for item in value.tolist()]
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    return str(value)


def dumps(report: Any, indent: int | None = 2) -> str:
    """Serialize a report to strict JSON text (``allow_nan=False`` holds by construction)."""
    return json.dumps(to_jsonable(report), indent=indent, allow_nan=False)


def write_json(report: Any, path: str | Path) -> Path:
    """Write ``report`` as JSON to ``path`` (parent folders created); returns the path."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(dumps(report) + "\n", encoding="utf-8")
    return file
