"""Timing helpers every suite shares: machine load, timed calls, medians of round-robin
repeats, and the means the reports average with."""

from __future__ import annotations

import math
import os
import statistics

from tokensift.devices import clock


def load_averages(digits: int | None = 2) -> list[float]:
    """The 1, 5 and 15-minute load averages (``os.getloadavg``), rounded to ``digits`` (None: as read)."""
    return [value if digits is None else round(value, digits) for value in os.getloadavg()]


def load_1min(digits: int | None = 2) -> float:
    """The 1-minute load average, rounded to ``digits`` (None: as read)."""
    return load_averages(digits)[0]


def time_call(fn, device=None) -> float:
    """Wall seconds of one call of ``fn``, the device's queued work included."""
    start = clock(device)
    fn()
    return clock(device) - start


def interleaved_medians(cases: dict, repeats: int, warmup: int = 2, device=None) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin so load drift hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(time_call(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def median_time(fn, repeats: int, warmup: int = 2, device=None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    return interleaved_medians({"only": fn}, repeats, warmup, device)["only"]


def mean(values) -> float:
    """Arithmetic mean of the values that are numbers (NaN left out); NaN when none is."""
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else math.nan


def geomean(values) -> float:
    """Geometric mean of the positive values (NaN left out); NaN when none is."""
    values = [v for v in values if v == v and v > 0]
    return statistics.geometric_mean(values) if values else math.nan
