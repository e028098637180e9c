"""Structure of the ``mla_plugin`` package, read from its source with ``ast`` (nothing imported):

- no import cycle between its modules;
- no Python function over 80 lines, except a ``@triton.jit`` kernel body (splitting one would
  hurt the compiler; each says so in a comment).

Import edges: every ``import mla_plugin.x`` / ``from mla_plugin.x import y`` / relative import
anywhere in a module, at module level *and* inside functions or methods (a deferred import
that closes a cycle only hides it: the two modules still cannot be understood or loaded apart),
except under ``if TYPE_CHECKING:``. ``from pkg import name`` is an edge to ``pkg.name`` when that
is a module of the package, else to ``pkg``. The implicit import of parent packages is not an
edge (a package's ``__init__`` importing its own submodules is not a cycle).

Function length: from the first statement of the body after the docstring to the end of the
last statement.
"""

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "mla_plugin"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules(root: Path) -> dict[str, Path]:
    return {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom in the tree, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if _is_type_checking_block(child):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (see the module docstring)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: level 1 is this module's package
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            found.add(submodule if submodule in modules else target)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports, for the package at ``root``."""
    modules = _package_modules(root)
    return {name: _imported_modules(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _is_triton_kernel(node: ast.AST) -> bool:
    return any(ast.unparse(d.func if isinstance(d, ast.Call) else d) in ("triton.jit", "jit")
               for d in node.decorator_list)


def function_lengths():
    """(module path, qualified-ish name, body lines) for every function and method in the package."""
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_triton_kernel(node):
                continue
            body = node.body
            if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                body = body[1:]
            if body:
                yield path.relative_to(PACKAGE_ROOT.parent), node.name, body[-1].end_lineno - body[0].lineno + 1


def test_cycle_finder_sees_a_deferred_cycle(tmp_path):
    """The finder itself, on a made-up package: a function-level import (absolute or relative)
    closing a loop is a cycle; a TYPE_CHECKING import and a package importing its submodule are not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("from pkg.sub import b\nfrom typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from pkg import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import pkg.c\n")
    (pkg / "c.py").write_text("def late():\n    from .sub.b import x\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.sub.b"}}
    assert import_cycles(graph) == [["pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("def late():\n    import json\n")
    assert import_cycles(import_graph(pkg)) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_graph_sees_the_package():
    """The graph reads real edges (so an empty cycle list is not an empty graph)."""
    graph = import_graph()
    assert "mla_plugin.convert.pipeline" in graph["mla_plugin.convert.mla_to_gla"]
    assert "mla_plugin.convert.safetensors_stream" in graph["mla_plugin.convert.pipeline"]
    assert sum(len(edges) for edges in graph.values()) > 100


def test_no_import_cycle_in_the_package():
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles (strongly connected modules): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_function_over_80_lines():
    lengths = list(function_lengths())
    assert len(lengths) > 300  # the walk saw the package's functions
    long = [f"{path}:{name} ({lines} lines)" for path, name, lines in lengths if lines > MAX_FUNCTION_LINES]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(long)
