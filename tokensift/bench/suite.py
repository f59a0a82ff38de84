"""The suite protocol: what ``tokensift bench --suite NAME`` runs.

Each suite is one file that declares one :class:`Suite` as its module attribute ``SUITE``:

- ``names``: the ``--suite`` names it answers to (the text matrix answers to four);
- ``options``: the ``bench`` options it takes besides ``--suite``, ``--out``, ``--device`` and
  ``--dtype`` (which every suite takes); the command refuses any other option given, in one line;
- ``run(out_dir, **options)``: runs the suite, writes its rows to ``out_dir/results.jsonl``, then
  the report; the options come parsed (lists as lists), only those with a value, ``device`` and
  ``dtype`` always, and ``suite`` (the name asked for) when the suite takes it. It calls the
  suite's ``runner`` (``"module:function"``, looked up at each call), the options renamed by
  ``renames`` where the function calls them otherwise;
- ``report(out_dir)``: rebuilds ``report.md`` (and plots) from the rows in ``results.jsonl``
  (and, for a suite whose report states facts no row holds, ``run.json``), through ``reporter``.

:data:`REGISTRY` names the module of each suite; a module is imported only when its suite is
asked for, so a suite whose extra packages are missing answers "not available" and the others run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tokensift.errors import TokensiftError

COMMON_OPTIONS = ("suite", "out", "device", "dtype")  # every suite takes these

# every ``bench`` option a suite may take: name -> the item type of a comma-separated list (None: a plain value)
BENCH_OPTIONS: dict[str, type | None] = {
    "model": None, "policies": str, "budgets": int, "ratios": float, "lengths": int, "tasks": str, "protocols": str,
    "samples": None, "seed": None, "full_only_tasks": str, "lm_budgets": int, "workers": None, "ray": None,
    "kernels": None,
}

TEXT_SUITES = ("quick", "standard", "full", "long")
REGISTRY: dict[str, str] = {
    **{name: "tokensift.bench.runner" for name in TEXT_SUITES},
    "vision": "tokensift.bench.vision_suite",
    "spec": "tokensift.bench.spec_suite",
    "spec-fresh": "tokensift.bench.spec_fresh",
    "sparse-speed": "tokensift.bench.sparse_speed",
    "small-cache": "tokensift.bench.small_cache",
    "ttft": "tokensift.bench.ttft_suite",
}


def flag(option: str) -> str:
    """The command-line spelling of an option: ``full_only_tasks`` -> ``--full-only-tasks``."""
    return "--" + option.replace("_", "-")


@dataclass(frozen=True)
class Suite:
    """One benchmark suite (see the module docstring for the protocol)."""

    names: tuple[str, ...]
    options: tuple[str, ...]
    runner: str  # "module:function", called as function(out_dir, device=..., dtype=..., **options)
    reporter: str  # "module:function", called as function(out_dir)
    renames: Mapping[str, str] = field(default_factory=dict)  # option -> the runner's name for it
    refusals: Mapping[str, str] = field(default_factory=dict)  # option -> the error an option given gets

    def __post_init__(self):
        unknown = [o for o in (*self.options, *self.refusals) if o not in BENCH_OPTIONS and o not in COMMON_OPTIONS]
        unknown += [o for o in self.renames if o not in self.options]
        if unknown:
            raise ValueError(f"suite {self.names[0]}: not bench options it takes: {', '.join(unknown)}")

    def run(self, out_dir: Path, **options) -> None:
        """Run the suite into ``out_dir``: rows in results.jsonl, then the report."""
        resolve(self.runner)(Path(out_dir), **{self.renames.get(key, key): value for key, value in options.items()})

    def report(self, out_dir: Path) -> None:
        """Rebuild ``out_dir/report.md`` (and plots) from the rows."""
        resolve(self.reporter)(Path(out_dir))

    def takes(self, option: str) -> bool:
        return option in COMMON_OPTIONS or (option in self.options and option not in self.refusals)

    def check_given(self, name: str, given: Iterable[str]) -> None:
        """A one-line error for the first option given that the suite ``name`` does not take."""
        for option in given:
            if option in self.refusals:
                raise TokensiftError(self.refusals[option])
            if not self.takes(option):
                taken = ", ".join(flag(o) for o in (*self.options, "out", "device", "dtype") if o != "suite" and self.takes(o))
                raise TokensiftError(f"the {name} suite does not take {flag(option)} (it takes {taken})")


def resolve(target: str) -> Callable:
    """``"module:function"`` -> the function (looked up now, so a patched module attribute is the one called)."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def get_suite(name: str) -> Suite:
    """The suite ``--suite name`` runs, its module imported now (one-line errors: unknown, not installed)."""
    if name not in REGISTRY:
        raise TokensiftError(f"unknown suite '{name}'; use one of: {', '.join(REGISTRY)}")
    try:
        suite = importlib.import_module(REGISTRY[name]).SUITE
    except (ImportError, AttributeError):
        raise TokensiftError(f"suite '{name}' is not available in this installation") from None
    if name not in suite.names:
        raise TokensiftError(f"suite '{name}' is not available in this installation")
    return suite


def split_list(value: str | None, convert=str) -> list | None:
    """``"a,b"`` -> ``["a", "b"]`` (None or empty: None), split on commas outside parentheses
    (``"a,zipcache(hi_bits=8,lo_bits=4)"`` is two items), with a one-line error on bad items."""
    if not value:
        return None
    try:
        return [convert(item.strip()) for item in top_level_items(value) if item.strip()]
    except ValueError:
        raise TokensiftError(f"cannot read the list '{value}'") from None


def top_level_items(value: str) -> list[str]:
    """Split on commas outside parentheses: ``"a,zipcache(hi_bits=8,lo_bits=4)"`` is two items."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(value):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            items.append(value[start:i])
            start = i + 1
    return items + [value[start:]]


def run_suite(name: str, out: Path, values: Mapping[str, object], given: Iterable[str], device: str, dtype: str) -> None:
    """``tokensift bench``: run suite ``name`` into ``out``.

    ``values``: every bench option's value as given or defaulted on the command line (lists as
    the text given); ``given``: the options the command line named. An option given that the
    suite does not take is a one-line error; the suite gets the options it takes that have a
    value, lists parsed.
    """
    suite = get_suite(name)
    suite.check_given(name, given)
    options = {}
    for option in suite.options:
        if option in suite.refusals:
            continue
        value = values.get(option)
        if BENCH_OPTIONS.get(option) is not None:
            value = split_list(value, BENCH_OPTIONS[option])
        if value is not None:
            options[option] = value
    if "suite" in suite.options:
        options["suite"] = name
    suite.run(Path(out), device=device, dtype=dtype, **options)
