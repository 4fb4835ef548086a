"""The library version (its own module so that every module can read it without a cycle)."""

__version__ = "0.1.0"
