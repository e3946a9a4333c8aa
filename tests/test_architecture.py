"""The shape of the code (docs/architecture.md): no import cycle inside the package, one place that
builds the abstract model, comments that cite the repository's own docs."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "scaling_sparse"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: pathlib.Path) -> set[str]:
    """Package modules imported when `path` is imported (module level; imports inside functions run
    later and cannot form an import-time cycle)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("scaling_sparse")}


def test_no_import_cycle_inside_the_package():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in top_level_imports(path) if m in modules and m != name} for name, path in modules.items()}
    # A module also imports its package's __init__ first.
    for name in modules:
        parent = name.rsplit(".", 1)[0]
        if parent != name and parent in modules and parent != "scaling_sparse":
            graph[name].add(parent)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
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
