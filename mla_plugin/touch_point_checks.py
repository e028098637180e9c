"""The checks behind each framework's touch-point list, shared by vLLM's and SGLang's.

A touch point names a framework internal as ``"module.path:Attribute.sub"`` and carries a
check: a function of the resolved object that returns what is wrong with it ([] when it is
as expected). The builders below make such checks; ``problems`` resolves a point and runs
its check; ``readme_table`` renders a list for the README. Nothing here imports a
framework (``resolve`` imports the named module only when a point is checked). The lists
themselves, their error classes, version functions and ``verify()`` live in
``mla_plugin/vllm/touch_points.py`` and ``mla_plugin/sglang/touch_points.py``.
"""

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable

Check = Callable[[object], list[str]]


# -- check builders ------------------------------------------------------------------


def _parameters(obj) -> list[inspect.Parameter]:
    """A callable's parameters (a class's __init__'s), without self / cls."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = list(inspect.signature(target).parameters.values())
    return [p for p in params if p.name not in ("self", "cls")]


def exists() -> Check:
    return lambda obj: []


def takes(*names: str) -> Check:
    """A callable (or a class's __init__) with parameters of these names."""

    def check(obj) -> list[str]:
        have = {p.name for p in _parameters(obj)}
        missing = [n for n in names if n not in have]
        return [f"takes no parameter(s) {missing}; has {sorted(have)}"] if missing else []

    return check


def starts_with(*names: str) -> Check:
    """A callable whose leading parameters are exactly these, in this order (we pass them by position)."""

    def check(obj) -> list[str]:
        have = [p.name for p in _parameters(obj)][: len(names)]
        return [] if have == list(names) else [f"leading parameters are {have}, expected {list(names)}"]

    return check


def _has_static(obj, attribute: str) -> bool:
    """hasattr without __getattr__ fallbacks (vLLM's Platform answers None to any name)."""
    try:
        inspect.getattr_static(obj, attribute)
    except AttributeError:
        return False
    return True


def has(*attributes: str, static: bool = True) -> Check:
    """An object with these attributes: found by static lookup (no __getattr__ fallback
    counts), or with ``static=False`` by plain ``hasattr``."""
    found = _has_static if static else hasattr

    def check(obj) -> list[str]:
        missing = [a for a in attributes if not found(obj, a)]
        return [f"has no attribute(s) {missing}"] if missing else []

    return check


def has_fields(*names: str) -> Check:
    """A dataclass or NamedTuple with these fields."""

    def check(obj) -> list[str]:
        if dataclasses.is_dataclass(obj):
            have = {f.name for f in dataclasses.fields(obj)}
        else:
            have = set(getattr(obj, "_fields", ()))
        missing = [n for n in names if n not in have]
        return [f"has no field(s) {missing}"] if missing else []

    return check


def source_mentions(*snippets: str) -> Check:
    """The object's source still contains these snippets (attributes the framework reads or sets internally)."""

    def check(obj) -> list[str]:
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError):
            return ["has no readable source to check"]
        missing = [s for s in snippets if s not in source]
        return [f"no longer mentions {missing}"] if missing else []

    return check


def subclass_of(internal: str) -> Check:
    """A class deriving from the class named ``internal`` (so it builds what that one builds)."""

    def check(obj) -> list[str]:
        try:
            base = resolve(internal)
        except (ImportError, AttributeError):
            return [f"cannot be checked: {internal} is gone"]
        ok = isinstance(obj, type) and issubclass(obj, base)
        return [] if ok else [f"no longer derives from {internal}"]

    return check


def is_a(kind: type) -> Check:
    return lambda obj: [] if isinstance(obj, kind) else [f"is a {type(obj).__name__}, not a {kind.__name__}"]


def all_of(*checks: Check) -> Check:
    return lambda obj: [problem for check in checks for problem in check(obj)]


# -- looking up and reporting --------------------------------------------------------


def resolve(internal: str):
    """The object named ``"module.path:Attribute.sub"`` (ImportError / AttributeError if gone)."""
    module_name, _, qualname = internal.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def problems(point, *, original: str | None = None) -> list[str]:
    """What is wrong with one touch point (anything with ``internal`` and ``check``) in the
    installed framework ([] when nothing). With ``original``, an object that keeps the
    framework's own under that attribute (where the plugin replaced it) is checked as that."""
    try:
        obj = resolve(point.internal)
    except (ImportError, AttributeError) as exc:
        return [f"missing ({type(exc).__name__}: {exc})"]
    if original is not None and hasattr(obj, "__dict__"):
        obj = vars(obj).get(original, obj)
    try:
        return point.check(obj)
    except (TypeError, ValueError) as exc:  # e.g. no signature to inspect
        return [f"cannot be checked ({type(exc).__name__}: {exc})"]


def moved_lines(points: Iterable, find_problems: Callable[[object], list[str]]) -> list[str]:
    """One line per point with problems: name, internal, use and what is wrong (for ``verify()``)."""
    return [f"  - {p.name} ({p.internal}, {p.use}): {'; '.join(found)}"
            for p in points for found in [find_problems(p)] if found]


def readme_table(points: Iterable, framework: str, *, stage_column: bool = False) -> str:
    """The README's Markdown table of a list; ``stage_column`` adds "checked at" (``point.stage``)."""
    header = ["touch point", f"{framework} internal", "what the plugin does"] + (["checked at"] if stage_column else [])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in points:
        cells = [p.name, f"`{p.internal}`", p.use] + ([p.stage] if stage_column else [])
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
