"""The package's shape: imports flow one way (no cycles, lazy and TYPE_CHECKING imports included),
tasks never import the loop, and no module grows past about 400 lines."""

import ast
import pathlib

import dgae_jax

ROOT = pathlib.Path(dgae_jax.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps - {"dgae_jax"}
    return graph


def test_no_import_cycles():
    graph = project_imports()
    state: dict[str, str] = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_layers():
    graph = project_imports()
    assert graph["dgae_jax.errors"] == set()
    loop = {"dgae_jax.trainer", "dgae_jax.steps", "dgae_jax.main"} | {
        name for name in graph if name.split(".")[:2] == ["dgae_jax", "modes"]}
    for name, deps in graph.items():
        if name.startswith("dgae_jax.tasks."):
            assert not deps & loop, f"{name} imports the loop or a mode: {deps & loop}"
    for name in ("dgae_jax.cache.format", "dgae_jax.cache.reader"):  # read in grain workers
        source = (ROOT / (name.split(".", 1)[1].replace(".", "/") + ".py")).read_text()
        assert "import jax" not in source and "from jax" not in source, name


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def is_task_name(node) -> bool:
    """`x.task`, `x.get('task')` or `x['task']`: a run's task name."""
    if isinstance(node, ast.Attribute):
        return node.attr == "task"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return (node.func.attr == "get" and bool(node.args)
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "task")
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            and node.slice.value == "task")


def test_no_task_switch_outside_tasks():
    """What differs between tasks is the task's to say (tasks/): outside it, no code compares a
    run's task with a named one (`config.task == 'ldm'`, `config.task in ('autoencoder', ...)`).
    Looking a task up or asking whether a mode serves it is not a switch."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.parent.name == "tasks":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named = any(isinstance(n, ast.Constant) and isinstance(n.value, str)
                        for side in sides for n in ast.walk(side))
            if named and any(is_task_name(side) for side in sides):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_no_test_module_imports_another_or_conftest():
    """What tests share lives in helpers.py, fakes.py and multiprocess.py: importing a test
    module or conftest (also from a subprocess script) would run its set-up and tie the two."""
    tests = pathlib.Path(__file__).parent
    forbidden = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    needles = [f"{verb} {name}" for verb in ("from", "import") for name in ("test_", "conftest")]
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [n for n in needles if n in node.value]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names
                      if n.split(".")[0] in forbidden or n in needles]
    assert not found, found
