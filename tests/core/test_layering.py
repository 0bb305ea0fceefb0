"""The package's shape: stages whose dependencies point one way, no import cycles, and a
torch-free runtime (docs/ARCHITECTURE.md draws it).

Every import counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from locations import ROOT

#: lowest first; a module may import from its own stage and the stages below it.
STAGES: tuple[tuple[str, ...], ...] = (
    ("speckv", "speckv.errors", "speckv.atomic", "speckv.paths", "speckv.machine"),
    ("speckv.runtime",),
    ("speckv.prompts", "speckv.records", "speckv.policies"),
    ("speckv.llm",),
    ("speckv.decode",),
    ("speckv.engines",),
    ("speckv.profile",),
    ("speckv.train",),
    ("speckv.export",),
    ("speckv.evaluate",),
    ("speckv.distill",),
    ("speckv.integrations",),
    ("speckv.cli", "speckv.__main__"),
)
#: what the runtime may never pull in (it installs with numpy and onnxruntime alone).
HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers", "onnx", "pandas",
         "pyarrow", "onnxscript")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "speckv").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute or relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # ``from pkg import module`` depends on the module, ``from pkg import name`` on pkg
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                      for a in node.names}
    return found


def _own(target: str) -> str | None:
    """The speckv module an import resolves to (``speckv.x.y.func`` -> ``speckv.x.y``)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _stage(name: str) -> int:
    best = -1, 0
    for i, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = i, len(prefix)
    if best[0] < 0:
        raise AssertionError(f"{name} belongs to no stage: add it to STAGES and the docs")
    return best[0]


GRAPH = {name: {t for t in map(_own, _imports(name, path)) if t and t != name}
         for name, path in MODULES.items()}


def test_every_module_has_a_stage():
    for name in MODULES:
        _stage(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_from_a_higher_stage(name):
    mine = _stage(name)
    upward = sorted(t for t in GRAPH[name] if _stage(t) > mine)
    assert not upward, f"{name} (stage {mine}) imports from higher stages: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_runtime_imports_nothing_heavy_statically():
    for name, path in MODULES.items():
        if _stage(name) > 1:
            continue
        heavy = {i.split(".")[0] for i in _imports(name, path)} & set(HEAVY)
        assert not heavy, f"{name} imports {sorted(heavy)}"


def test_the_runtime_pulls_in_nothing_heavy_when_imported():
    code = ("import sys, speckv.runtime, speckv.machine, speckv.paths; "
            f"print(sorted(set(m.split('.')[0] for m in sys.modules) & {set(HEAVY)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_checker_sees_a_violation_and_a_cycle():
    """The rules above fail when they should: a fake upward import and a fake cycle."""
    assert _stage("speckv.runtime.features") < _stage("speckv.train.network")
    saved = dict(GRAPH)
    try:
        GRAPH["speckv.runtime.features"] = {"speckv.train.network"}
        with pytest.raises(AssertionError, match="higher stages"):
            test_no_module_imports_from_a_higher_stage("speckv.runtime.features")
        GRAPH["speckv.records"] = {"speckv.policies"}
        GRAPH["speckv.policies"] = {"speckv.records"}
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
