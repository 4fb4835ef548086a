"""Progress bars for long work (the CLI and the demo draw them; the library only reports).

The library reports progress through a callback ``progress(stage, done, total)``. A stage may
carry a note after ``" | "`` (e.g. ``"training | loss 0.0123"``): the note is shown beside
the bar of the stage before it, so a changing note does not start a new bar.
"""

from __future__ import annotations

from tqdm import tqdm

NOTE_SEPARATOR = " | "


class ProgressBars:
    """A `progress(stage, done, total)` callback drawing one tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        name, _, note = stage.partition(NOTE_SEPARATOR)
        bar = self.bars.get(name)
        if bar is None:
            unit = "step" if total == 1 or name.startswith("training") else "img"
            bar = self.bars[name] = tqdm(total=total, desc=name, unit=unit, leave=True)
        if note:
            bar.set_postfix_str(note, refresh=False)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
