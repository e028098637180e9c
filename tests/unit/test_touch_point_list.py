"""The list of vLLM touch points, without vLLM: docs/touch_points.md agrees with it, only compat.py imports
vLLM, the plugin's modules import each other without cycles, and a moved internal gives
one message naming the vLLM version and every touch point that moved."""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import mla_plugin
from mla_plugin.vllm import touch_points
from mla_plugin.vllm.touch_points import (
    REGISTRATION,
    TouchPoint,
    VLLMTouchPointError,
    has,
    has_fields,
    readme_table,
    source_mentions,
    starts_with,
    takes,
)

PACKAGE = Path(mla_plugin.__file__).parent
TOUCH_POINTS_PAGE = PACKAGE.parent / "docs" / "touch_points.md"  # linked from the README
# vLLM's public API (not internals) may be imported where an engine is started.
PUBLIC_VLLM_NAMES = {"LLM", "SamplingParams"}


def test_docs_list_every_touch_point():
    text = TOUCH_POINTS_PAGE.read_text()
    start, end = "<!-- touch-points:start -->\n", "<!-- touch-points:end -->"
    assert start in text and end in text, "docs/touch_points.md lost the touch-point markers"
    listed = text[text.index(start) + len(start):text.index(end)].strip()
    assert listed == readme_table(), (
        "docs/touch_points.md's vLLM table differs from mla_plugin/vllm/touch_points.py; paste "
        "mla_plugin.vllm.touch_points.readme_table() between the markers")


def test_touch_points_are_well_formed():
    names = [p.name for p in touch_points.TOUCH_POINTS]
    assert len(names) == len(set(names)), "touch point names must be unique"
    for point in touch_points.TOUCH_POINTS:
        module, _, qualname = point.internal.partition(":")
        assert module.startswith("vllm") and qualname, point
        assert point.stage in (touch_points.REGISTRATION, touch_points.DEEPSEEK_IMPORT), point
        assert point.use and "|" not in point.use, point  # one Markdown table cell


def _vllm_imports(path: Path) -> list[tuple[int, str, set[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, set()) for a in node.names if a.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "vllm":
            found.append((node.lineno, node.module, {a.name for a in node.names}))
    return found


def test_only_compat_imports_vllm_internals():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "vllm" / "compat.py":
            continue
        for line, module, names in _vllm_imports(path):
            if not (module == "vllm" and names and names <= PUBLIC_VLLM_NAMES):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} {sorted(names)}")
    assert not offenders, "import vLLM internals through mla_plugin/vllm/compat.py:\n" + "\n".join(offenders)


def _plugin_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("mla_plugin"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mla_plugin"))
    return out


def test_vllm_integration_has_no_import_cycle():
    """registration.py and deepseek_hook.py once imported each other; no module of
    mla_plugin.vllm may reach itself through imports (lazy ones included)."""
    modules = {f"mla_plugin.vllm.{p.stem}": p for p in (PACKAGE / "vllm").glob("*.py") if p.stem != "__init__"}
    graph = {name: _plugin_imports(path) & set(modules) for name, path in modules.items()}

    def reaches(start: str, target: str, seen: set) -> bool:
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and (seen.add(nxt) or reaches(nxt, target, seen))):
                return True
        return False

    cycles = [name for name in graph if reaches(name, name, set())]
    assert not cycles, {name: sorted(graph[name]) for name in cycles}


def test_backend_names_are_defined_once():
    literals = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in mla_plugin.BACKEND_NAMES:
                literals.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not literals, f"use mla_plugin.MLA_BACKEND_NAME / GLA_BACKEND_NAME instead of literals: {literals}"


# -- the checks and the one message --------------------------------------------------


def _target(a, b, *, c=None, **extra):
    """self.W_UK_T is read here."""


@dataclass
class _Fields:
    x: int = 0


def test_checks_say_what_changed():
    assert takes("a", "c")(_target) == []
    assert "['d']" in takes("a", "d")(_target)[0]
    assert starts_with("a", "b")(_target) == []
    assert starts_with("b", "a")(_target) != []
    assert has_fields("x")(_Fields) == [] and has_fields("y")(_Fields) != []
    assert has("__name__")(_target) == [] and has("nope")(_target) != []
    assert source_mentions("self.W_UK_T")(_target) == []
    assert source_mentions("self.W_UV")(_target) != []


def test_verify_raises_one_message_naming_version_and_every_moved_internal(monkeypatch):
    fake = (
        TouchPoint("still there", "json:dumps", "kept", takes("obj")),
        TouchPoint("renamed", "json:no_such_function", "we call it", takes("x")),
        TouchPoint("reshaped", "json:loads", "we pass x", takes("x")),
        TouchPoint("other stage", "json:gone_too", "not checked now", takes("x"), stage="elsewhere"),
    )
    monkeypatch.setattr(touch_points, "TOUCH_POINTS", fake)
    monkeypatch.setattr(touch_points, "vllm_version", lambda: "9.9.9")
    with pytest.raises(VLLMTouchPointError) as err:
        touch_points.verify(REGISTRATION)
    message = str(err.value)
    assert "vLLM 9.9.9" in message and "2 vLLM internal(s)" in message
    assert "renamed (json:no_such_function" in message and "missing" in message
    assert "reshaped (json:loads" in message and "takes no parameter(s) ['x']" in message
    assert "still there" not in message and "other stage" not in message
    assert "install one of those" in message  # says how to fix it


def test_verify_passes_when_nothing_moved(monkeypatch):
    monkeypatch.setattr(touch_points, "TOUCH_POINTS", (TouchPoint("ok", "json:dumps", "kept", takes("obj")),))
    touch_points.verify(REGISTRATION)


def test_signature_checks_read_classes_by_init():
    class Layer:
        def __init__(self, num_heads, scale):
            pass

    assert starts_with("num_heads", "scale")(Layer) == []
