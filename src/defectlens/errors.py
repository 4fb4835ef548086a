"""Exceptions raised by defectlens. Every message names the offending file or value."""

from __future__ import annotations


class DefectlensError(Exception):
    """Base class of every error defectlens raises on purpose."""


class ImageReadError(DefectlensError):
    """An input file is missing, empty, corrupt or not an image."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class ImageTooLargeError(ImageReadError):
    """An image's header claims more than the decode limits allow (a possible decompression bomb).

    Raised before any pixel is decoded. Attributes: ``limit`` (the name of the
    :class:`~defectlens.data.images.DecodeLimits` field, e.g. ``"max_pixels"``), ``value`` (what
    the file claims) and ``maximum`` (the limit in force).
    """

    def __init__(self, path: object, reason: str, *, limit: str = "", value: int = 0, maximum: int = 0) -> None:
        self.limit = limit
        self.value = value
        self.maximum = maximum
        super().__init__(path, reason)


class ImageFormatError(ImageReadError):
    """A file's content (its magic bytes, not its name) is no accepted image format."""


class DatasetError(DefectlensError):
    """A data set folder is missing, empty or not laid out as expected."""


class ModelFileError(DefectlensError):
    """A model file is missing, tampered with, or written by another library version."""


class ConfigError(DefectlensError, ValueError):
    """A hyper-parameter or option has a value defectlens cannot use."""


class NotFittedError(DefectlensError):
    """A detector was asked to predict or save before it was fitted."""


class TrainingError(DefectlensError):
    """Training cannot go on: no batches, a loss that is not a scalar, no gradient, ..."""


class NonFiniteLossError(TrainingError):
    """A loss or a gradient became NaN or infinite; the message names the step and the value.

    Attributes:
        step: the 1-based optimizer step at which it happened.
        value: the offending loss value (for a gradient: None).
    """

    def __init__(self, message: str, *, step: int, value: float | None = None) -> None:
        self.step = step
        self.value = value
        super().__init__(message)
