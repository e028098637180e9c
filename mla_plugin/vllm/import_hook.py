"""Run a function on a module right after it is imported (or now, if it already is)."""

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


def when_imported(name: str, patch: Callable) -> None:
    """Call ``patch(module)`` once ``name`` is imported; idempotent per (name, patch)."""
    if name in sys.modules:
        patch(sys.modules[name])
        return
    for finder in sys.meta_path:
        if isinstance(finder, _AfterImport) and finder.name == name and finder.patch is patch:
            return
    sys.meta_path.insert(0, _AfterImport(name, patch))
