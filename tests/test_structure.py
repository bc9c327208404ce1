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
# ---------------------------------------------------------------- the run folder's file names


# Files that share a run-folder name but live elsewhere, with why
NOT_RUN_FOLDER_FILES = {
    ("pipeline/kaggle/kernel.py", "config.yaml"): "the kernel bundle's own config file, not a run folder's",
}


def _run_file_names() -> tuple[set[str], set[str]]:
    """(file names spelt only in rundir.py, folder names joined only there)."""
    from pipeline import rundir

    files = {rundir.CONFIG_FILE, rundir.TUNE_FILE, rundir.OOF_CSV, rundir.PROBS_FILE, rundir.IDS_FILE,
             rundir.PREDICT_FILE, rundir.BLEND_FILE, rundir.RUN_LOG_FILE, rundir.WALL_FILE,
             rundir.LEADERBOARD_CSV, *rundir.OOF_FILES}
    return files, {rundir.SHOW_DIR}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (prose may name a file)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = node.body[0] if node.body else None
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                found.add(id(doc.value))
    return found


def run_file_literals(path: Path, files: set[str], folders: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each run-folder file name spelt as a path in `path`: a string that is the
    name, ends in /name or starts with name/, or a folder name joined with `/`. Messages that
    mention a file in prose ("no config.yaml") are not paths and are not counted."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            hits += [(node.lineno, name) for name in files
                     if text == name or text.endswith("/" + name) or text.startswith(name + "/")]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            if node.right.value in files | folders:
                hits.append((node.lineno, node.right.value))
    return sorted(set(hits))


def test_the_literals_reader_finds_paths_not_prose(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""Writes tune.json."""\n'
                      'a = run / "tune.json"\n'
                      'b = "submissions/leaderboard.csv"\n'
                      'c = run / "show" / "x.png"\n'
                      'd = f"{run}: no tune.json yet"\n'
                      'sub.add_parser("show")\n')
    assert run_file_literals(source, {"tune.json", "submissions/leaderboard.csv"}, {"show"}) == [
        (2, "tune.json"), (3, "submissions/leaderboard.csv"), (4, "show")]


def test_run_folder_file_names_are_spelt_only_in_rundir():
    files, folders = _run_file_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent).as_posix()
        if where == "pipeline/rundir.py":
            continue
        found += [f"{where}:{line}: {name!r}" for line, name in run_file_literals(path, files, folders)
                  if (where, name) not in NOT_RUN_FOLDER_FILES]
    assert not found, "use pipeline.rundir.RunDir (or its constants) instead of:\n" + "\n".join(found)
