"""The project's modules import each other in layers, never in a circle (issue #25): every import of one top-level
module by another, at module level or inside a function (a lazy import is still a dependency), is an edge, and the
graph has no cycle. convert.py is the exports and their command line: no module imports it, only the tests of the
exports and of its command line; every checkpoint loads through model.load_pretrained."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
CONVERT_IMPORTERS = {"test_checkpoints.py", "test_eval_models.py", "test_hf_native.py", "test_loaders.py",
                     "test_trust.py", "test_multi_image.py"}   # convert.main, save_tinyllava, export_llava, llava_blockers, chat templates


def imported(path, names):
    """{module: first line importing it} for the modules in `names` that the file at `path` imports, at any depth:
    module level, functions, try blocks. Relative imports (the modeling file's, as transformers runs it) are not."""
    found = {}
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            targets = [node.module]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in names:
                found.setdefault(target.split(".")[0], node.lineno)
    return found


def import_graph():
    return {m: {k: n for k, n in imported(os.path.join(ROOT, m + ".py"), MODULES).items() if k != m} for m in MODULES}


def find_cycle(graph):
    """A cycle [a, b, ..., a] of the graph {module: {imported: line}}, or None (depth-first search)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[m] = "done"
        path.pop()
        return None
    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {}, "b": {"c": 1}, "c": {"b": 1}}) == ["b", "c", "b"]
    assert imported(os.path.join(ROOT, "check_data.py"), MODULES)["data"] > 1   # a lazy import counts


def test_no_import_circle_among_the_projects_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(
        f"{a}.py (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}.py"


def test_convert_is_imported_only_by_the_tests_of_its_exports():
    modules = [m for m in MODULES if "convert" in imported(os.path.join(ROOT, m + ".py"), {"convert"})]
    tests = {f for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")
             and "convert" in imported(os.path.join(ROOT, "tests", f), {"convert"})}
    assert modules == [] and tests <= CONVERT_IMPORTERS, (modules, sorted(tests - CONVERT_IMPORTERS))
