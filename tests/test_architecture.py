"""The package's shape: no import cycle, dependencies pointing one way, Optuna's internals and the trial
attributes behind their one module each, and a start-up without the ML stack where none is needed.

The imports are read from the source (module level and inside functions alike); ``if TYPE_CHECKING:``
blocks are skipped, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "yoloprune"

#: Lower layers never import higher ones (a package may import itself and anything below it).
LAYERS = [
    {"errors", "log", "tables", "device", "registry", "offline", "atomic"},
    {"spaces"},
    {"config"},
    {"storage", "data"},
    {"ultra"},
    {"pruning"},
    {"convert"},
    {"evaluators"},
    {"experiment"},
    {"search"},
    {"deploy"},
    {"demo"},
    {"cli", "api"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}

#: The only modules that may touch Optuna's internals (the adapter and its storage half), and the only ones that
#: read or write trial attributes.
ADAPTER = "yoloprune.storage.optuna_adapter"
ADAPTERS = (ADAPTER, "yoloprune.storage.optuna_storage")
RECORD = "yoloprune.storage.record"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except those under ``if TYPE_CHECKING:``."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        nodes.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(module: str, path: Path) -> set[str]:
    """Absolute names ``module`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {n for n in _imports(m, p) if n in modules and n != m} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_package_has_a_layer():
    tops = {_top(m) for m in _modules()} - {""}
    assert tops <= set(RANK), f"put {sorted(tops - set(RANK))} in a layer of LAYERS"


def test_dependencies_point_down_the_layers():
    upward = [
        f"{a} -> {b}"
        for a, targets in _graph().items()
        for b in targets
        if _top(a) and _top(b) and _top(a) != _top(b) and RANK[_top(a)] < RANK[_top(b)]
    ]
    assert upward == [], "imports against the layering (cli -> deploy -> search -> experiment -> evaluators ...)"


def _optuna_internals(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optuna"):
            modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names if a.name.startswith("optuna")]
        elif isinstance(node, ast.Attribute) and node.attr in ("_storage", "_trial_id", "_study_id", "_backend"):
            found.append(f"line {node.lineno}: .{node.attr}")
            continue
        else:
            continue
        found += [f"line {node.lineno}: {m}" for m in modules if any(p.startswith("_") for p in m.split(".")[1:])]
    return found


def test_only_the_adapter_touches_optuna_internals():
    offenders = {m: found for m, p in _modules().items() if m not in ADAPTERS and (found := _optuna_internals(p))}
    assert offenders == {}


def _bare_trial_attrs(path: Path) -> list[str]:
    """Trial user attributes read or written without the record (a study's own attributes are allowed)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("user_attrs", "set_user_attr"):
            owner = ast.unparse(node.value)
            if not owner.split(".")[-1].lstrip("_").endswith("study"):
                found.append(f"line {node.lineno}: {owner}.{node.attr}")
        if isinstance(node, ast.Call) and any(k.arg == "user_attrs" for k in node.keywords):
            found.append(f"line {node.lineno}: user_attrs=")
    return found


def test_trial_attributes_go_through_the_record():
    offenders = {
        m: found for m, p in _modules().items() if m not in (*ADAPTERS, RECORD) and (found := _bare_trial_attrs(p))
    }
    assert offenders == {}


def test_the_attribute_check_sees_a_bare_key(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('x = trial.user_attrs["metrics"]\ny = study.user_attrs\nstudy.enqueue_trial({}, user_attrs={})\n')
    assert sorted(_bare_trial_attrs(bad)) == ["line 1: trial.user_attrs", "line 3: user_attrs="]


@pytest.mark.parametrize(
    "module",
    ["yoloprune", "yoloprune.config", "yoloprune.storage", "yoloprune.search.results", "yoloprune.search.report"],
)
def test_results_and_reports_start_without_the_ml_stack(module):
    code = (
        f"import sys; import {module}; "
        "print(','.join(m for m in ('torch', 'torch_pruning', 'ultralytics') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing {module} loads {loaded}"


def test_functions_stay_short():
    """No function over 80 lines, except the argparse builder (one flat list of options)."""
    long = [
        f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for m, p in _modules().items()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 80
        and (m, node.name) != ("yoloprune.cli", "_parser")
    ]
    assert long == []


def test_modules_are_mid_sized():
    sizes = sorted(len(p.read_text().splitlines()) for p in _modules().values())
    median = sizes[len(sizes) // 2]
    assert 100 <= median <= 300, f"median module {median} lines"
