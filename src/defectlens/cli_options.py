"""Command-line options generated from constructor signatures and docstrings.

``--some-option`` comes from a constructor argument ``some_option``; its type from the
annotation (int, float, str, bool as ``--x/--no-x``, ``X | None``, ``Sequence[str]`` as a list,
``Literal[...]`` and declared choices), its help from the class docstring's ``Args:``, its
default from the signature (shown in the help; an option left out is not passed, so the
constructor's own default applies). Structured values (dicts, lists of dicts) are given as
JSON text or as the path of a JSON file; a plain word is passed as a string (a preset name).
"""

from __future__ import annotations

import argparse
import collections.abc
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from defectlens.params import constructor_parameters, docstring_args


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def structured_value(text: str) -> Any:
    """JSON text, or a JSON file's path, or (neither) the text itself."""
    stripped = text.strip()
    try:
        if stripped[:1] in ("[", "{"):
            return json.loads(stripped)
        if stripped.endswith(".json") or Path(stripped).is_file():
            return json.loads(Path(stripped).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON or a readable JSON file ({error})") from None
    return text


_SEQUENCES = (collections.abc.Sequence, list, tuple)


class _OneOrMany(argparse.Action):
    """nargs="+" that stores a single value as itself (``--image-size 256`` -> 256)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def _argument_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for a type annotation."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation}
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin in (typing.Union, types.UnionType):
        if len(args) == 1:
            return _argument_kwargs(args[0])
        if set(args) == {int, float}:
            return {"type": float}
        sequences = [arg for arg in args if typing.get_origin(arg) in _SEQUENCES]
        scalars = [arg for arg in args if arg in (int, float)]
        if sequences and scalars and typing.get_args(sequences[0])[:1] == (scalars[0],):
            return {"type": scalars[0], "nargs": "+", "metavar": "N", "action": _OneOrMany}  # int | Sequence[int]
    if origin in _SEQUENCES:
        inner = typing.get_args(annotation)[:1]
        if inner and inner[0] in (int, float, str):
            return {"type": inner[0], "nargs": "+"}
    return {"type": structured_value, "metavar": "JSON"}


def add_constructor_options(
    group: Any, cls: type, skip: Iterable[str] = (), choices: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Add one option per constructor argument of ``cls`` (not in ``skip``); returns their names."""
    helps = docstring_args(cls)
    hints = _type_hints(cls)
    added = []
    for name, parameter in constructor_parameters(cls).items():
        if name in skip:
            continue
        kwargs = _argument_kwargs(hints.get(name, str))
        if choices and name in choices:
            kwargs["choices"] = list(choices[name])
        default = parameter.default
        shown = "" if default is parameter.empty else f" (default: {default})"
        help_text = (helps.get(name, "") + shown).replace("%", "%%")
        group.add_argument(option_flag(name), dest=name, default=argparse.SUPPRESS, help=help_text, **kwargs)
        added.append(name)
    return added


def _type_hints(cls: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            try:
                hints.update(typing.get_type_hints(init))
            except (NameError, TypeError):  # an annotation that cannot be evaluated: keep strings
                continue
    return hints


def given_options(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def peek_option(argv: Sequence[str], flag: str, default: str) -> str:
    """The value of ``flag`` in argv (``--flag V`` or ``--flag=V``) before full parsing."""
    for position, item in enumerate(argv):
        if item == flag and position + 1 < len(argv):
            return argv[position + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return default
