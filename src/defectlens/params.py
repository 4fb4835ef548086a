"""Hyper-parameters read from constructor signatures (as scikit-learn's ``get_params``).

A class's parameters are the named arguments of its ``__init__``, followed up the class
hierarchy while an ``__init__`` passes ``**kwargs`` on to its parent. Their help text comes
from the ``Args:`` section of the class docstring. The detector, the model file and the CLI
all read parameters from here, so a new constructor argument needs no edit anywhere else.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from typing import Any

from defectlens.errors import ConfigError

def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Named ``__init__`` parameters of ``cls`` and, through ``**kwargs``, of its bases."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        passes_on = False
        for name, parameter in list(inspect.signature(init).parameters.items())[1:]:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                passes_on = True
            elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                found.setdefault(name, parameter)
        if not passes_on:
            break
    return found


def get_params(instance: Any) -> dict[str, Any]:
    """The instance's constructor parameters and their current values (attributes of that name)."""
    return {name: getattr(instance, name) for name in constructor_parameters(type(instance))}


def docstring_args(cls: type) -> dict[str, str]:
    """``name -> help`` from the ``Args:`` sections of ``cls`` and its bases (Google style).

    ``a, b: text`` documents both names; continuation lines are joined.
    """
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        helps.update(_parse_args_section(inspect.getdoc(klass) or ""))
    return helps


def _parse_args_section(doc: str) -> dict[str, str]:
    helps: dict[str, str] = {}
    inside, indent, current = False, 0, []  # current: the names being described
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            inside, current = True, []
            continue
        if not inside:
            continue
        if line.strip() and not line.startswith(" "):
            inside = False  # the section ended (e.g. "Returns:")
            continue
        match = re.match(r"^(\s+)([\w, *]+?):\s*(.*)$", line)
        if match and (not current or len(match.group(1)) <= indent):
            indent = len(match.group(1))
            current = [name.strip().lstrip("*") for name in match.group(2).split(",")]
            for name in current:
                helps[name] = match.group(3).strip()
        elif current and line.strip():
            for name in current:
                helps[name] = f"{helps[name]} {line.strip()}".strip()
    return helps


def dataclass_from_dict(config: Any, key: str, types: dict[str, type], what: str) -> Any:
    """Build a dataclass from ``{key: <registered name>, **fields}`` (a step of a pipeline).

    Lists become tuples; an unknown name or field is a ConfigError naming what is known.
    """
    if not isinstance(config, Mapping) or key not in config:
        raise ConfigError(f"a {what} must be a dict with a {key!r}, got {config!r}")
    fields = dict(config)
    name = fields.pop(key)
    step_type = types.get(name)
    if step_type is None:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(types))}")
    known = {item.name for item in dataclasses.fields(step_type)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{what} {name!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
    fields = {field: tuple(value) if isinstance(value, list) else value for field, value in fields.items()}
    try:
        return step_type(**fields)
    except TypeError as error:
        raise ConfigError(f"{what} {name!r}: {error}") from None
