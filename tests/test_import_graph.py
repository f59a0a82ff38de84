"""The engine's imports run one way, and no module-level state carries the current layer.

policies <- tokens (the per-token store) <- cache (layers, storage) <- hooks <- attention <- engine <- generate / bench / cli.
Read with ``ast`` (nothing imported), so the check holds whatever is already loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tokensift

PACKAGE = Path(tokensift.__file__).parent
LAYERS = ["tokensift.tokens", "tokensift.cache", "tokensift.hooks", "tokensift.attention", "tokensift.engine"]  # lowest first
ABOVE_ENGINE = ("tokensift.generate", "tokensift.speculative", "tokensift.serve", "tokensift.bench", "tokensift.cli",
                "tokensift.integration")


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def imported(path: Path, everywhere: bool) -> set[str]:
    """tokensift modules ``path`` imports: at module level, or anywhere (functions included);
    ``if TYPE_CHECKING:`` blocks never run and are skipped. Importing ``a.b.c`` runs ``a`` and
    ``a.b`` first: they count too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = []
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        nodes.append(node)
        if everywhere:
            pending.extend(ast.iter_child_nodes(node))
        elif isinstance(node, (ast.If, ast.Try)):  # module-level conditional imports still run at import
            pending.extend(ast.iter_child_nodes(node))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in found if name in MODULES}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_engine_layers_import_one_way_even_inside_functions():
    graph = {name: imported(MODULES[name], everywhere=True) & set(LAYERS) for name in LAYERS}
    for rank, name in enumerate(LAYERS):
        higher = set(LAYERS[rank:])  # itself included: no cycle
        assert not reachable(graph, name) & higher, f"{name} imports a layer above it: {graph}"


def test_no_import_cycle_through_the_engine_at_import_time():
    graph = {name: imported(path, everywhere=False) - {name} for name, path in MODULES.items()}
    for rank, name in enumerate(LAYERS):
        reached = reachable(graph, name)
        assert name not in reached, f"{name} is on an import cycle"
        assert not reached & set(LAYERS[rank + 1:]), f"{name} imports, at import time, a layer above it"
        assert not {m for m in reached if m.startswith(ABOVE_ENGINE)}, f"{name} imports code above the engine"


def test_policies_import_shipped_data_not_the_benchmark():
    graph = {name: imported(path, everywhere=True) for name, path in MODULES.items()}
    for name in MODULES:
        if name.startswith("tokensift.policies"):
            assert not {m for m in graph[name] if m.startswith("tokensift.bench")}, name


MUTATORS = {"append", "extend", "insert", "pop", "clear", "update", "setdefault", "add", "remove", "discard"}


def test_cache_has_no_module_state_written_by_its_methods():
    """No ``global`` statement, and no module-level object written (through a subscript or an
    attribute, or a mutating method) inside a function or method of tokensift/cache.py."""
    tree = ast.parse(MODULES["tokensift.cache"].read_text(encoding="utf-8"))
    module_names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        module_names.update(t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))

    def base(target):
        while isinstance(target, (ast.Subscript, ast.Attribute)):
            target = target.value
        return target.id if isinstance(target, ast.Name) else None

    for function in [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        local = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
        local.update(t.id for t in ast.walk(function) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store))
        shared = module_names - local
        for node in ast.walk(function):
            assert not isinstance(node, (ast.Global, ast.Nonlocal)), f"{function.name}: global state"
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                if isinstance(target, (ast.Subscript, ast.Attribute)):
                    assert base(target) not in shared, f"{function.name} writes module-level {base(target)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                assert base(node.func.value) not in shared, f"{function.name} mutates module-level {base(node.func.value)}"


def test_the_current_layer_is_not_handed_over_through_module_state():
    source = "\n".join(path.read_text(encoding="utf-8") for path in MODULES.values())
    assert "_LAST_UPDATED" not in source and "take_last_updated" not in source


ENGINE_SIDE = ("tokensift.cache", "tokensift.storage", "tokensift.hooks", "tokensift.attention", "tokensift.engine")


def test_policies_import_no_cache_or_storage_at_import_time():
    """Policies sit below the cache: they name their storage as a ``"module:Class"`` string
    (``Policy.storage``), resolved when a cache is built, never imported with the policy."""
    graph = {name: imported(path, everywhere=False) - {name} for name, path in MODULES.items()}
    for name in MODULES:
        if name.startswith("tokensift.policies"):
            reached = reachable(graph, name)
            assert not {m for m in reached if m.startswith(ENGINE_SIDE)}, f"{name} imports the engine at import time"


def test_the_engine_reads_policies_through_declared_attributes():
    """No ``getattr(policy, ...)`` in the engine: ``Policy`` declares what it reads."""
    import re

    for name, path in MODULES.items():
        if name.startswith(("tokensift.cache", "tokensift.storage", "tokensift.engine", "tokensift.attention",
                            "tokensift.hooks", "tokensift.serve", "tokensift.generate", "tokensift.speculative")):
            source = path.read_text(encoding="utf-8")
            assert not re.search(r"getattr\((self\.|layer\.)?policy\b", source), name
