"""The package's import graph, read from the sources with `ast`: no import circle among the
pipeline's modules, and only the commands that train import pipeline/train_fold.py.

Every `import pipeline...` / `from pipeline... import` counts, at module level or inside a
function (a lazy import is still a dependency); those under `if TYPE_CHECKING:` do not run
and are left out. Relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# The commands that train: the CLI, `pipeline all` (stages) and the fold runner.
MAY_IMPORT_TRAIN = {"pipeline.cli", "pipeline.run_all", "pipeline.train_folds"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_running_code(tree: ast.AST):
    """ast.walk, skipping the bodies of `if TYPE_CHECKING:` (their else branches run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The pipeline modules that `path` imports (anywhere in its running code)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk_running_code(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "pipeline":
                continue
            for alias in node.names:  # `from pipeline import fileio` imports the module pipeline.fileio
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    graph = import_graph()
    assert "pipeline.train_fold" in graph["pipeline.train_folds"]  # imported inside train_folds
    assert "pipeline.fileio" in graph["pipeline.rundir"]  # `from pipeline import fileio`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_among_the_pipeline_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_only_the_commands_that_train_import_train_py():
    importers = {m for m, targets in import_graph().items() if "pipeline.train_fold" in targets}
    assert importers <= MAY_IMPORT_TRAIN, sorted(importers - MAY_IMPORT_TRAIN)


MAX_PARAMETERS = 8


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    """Positional and keyword-only parameters (self/cls of a method left out); *args and
    **kwargs one each."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    if in_class and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)


def wide_functions(tree: ast.AST, where: str) -> list[str]:
    found = []

    def visit(node, in_class):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = parameter_count(child, in_class)
                if count > MAX_PARAMETERS:
                    found.append(f"{where}:{child.lineno} {child.name} ({count})")
                visit(child, False)
            else:
                visit(child, isinstance(child, ast.ClassDef) or (in_class and not isinstance(child, ast.ClassDef)))

    visit(tree, False)
    return found


def test_the_parameter_counter_counts_what_a_caller_passes():
    tree = ast.parse("class A:\n    def m(self, a, b, *args, c, **kw): pass\ndef f(a, /, b, *, c=1): pass\n")
    method, function = tree.body[0].body[0], tree.body[1]
    assert parameter_count(method, True) == 5 and parameter_count(function, False) == 3


# Wider today, outside the training chain (issue 32.3 folded train_fold.py's): each is a
# keyword-heavy entry point; listed so that no new one appears and these can only shrink.
KNOWN_WIDE = {"blend.py blend_runs", "kernel.py build_kernel"}


def test_no_pipeline_function_takes_more_than_eight_parameters():
    """A step that needs more shares state through one object (e.g. train_fold.FoldContext)."""
    wide = {f"{found.split(':')[0]} {found.split()[1]}" for path in sorted(PACKAGE.rglob("*.py"))
            for found in wide_functions(ast.parse(path.read_text(encoding="utf-8")), path.name)}
    assert wide - KNOWN_WIDE == set()
    assert KNOWN_WIDE - wide == set(), "narrowed: take it off KNOWN_WIDE"
