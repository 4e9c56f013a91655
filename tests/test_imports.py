"""Imports flow one way: speech_io <- adapters <- finetune <- speechlm (CLI, responding, evaluation, serving,
demo), with no cycle among modules. Read from the source (every import, also inside functions; those under
``if TYPE_CHECKING:`` are annotations only and do not count), so a backwards import fails here even where
no test happens to run it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# source folder -> import package, in the order imports may point (each layer imports only those before it)
LAYERS = {"speech_io": "speechlm.speech_io", "adapters": "speechlm.adapters", "finetune": "speechlm.finetune",
          "speechlm": "speechlm"}


def module_files() -> dict[str, Path]:
    modules = {}
    for folder, package in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            modules[".".join([package, *parts[:-1]] if parts[-1] == "__init__" else [package, *parts])] = path
    return modules


MODULES = module_files()


def layer(module: str) -> int:
    for index, package in enumerate(list(LAYERS.values())[:-1]):
        if module == package or module.startswith(package + "."):
            return index
    return len(LAYERS) - 1


def imported_modules(module: str, path: Path) -> set[str]:
    """Our modules that ``module`` imports when it runs (at the top or inside a function)."""
    tree = ast.parse(path.read_text())
    annotations_only = {id(node) for branch in ast.walk(tree)
                        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                        for node in ast.walk(branch)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imported_modules(module, path) for module, path in MODULES.items()}


def test_the_graph_sees_the_packages():
    assert {"speechlm.speech_io.audio", "speechlm.adapters.modeling", "speechlm.finetune.recipe",
            "speechlm.responding", "speechlm.serving.app"} <= MODULES.keys()
    assert "speechlm.adapters.modeling" in GRAPH["speechlm.adapters.building"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_points_up_the_layers(module):
    backwards = sorted(name for name in GRAPH[module] if layer(name) > layer(module))
    assert not backwards, (f"{MODULES[module].relative_to(ROOT)} imports {backwards}: imports flow "
                           f"speech_io <- adapters <- finetune <- speechlm; move the code or the caller")


def test_no_import_cycles():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for name in sorted(GRAPH[module]):
            # a package's __init__ importing its own modules is how it re-exports them
            if not (MODULES[module].name == "__init__.py" and name.startswith(module + ".")):
                visit(name, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def bench_imports() -> list[tuple[str, str, str]]:
    """``(bench file, module, name)`` for every ``from speechlm... import name`` in bench/ (also inside functions)."""
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("speechlm"):
                found += [(path.name, node.module, alias.name) for alias in node.names]
    return found


def test_benches_import_what_exists():
    # the benches run by hand, not in the suite: a name moved out of a module must not leave one unrunnable
    import importlib

    imports, missing = bench_imports(), []
    for bench, module, name in imports:
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(f"{bench}: no module {module}")
            continue
        if not hasattr(imported, name) and f"{module}.{name}" not in MODULES:
            missing.append(f"{bench}: {module} has no {name}")
    assert len(imports) > 50 and not missing, missing
