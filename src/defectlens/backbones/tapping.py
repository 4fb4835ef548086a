"""Running a backbone only as far as the deepest layer whose output is wanted."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from torch import Tensor


def tap_layers(
    x: Tensor, layers: Iterable[tuple[str, Callable[[Tensor], Tensor]]], layer_names: Sequence[str],
    features: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Pass ``x`` through the named layers in order, keeping the outputs named in
    ``layer_names``; stops once all are kept. ``features``: outputs already kept (a stem)."""
    wanted = set(layer_names)
    kept = {} if features is None else features
    for name, layer in layers:
        if len(kept) == len(wanted):
            break
        x = layer(x)
        if name in wanted:
            kept[name] = x
    return kept
