"""Run inside .venv-sglang (tests/sglang/test_in_sglang_venv.py starts it): each SGLang touch
point is there; one that moved is one clear error; the docs/touch_points.md table and compat.py agree
with the list; registration is idempotent and takes the absorbed MLA path."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

from mla_plugin.sglang import touch_points
from mla_plugin.sglang.touch_points import TOUCH_POINTS, SGLangTouchPointError, problems

REPO = Path(__file__).resolve().parents[3]
POINTS = {point.name: point for point in TOUCH_POINTS}


def _remove(monkeypatch, internal: str) -> None:
    module_name, _, qualname = internal.partition(":")
    parent, _, last = qualname.rpartition(".")
    holder = importlib.import_module(module_name)
    for part in filter(None, parent.split(".")):
        holder = getattr(holder, part)
    if inspect.isclass(holder):
        for owner in [k for k in holder.__mro__ if last in vars(k)]:
            monkeypatch.delattr(owner, last)
    else:
        monkeypatch.delattr(holder, last)


@pytest.mark.parametrize("name", POINTS)
def test_touch_point_is_there(name):
    assert problems(POINTS[name]) == []


@pytest.mark.parametrize("name", POINTS)
def test_touch_point_gone_is_one_clear_error(name, monkeypatch):
    point = POINTS[name]
    _remove(monkeypatch, point.internal)
    with pytest.raises(SGLangTouchPointError) as err:
        touch_points.verify()
    message = str(err.value)
    assert message.startswith(f"mla_plugin cannot run on SGLang {touch_points.sglang_version()}:"), message
    assert f"  - {point.name} ({point.internal}, " in message


def test_every_compat_import_is_a_touch_point():
    tree = ast.parse((REPO / "mla_plugin/sglang/compat.py").read_text())
    imported = [f"{node.module}:{alias.name}" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for alias in node.names]
    assert imported
    listed = [p.internal for p in TOUCH_POINTS]
    unlisted = [name for name in imported if not any(i == name or i.startswith(name + ".") for i in listed)]
    assert unlisted == []


def test_docs_table_is_the_list():
    assert touch_points.readme_table() in (REPO / "docs" / "touch_points.md").read_text()


def test_registration_is_idempotent_and_picks_absorbed_mla():
    from mla_plugin.sglang.compat import (
        ATTENTION_BACKEND_CHOICES,
        ATTENTION_BACKENDS,
        AttentionBackendRegistry,
        AttnForwardMethod,
    )
    from mla_plugin.sglang.registration import create_backend, register

    register()
    register()
    assert ATTENTION_BACKEND_CHOICES.count("mla_plugin") == 1
    assert ATTENTION_BACKENDS["mla_plugin"] is create_backend
    handler = AttentionBackendRegistry.get_handler("mla_plugin")
    assert handler is not AttentionBackendRegistry.get_handler("triton")
    assert handler(None, None) == AttnForwardMethod.MLA


def test_graph_state_is_offered_not_refused():
    """Graph mode is served (tests/sglang/in_venv/checks_graph.py drives capture and replay)."""
    from mla_plugin.sglang.mla_backend import MLAPluginSGLangBackend

    backend = MLAPluginSGLangBackend.__new__(MLAPluginSGLangBackend)
    backend.req_to_token, backend.page_size = torch.zeros(3, 10, dtype=torch.int32), 4
    backend.init_cpu_graph_state(2, 2)
    assert backend.graph.block_table.shape == (2, 3) and backend.graph.cpu_runner
    assert backend.get_cpu_graph_seq_len_fill_value() == backend.get_cuda_graph_seq_len_fill_value() == 1
