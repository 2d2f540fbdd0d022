"""The package's layout stays the one docs/architecture.md describes: layer folders that import only the layers below
them, no import circle between modules, no module over 450 lines, and one training loop short enough to read."""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "dia_diffusion"
# Lowest first: a layer may import itself and the layers before it, never one after it.
LAYERS = ("runtime", "hub", "models", "data", "pipelines", "evaluation", "training", "commands")
MAX_MODULE_LINES = 450
MAX_TRAINING_LOOP_LINES = 150
SOURCE_FOLDERS = ("dia_diffusion", "benchmarks", "train", "pipelines", "tests")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every known module that `path` imports, at any depth of its code (TYPE_CHECKING and function-level imports
    included: a circle hidden there is still a circle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph(root: Path, files: list[Path]) -> dict[str, set[str]]:
    modules = {module_name(path, root): path for path in files}
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a list of modules, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            return circle
    return None


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_package_has_no_import_circle():
    graph = import_graph(REPO_ROOT, sorted(PACKAGE.rglob("*.py")))
    assert find_circle(graph) is None


def test_the_benchmarks_have_no_import_circle():
    # The benchmark scripts import each other by bare name, as modules beside the script.
    graph = import_graph(REPO_ROOT / "benchmarks", sorted((REPO_ROOT / "benchmarks").glob("*.py")))
    assert find_circle(graph) is None


def test_the_circle_finder_finds_a_circle_and_accepts_a_chain():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_module_of_the_package_sits_in_a_layer_folder():
    loose = [path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py"]
    assert loose == []
    folders = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file())
    assert folders == sorted(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    graph = import_graph(REPO_ROOT, sorted(PACKAGE.rglob("*.py")))
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    upward = {
        f"{module} -> {target}"
        for module, targets in graph.items()
        if layer_of(module) == layer
        for target in targets
        if target == "dia_diffusion" or layer_of(target) not in allowed
    }
    assert upward == set()


def test_no_module_is_over_450_lines():
    long_modules = {
        str(path.relative_to(REPO_ROOT)): length
        for folder in SOURCE_FOLDERS
        for path in (REPO_ROOT / folder).rglob("*.py")
        if (length := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long_modules == {}


def test_the_one_training_loop_stays_readable():
    """Every task shares `train`; what differs per task lives in a task object (training/tasks.py), not in it."""
    module = ast.parse((PACKAGE / "training" / "loop.py").read_text())
    (train,) = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= MAX_TRAINING_LOOP_LINES
