"""Every module of the installed package imports, and every third-party import is declared.

A package installed by hand on the developer's machine once hid an undeclared ``jiwer`` from CI: a fresh
machine failed at ``make demo`` and ``make test``. ``.ci/run`` now installs into a new venv; these tests
say which module or import is at fault when that install misses something.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).parents[1]
SOURCE_DIRS = ("speechlm", "adapters", "speech_io", "finetune")
# import names whose distribution is named otherwise, for when it is not installed where the test runs
DISTRIBUTION_OF = {"whisper": "openai-whisper", "piper": "piper-tts", "yaml": "pyyaml"}


def package_modules() -> list[str]:
    # Walk each package pyproject declares: an editable install maps adapters/, speech_io/ and finetune/
    # under speechlm by an import hook, so they are not in the folder speechlm.__path__ names.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    modules = set(packages)
    for name in packages:
        package = importlib.import_module(name)
        modules |= {info.name for info in pkgutil.iter_modules(package.__path__, f"{name}.")}
    return sorted(modules)


def test_the_package_has_its_subpackages():
    modules = package_modules()
    for name in ("speechlm.adapters.modeling", "speechlm.speech_io.processor", "speechlm.finetune.metrics",
                 "speechlm.demo.job", "speechlm.cli"):
        assert name in modules


@pytest.mark.parametrize("module", package_modules())
def test_every_module_imports(module):
    importlib.import_module(module)


def normalized(name: str) -> str:
    return re.split(r"[<>=!~\[; ]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    declared = {normalized(requirement) for requirement in requirements}
    # installed by the Makefile with --no-deps (their declared dependencies are not ours)
    for line in re.findall(r"pip[^\n]*install[^\n]*--no-deps[^\n]*", (ROOT / "Makefile").read_text()):
        declared |= {normalized(word) for word in line.split() if "==" in word}
    return declared


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module name -> the source files that import it (function-level imports included)."""
    found: dict[str, set[str]] = {}
    for directory in SOURCE_DIRS:
        for path in (ROOT / directory).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("speechlm", *SOURCE_DIRS):
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    installed = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    undeclared = []
    for module, files in sorted(third_party_imports().items()):
        candidates = {normalized(d) for d in installed.get(module, [])} | {DISTRIBUTION_OF.get(module, module)}
        if not candidates & declared:
            undeclared.append(f"{module} (imported by {', '.join(sorted(files))})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)
