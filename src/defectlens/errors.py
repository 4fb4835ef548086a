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


class DatasetError(DefectlensError):
    """A data set folder is missing, empty or not laid out as expected."""


class ModelFileError(DefectlensError):
    """A model file is missing, tampered with, or written by another library version."""


class ConfigError(DefectlensError, ValueError):
    """A hyper-parameter or option has a value defectlens cannot use."""


class NotFittedError(DefectlensError):
    """A detector was asked to predict or save before it was fitted."""
