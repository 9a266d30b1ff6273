"""The shape of the code, checked from the source: imports go one way (no cycle among project
modules, even through imports inside functions; ``refine_more`` imports nothing from ``cohort``;
its layers import only downwards), and modules and functions stay small enough to read
(docs/conventions.md, "Size")."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("refine_more", "cohort")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Over the limits today, with who brings them under it (docs/conventions.md): nothing else may join.
KNOWN_LARGE_MODULES: set = set()
KNOWN_LONG_FUNCTIONS: set = set()


def _modules() -> dict:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    """Project modules that ``name`` imports anywhere in its source (top level or in functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    resolved = set()
    for mod in found:
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            resolved.add(mod)
    return resolved


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    graph = _graph()
    assert "cohort.subject_run" in graph["cohort.tasks"]
    assert "refine_more.reconstruction.recon" in graph["cohort.subject_run"]      # imported inside a function


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_method_does_not_import_the_application():
    bad = {m: sorted(d for d in deps if d.startswith("cohort")) for m, deps in _graph().items()
           if m.startswith("refine_more")}
    assert {m: d for m, d in bad.items() if d} == {}


# The paper's Figure 1 as layers: a module may import its own layer and the layers of lower rank.
# Layers of equal rank are independent of each other (a baseline never uses a network).
LAYER_RANK = {"config": 0, "physics": 1, "files": 2, "baselines": 3, "networks": 3, "evaluation": 3,
              "reconstruction": 4, "cli": 5, "describe": 6}   # describe reads its arguments as cli does
TOP_LEVEL = {"config", "cli", "describe"}


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if module.startswith("refine_more.") else None


def _layer_violations(graph: dict) -> dict:
    bad = {}
    for mod, deps in graph.items():
        layer = _layer(mod)
        if layer is None:
            continue
        for dep in deps:
            dep_layer = _layer(dep)
            if dep_layer is None or dep_layer == layer:
                continue
            if LAYER_RANK[dep_layer] >= LAYER_RANK[layer]:
                bad.setdefault(mod, []).append(dep)
    return bad


def test_every_method_module_sits_in_a_layer():
    top = {m.split(".")[1] for m in _graph() if m.startswith("refine_more.")}
    assert top <= set(LAYER_RANK), top - set(LAYER_RANK)
    loose = sorted(p.name for p in (REPO / "refine_more").glob("*.py")
                   if p.stem not in TOP_LEVEL | {"__init__"})
    assert loose == [], f"modules left loose in refine_more/: {loose}"


def test_layers_import_downwards_only():
    assert _layer_violations(_graph()) == {}


def test_detects_a_layer_violation():
    graph = {"refine_more.physics.scan": {"refine_more.networks.inr"},
             "refine_more.baselines.llr": {"refine_more.networks.unet"},
             "refine_more.reconstruction.recon": {"refine_more.physics.scan", "refine_more.config"}}
    assert _layer_violations(graph) == {"refine_more.physics.scan": ["refine_more.networks.inr"],
                                        "refine_more.baselines.llr": ["refine_more.networks.unet"]}


def test_ray_tasks_do_not_import_the_driver():
    assert not any(d.startswith("cohort.driver") for d in _graph()["cohort.tasks"] | _graph()["cohort.subject_run"])


def test_detects_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _sizes():
    modules, functions = {}, {}
    for path in _modules().values():
        rel = path.relative_to(REPO).as_posix()
        src = path.read_text()
        modules[rel] = len(src.splitlines())
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{rel}::{node.name}"] = node.end_lineno - node.lineno + 1
    return modules, functions


def test_modules_and_functions_are_small():
    modules, functions = _sizes()
    large = {m for m, n in modules.items() if n > MAX_MODULE_LINES}
    long = {f for f, n in functions.items() if n > MAX_FUNCTION_LINES}
    assert large - KNOWN_LARGE_MODULES == set(), {m: modules[m] for m in large - KNOWN_LARGE_MODULES}
    assert long - KNOWN_LONG_FUNCTIONS == set(), {f: functions[f] for f in long - KNOWN_LONG_FUNCTIONS}


def test_known_exceptions_are_still_needed():
    """An exception that is no longer over the limit is taken off the list."""
    modules, functions = _sizes()
    assert {m for m in KNOWN_LARGE_MODULES if modules.get(m, 0) <= MAX_MODULE_LINES} == set()
    assert {f for f in KNOWN_LONG_FUNCTIONS if functions.get(f, 0) <= MAX_FUNCTION_LINES} == set()
