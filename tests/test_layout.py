"""The shape of the house (issue 24): who imports whom, and where each mode lives. Read from the source
with `ast` (every import, at module level or inside a function), so a lazy import counts too."""

import ast
from pathlib import Path
from typing import get_args

PACKAGE = Path(__file__).resolve().parent.parent / "evomerge"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("evomerge")}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_rules():
    graph = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    for name, deps in graph.items():
        if name.startswith("evomerge.search.modes"):  # modes reach the loop only through Loop
            assert not {d for d in deps if d in ("evomerge.search.run", "evomerge.experiment")}, name
        if name.startswith("evomerge.merge.kernels"):  # kernels are pure tensor functions
            assert not deps - {d for d in deps if d.startswith("evomerge.merge.kernels")}, (name, deps)
    assert not {d for d in graph["evomerge.export"] if d.startswith("evomerge.report")}
    assert not {d for d in graph["evomerge.results"] if d.startswith(("evomerge.report", "evomerge.export"))}
    # the loop opens no model and no task itself: experiment.search_inputs hands it what it needs
    assert not {
        d for d in graph["evomerge.search.run"] if d.startswith(("evomerge.models", "evomerge.evaluate"))
    }
    # the loop's strategies import nothing above them: no circle through search.run
    for name in ("evomerge.search.schedule", "evomerge.search.finals", "evomerge.search.fidelity"):
        assert "evomerge.search.run" not in graph[name], name


def test_every_fidelity_mode_is_one_registered_module():
    from evomerge.evaluate.spec import Mode
    from evomerge.search.modes import MODES

    assert set(MODES) == set(get_args(Mode))
    for name, mode in MODES.items():
        assert mode.name == name
        assert (PACKAGE / "search" / "modes" / f"{name}.py").is_file()
    import re

    run = (PACKAGE / "search" / "run.py").read_text()
    assert not re.search(r"mode\s*[!=]=", run)  # the loop never asks which mode it runs


def test_workers_never_see_auto():
    import re

    for module in ("runtime/worker.py", "merge/engine.py"):  # resolved once, in runtime/plan.py
        text = (PACKAGE / module).read_text()
        assert not re.search(r"(placement|pin_memory|dtype|device)[^\n]*\"auto\"", text), module


def test_no_import_circles():
    """No module reaches back, directly or round about, into one that imports it (lazy imports count)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    graph = {m: {d for d in map(known, _imports(p)) if d and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, " -> ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
