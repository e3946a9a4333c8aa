"""The shape of the code (docs/architecture.md): no import cycle inside the package, one place that
builds the abstract model, comments that cite the repository's own docs."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "scaling_sparse"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: pathlib.Path, modules: set[str], importer: str) -> set[str]:
    """Package modules that `path` imports, at module level or inside a function (a lazy import is still
    a dependency: a cycle through one only moves the failure to run time). `from pkg import sub` is a
    dependency on the submodule `pkg.sub`; `from pkg import name` one on `pkg` itself. Importing `pkg.sub`
    also runs `pkg/__init__.py` first, unless `pkg` encloses the importer (its __init__ is already running
    or done): a dependency on `pkg` too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
    enclosing = {importer.rsplit(".", i)[0] for i in range(importer.count(".") + 1)}
    for name in list(found):
        found |= {p for p in (name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)) if p not in enclosing}
    return {m for m in found if m in modules and m != "scaling_sparse"}


def test_no_import_cycle_inside_the_package():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: package_imports(path, set(modules), name) - {name} for name, path in modules.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_abstract_model_is_built_in_one_module():
    users = sorted(str(p.relative_to(ROOT)) for d in ("scaling_sparse", "benchmarks")
                   for p in (ROOT / d).rglob("*.py") if "eval_shape(lambda: build_model" in p.read_text()
                   or "nnx.eval_shape(" in p.read_text())
    assert users == ["scaling_sparse/state.py"]


def test_code_cites_only_the_repositorys_own_docs():
    offenders = [str(p.relative_to(ROOT)) for d in ("scaling_sparse", "benchmarks", "tests")
                 for p in (ROOT / d).rglob("*.py")
                 if any(s in p.read_text() for s in ("reference" + ".md", "design" + ".md", "../" + "shared"))]
    assert offenders == []
    for doc in ("architecture.md", "semantics.md", "benchmarks.md"):
        assert (ROOT / "docs" / doc).is_file()
