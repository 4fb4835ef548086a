"""What travels to Ray workers: a detector's recipe (`DetectorSpec`), model files as bytes,
and errors coming back as the library's own exceptions (`get`)."""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from defectlens import artifact
from defectlens.errors import DefectlensError
from defectlens.settings import json_safe

if TYPE_CHECKING:
    from defectlens.detector import Detector

DEFAULT_RETRIES = 3
"""Times Ray re-runs a task (or restarts an actor and retries its call) whose worker died."""
Function = TypeVar("Function", bound=Callable[..., Any])


class TaskError(Exception):
    """A library error raised in a task, in a form that survives the trip back: our errors take
    (path, reason) arguments that plain exception pickling cannot rebuild."""

    def __init__(self, error_class: type, args: tuple[Any, ...], state: dict[str, Any]) -> None:
        super().__init__(error_class, args, state)

    def restore(self) -> DefectlensError:
        """The original error (its class, message and attributes)."""
        error_class, args, state = self.args
        error = error_class.__new__(error_class)
        Exception.__init__(error, *args)
        error.__dict__.update(state)
        return error


def portable_errors(function: Function) -> Function:
    """Decorate a task so that a library error it raises reaches the driver as itself (`get`)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except DefectlensError as error:
            raise TaskError(type(error), error.args, dict(error.__dict__)) from None

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class DetectorSpec:
    """An unfitted detector's constructor arguments, JSON-safe as a model file keeps them.

    Attributes:
        method: the method's name.
        params: the Detector's constructor arguments (without method and device).
        options: the method's hyper-parameters (those not among ``params``, e.g. its seed).
        device: "cpu" or "cuda" on the workers.
    """

    method: str
    params: dict[str, Any]
    options: dict[str, Any]
    device: str = "cpu"

    @classmethod
    def of(cls, detector: "Detector") -> "DetectorSpec":
        params = {name: json_safe(value) for name, value in detector.get_params().items() if name not in ("method", "device")}
        options = {name: value for name, value in detector.method.config().items() if name not in params}
        return cls(detector.method_name, params, options, detector.device)

    def build(self) -> "Detector":
        """A fresh, unfitted detector (on a worker: its backbone loads on first use)."""
        from defectlens.detector import Detector

        return Detector(method=self.method, device=self.device, **self.params, **self.options)


def model_bytes(model: "Detector | str | Path") -> bytes:
    """A fitted detector (or a model file) as the bytes of its model file."""
    if isinstance(model, (str, Path)):
        return Path(model).read_bytes()
    with tempfile.TemporaryDirectory(prefix="defectlens-model-") as folder:
        return model.save(Path(folder) / "model.dlens").read_bytes()


def load_model(data: bytes, key: bytes | None = None, device: str = "cpu") -> "Detector":
    """A detector from model-file bytes, checked like any model file (``key``: the driver's
    model key, for files sealed with one)."""
    from defectlens.detector import Detector

    if key is not None:
        artifact.set_model_key(key)
    descriptor, name = tempfile.mkstemp(suffix=".dlens", prefix="defectlens-model-")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        return Detector.load(name, device=device)
    finally:
        os.unlink(name)


def get(ray: Any, refs: Any, timeout: float | None = None) -> Any:
    """``ray.get`` that re-raises a task's library error (ImageReadError, ConfigError...) as
    itself, so callers see what a single-process run would raise."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, TaskError):
            raise cause.restore() from None
        if isinstance(cause, DefectlensError):
            raise cause from None
        raise


def wait_all(ray: Any, refs: Sequence[Any]) -> Any:
    """Yield (index, result) of ``refs`` as each completes (library errors re-raised as in `get`)."""
    position = {ref: index for index, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield position[ready[0]], get(ray, ready[0])
