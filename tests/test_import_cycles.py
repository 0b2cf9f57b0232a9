"""No module of megatron_est takes part in an import cycle, counting function-level imports too: imports flow one
way (config -> est / parallel / model -> training -> validation, planning, evaluation). The graph is read from the
source with ast, so an import hidden inside a function counts like one at the top of the file."""
import ast
import os

from tests.helpers import ROOT


def import_graph(root: str, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (any import statement anywhere in the file)."""
    paths = {}
    for folder, _, files in os.walk(os.path.join(root, package)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)[:-3].replace(os.sep, ".")
                paths[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)

    def owner(name: str):
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                deps.update(owner(f"{base}.{a.name}") or owner(base) for a in node.names)
        graph[mod] = {d for d in deps if d and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_megatron_est_has_no_import_cycle():
    graph = import_graph(ROOT, "megatron_est")
    assert len(graph) > 50 and graph["megatron_est.validation"]  # the walk saw the package
    assert cycles(graph) == []


def test_a_function_level_cycle_is_found(tmp_path):
    """The check can fail: a cycle closed by an import inside a function, and one through a relative import."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("from .d import x\n")
    (pkg / "d.py").write_text("import pkg.c\nx = 1\n")
    assert cycles(import_graph(str(tmp_path), "pkg")) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]
