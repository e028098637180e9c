"""Installing mla_plugin beside SGLang breaks nothing (issue 22 item 1, SGLang).

An SGLang whose internals moved, simulated in every process of the launch (one touch point's
check reports a move: tests/sglang/moved_touch_point.py): registration raises nothing and warns,
a plain model is served as without the plugin (equal to transformers), and only launches asking
for our backends fail, in the launcher, in one line naming the versions tested. One
``.venv-sglang`` subprocess runs the three engines one after another. (That registration's config
changes reach only the models the plugin serves is checked inside .venv-sglang:
in_venv/checks_registration_scope.py.)
"""

import json
import os
import subprocess

import pytest

from mla_plugin.sglang.touch_points import SUPPORTED_SGLANG
from tests.sglang.helpers import DEEPSEEK, LLAMA, REPO, prompt_ids, sglang_env, sglang_python
from tests.sglang.moved_touch_point import sitecustomize_for
from tests.vllm.engines import assert_matches_transformers

MOVED = "DeepSeek MoE config"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang_moved")
    site = sitecustomize_for(MOVED, tmp / "site")
    engine_runs = [
        dict(model=str(LLAMA), prompt_ids=prompt_ids(LLAMA), max_tokens=16),
        dict(kind="error", model=str(DEEPSEEK), attention_backend="mla_plugin"),
        dict(kind="error", model=str(DEEPSEEK), attention_backend="mla_plugin_gla"),
    ]
    env = dict(sglang_env(), PYTHONPATH=f"{site}{os.pathsep}{REPO}")  # the move in every process
    out = tmp / "results.json"
    proc = subprocess.run([str(sglang_python()), "-m", "tests.sglang.engines", json.dumps(engine_runs), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out.exists(), log[-6000:]
    results = json.loads(out.read_text())
    return {"plain": results[0], "refused": results[1:], "log": log}


def test_plain_model_is_served_as_without_the_plugin(runs):
    assert "moved 1 internal(s)" in runs["log"] and f"({MOVED})" in runs["log"], "the move was not simulated"
    assert_matches_transformers(runs["plain"], str(LLAMA), atol=1e-4)


def test_our_backends_are_refused_in_one_line(runs):
    tested = " and ".join(SUPPORTED_SGLANG)
    for refused in runs["refused"]:
        assert refused["error_type"] == "IncompatibleSGLangError", refused
        message = refused["error"]
        assert "\n" not in message and message.startswith(f"mla_plugin is tested with SGLang {tested};"), message
        assert f"({MOVED})" in message and "pip install --no-deps sglang==" in message, message
