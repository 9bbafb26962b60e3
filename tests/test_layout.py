"""The code layout shows the design: the engine imports neither the loader, the HTTP side nor
aiohttp; the loader imports neither the HTTP side nor aiohttp; no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "loaders", "serving")


def _imports(path: Path, module_level: bool) -> set[str]:
    """Modules `path` imports: anywhere, or at module level only (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []
    if module_level:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for top in nodes:
        for node in ast.walk(top) if module_level else [top]:
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.add(node.module)
    return out


def _modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES
            for p in sorted((ROOT / pkg).glob("*.py")) if p.stem != "__init__"}


def test_engine_and_loader_import_no_http() -> None:
    refused = {"engine": ("aiohttp", "serving", "loaders"), "loaders": ("aiohttp", "serving")}
    wrong = []
    for name, path in _modules().items():
        banned = refused.get(name.split(".")[0], ())
        for imported in _imports(path, module_level=False):
            if imported.split(".")[0] in banned:
                wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: {i for i in _imports(path, module_level=True) if i in modules}
             for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_a_worker_process_holds_no_loader_code() -> None:
    """The HTTP worker's process (`python -m serving.worker`) imports nothing of the loader."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys, serving.worker; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] == 'loaders'))"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
