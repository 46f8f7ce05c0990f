"""Every module of the project imports alone, and no two of its modules import each other, even inside a function.

An import tucked into a function can hide a cycle (a imports b at the top, b imports a when called): it works until
someone moves it up, or imports b first. The static check reads every import statement with `ast`, wherever it
stands, and fails naming the cycle and the lines that make it.
"""
import ast
import subprocess
import sys
import time

from tests.helpers import ROOT, trainer_env

PACKAGES = ("common", "data", "trainer", "bench", "launch")


def project_modules() -> dict:
    """{dotted module name: path} of every .py file of PACKAGES (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list:
    """The dotted names an import statement reads: `import a.b` -> a.b; `from a import b` -> a.b (a module or a
    name in a), relative imports resolved against `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph(modules: dict) -> dict:
    """{module: {imported project module: line}}: every import statement, top-level or inside a function. Importing
    a.b.c runs a and a.b first, so those count too, except a module's own packages, which are already importing."""
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1 + is_package)}
        edges = graph.setdefault(module, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(node, module, is_package):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    target = ".".join(parts[:i])
                    if target in modules and target != module and target not in own_packages:
                        edges.setdefault(target, node.lineno)
    return graph


def find_cycle(graph: dict):
    """One cycle as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the DFS stack, "done" after

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, {})):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target, stack)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            return cycle
    return None


def describe(cycle: list, graph: dict, modules: dict) -> str:
    return "\n".join(f"  {a} -> {b}  ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_the_project_imports_form_no_cycle():
    modules = project_modules()
    graph = import_graph(modules)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe(cycle, graph, modules)


def test_the_cycle_finder_finds_a_cycle_through_a_function_local_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.a": tmp_path / "pkg" / "a.py",
               "pkg.b": tmp_path / "pkg" / "b.py"}
    assert find_cycle(import_graph(modules)) == ["pkg.a", "pkg.b", "pkg.a"]


def _third_party(modules: dict) -> list:
    """Every non-project module the project imports, for the parent of the import children to load once."""
    names = set()
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] not in PACKAGES)


def test_every_module_imports_alone():
    modules = project_modules()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tests.workers.import_alone", "--preload",
                             ",".join(_third_party(modules)), *modules], cwd=ROOT, env=trainer_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    failures = [line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line]
    assert result.returncode == 0 and not failures, result.stderr[-2000:] + "\n".join(
        f"{module}:\n{ast.literal_eval(trace)}" for module, trace in failures)
    print(f"{len(modules)} modules imported alone in {time.perf_counter() - started:.1f} s")
