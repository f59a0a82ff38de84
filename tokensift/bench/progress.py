"""The progress UI of ``tokensift bench``: one bar on stderr, and a line per finished job where
the bar cannot be drawn (logs)."""

from __future__ import annotations

import time
from contextlib import contextmanager


class BenchProgress:
    """A running bar: :meth:`advance` by finished units, :meth:`describe` what runs, :meth:`note` a finished job."""

    def __init__(self, bar, handle, console):
        self.bar, self.handle, self.console = bar, handle, console
        self.started = time.perf_counter()

    def advance(self, units: int) -> None:
        self.bar.advance(self.handle, units)

    def describe(self, text: str) -> None:
        self.bar.update(self.handle, description=text)

    def note(self, text: str) -> None:
        """A line per finished job where the bar cannot be drawn (logs)."""
        if not self.console.is_terminal:
            self.console.print(f"[{time.perf_counter() - self.started:7.0f} s] {text}", highlight=False)


@contextmanager
def bench_progress(console, total: int):
    """A :class:`BenchProgress` over ``total`` units, drawn on ``console`` while the block runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        yield BenchProgress(bar, bar.add_task("bench", total=total), console)
