"""The import graph between the stages that share a seam: ``nnfast.train``, ``nnfast.infer`` and ``nnfast.evaluate``.

Every ``import`` statement is read with :mod:`ast` (module level and inside functions alike), so a lazy import counts
as much as a top-level one. Training must not depend on inference or evaluation (the final validation is a callable
its caller passes in), and the three packages must not import each other in a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path


import nnfast

ROOT = Path(nnfast.__file__).parent
STAGES = ("train", "infer", "evaluate")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from X import y`` counts as X and X.y)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            out.add("<import by string>")
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "nnfast" and parts[1] in STAGES else None


def _stage_graph() -> dict[str, dict[str, set[str]]]:
    """stage -> imported stage -> the files that import it."""
    graph: dict[str, dict[str, set[str]]] = {s: {} for s in STAGES}
    for stage in STAGES:
        for path in sorted((ROOT / stage).rglob("*.py")):
            for mod in _imports(path):
                other = _stage(mod)
                if other is not None and other != stage:
                    graph[stage].setdefault(other, set()).add(str(path.relative_to(ROOT.parent)))
    return graph


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "nnfast" / "infer"
    pkg.mkdir(parents=True)
    f = pkg / "m.py"
    f.write_text("from .. import layout\nfrom ..evaluate.metrics import x\n\ndef g():\n    from .model import y\n"
                 "    import importlib\n    importlib.import_module('nnfast.train')\n")
    global ROOT
    old, ROOT = ROOT, tmp_path / "nnfast"
    try:
        found = _imports(f)
    finally:
        ROOT = old
    assert {"nnfast.layout", "nnfast.evaluate.metrics", "nnfast.infer.model", "<import by string>"} <= found


def test_train_imports_neither_infer_nor_evaluate():
    graph = _stage_graph()
    assert graph["train"] == {}, graph["train"]
    for path in sorted((ROOT / "train").rglob("*.py")):
        assert "<import by string>" not in _imports(path), path


def test_no_import_cycle_between_train_infer_evaluate():
    graph = _stage_graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(stage: str, path: list[str]) -> None:
        seen[stage] = 1
        for other in graph[stage]:
            if seen.get(other) == 1:
                raise AssertionError(f"import cycle {' -> '.join(path + [other])}: {graph}")
            if other not in seen:
                visit(other, path + [other])
        seen[stage] = 2

    for s in STAGES:
        if s not in seen:
            visit(s, [s])
