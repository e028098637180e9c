"""An SGLang whose internals moved, simulated in every process of a launch (launcher and the
schedulers it spawns): ``sitecustomize_for(name, folder)`` writes a ``sitecustomize.py`` that
makes one SGLang touch point's check report a move at interpreter start; put the folder first
on PYTHONPATH of a ``tests.sglang.engines`` run.
"""

from pathlib import Path

SITECUSTOMIZE = '''\
import dataclasses

from mla_plugin.sglang import touch_points as _tp

_moved = [p for p in _tp.TOUCH_POINTS if p.name == {name!r}]
assert len(_moved) == 1, "no SGLang touch point named {name!r}"
_tp.TOUCH_POINTS = tuple(
    dataclasses.replace(p, check=lambda obj: ["moved (simulated by the test)"]) if p is _moved[0] else p
    for p in _tp.TOUCH_POINTS)
'''


def sitecustomize_for(name: str, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(name=name))
    return folder
