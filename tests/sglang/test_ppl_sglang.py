"""`mla-plugin ppl --engine sglang` gives the vLLM engine's perplexity on both bundled fixtures.

Both numbers come from the CLI in this run: ``.venv/bin/mla-plugin ppl --engine vllm`` (the
vLLM venv) and ``.venv-sglang/bin/mla-plugin ppl --engine sglang`` (the SGLang venv), the
same text, window, windows and dtype (fp32), each scoring prefill (prompt logprobs). The
DeepSeek-V2 fixture runs through ``mla_plugin`` on both engines (and the SGLang trace file
proves our backend ran there); the Llama GQA fixture through each engine's own attention.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from mla_plugin.fixtures import trained_fixture
from tests.paths import REPO, wikitext_file
from tests.sglang.helpers import sglang_env, sglang_python

VLLM_CLI = REPO / ".venv/bin/mla-plugin"
SGLANG_CLI = REPO / ".venv-sglang/bin/mla-plugin"
WINDOW, WINDOWS = 128, 4
REL_TOL = 1e-4

# fixture -> (vLLM options, SGLang options)
RUNS = {
    "deepseek-v2-tiny": (["--attention-backend", "mla_plugin"], ["--attention-backend", "mla_plugin"]),
    "llama-gqa-tiny": ([], []),
}
VLLM_EXACT = ["--enforce-eager", "--compilation-config", json.dumps({"custom_ops": ["none"]})]


def _ppl(cli: Path, model: Path, engine: str, options: list[str], env: dict) -> dict:
    cmd = [str(cli), "ppl", str(model), "--engine", engine, "--text", str(wikitext_file("test.raw.txt")),
           "--window", str(WINDOW), "--max-windows", str(WINDOWS), "--dtype", "float32", "--json", *options]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """fixture -> {"vllm": result, "sglang": result, "trace": lines of our SGLang backend's trace}."""
    sglang_python()  # .venv-sglang is there (a failure, not a skip: CI builds it)
    work = tmp_path_factory.mktemp("ppl_sglang")
    out = {}
    for name, (vllm_options, sglang_options) in RUNS.items():
        model = trained_fixture(name)
        trace = work / f"{name}.trace"
        out[name] = {
            "vllm": _ppl(VLLM_CLI, model, "vllm", vllm_options + VLLM_EXACT, env=dict(os.environ)),
            "sglang": _ppl(SGLANG_CLI, model, "sglang", sglang_options, env=sglang_env(trace)),
            "trace": trace.read_text().splitlines() if trace.exists() else [],
        }
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_sglang_ppl_equals_vllm_ppl(results, name):
    vllm, sglang = results[name]["vllm"], results[name]["sglang"]
    assert sglang["engine"] == "sglang" and vllm["engine"] == "vllm"
    for key in ("window", "windows", "tokens_scored", "text_tokens", "score"):
        assert sglang[key] == vllm[key], key  # the same protocol and windows
    assert sglang["windows"] == WINDOWS and sglang["tokens_scored"] == WINDOWS * (WINDOW - 1)
    assert abs(sglang["ppl"] / vllm["ppl"] - 1) < REL_TOL, (sglang["ppl"], vllm["ppl"])
    assert 1 < sglang["ppl"] < 4096  # a trained model, better than chance (vocabulary 4096)


def test_our_backend_served_the_deepseek_fixture_only(results):
    deepseek = results["deepseek-v2-tiny"]["trace"]
    assert deepseek and all(line.startswith("mla_plugin sglang") for line in deepseek), deepseek
    assert any(" extend " in f" {line} " for line in deepseek), deepseek  # prefill scoring: our extend ran
    assert results["deepseek-v2-tiny"]["sglang"]["options"]["attention_backend"] == "mla_plugin"
    assert results["llama-gqa-tiny"]["trace"] == []  # SGLang's own attention served the GQA model


def test_sglang_engine_without_sglang_is_one_clear_error(tmp_path):
    """The vLLM venv has no SGLang: one line saying how to get it (the [sglang] extra, no repository path),
    exit code 2, before any engine."""
    proc = subprocess.run([str(VLLM_CLI), "ppl", str(trained_fixture("deepseek-v2-tiny")), "--engine", "sglang",
                           "--text", str(wikitext_file("test.raw.txt"))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and 'mla_plugin[sglang]' in lines[0], proc.stderr
    assert ".venv" not in lines[0] and "scripts/" not in lines[0], proc.stderr


def test_tp_ranks_get_equal_core_shares():
    """At --tp N on CPU each SGLang rank is bound to its own contiguous share of the cores."""
    from mla_plugin.eval.scoring_sglang import cores_per_rank
    from mla_plugin.errors import MLAPluginInputError

    assert cores_per_rank(2, [0, 1]) == "0|1"
    assert cores_per_rank(2, list(range(8))) == "0-3|4-7"
    assert cores_per_rank(3, [2, 3, 4, 5, 6, 7, 8]) == "2-3|4-5|6-8"
    with pytest.raises(MLAPluginInputError, match="needs at least 4 CPU cores"):
        cores_per_rank(4, [0, 1])


@pytest.mark.parametrize("extra,message", [
    (["--score", "decode"], "prefill only"),
    (["--engine", "vllm", "--json-model-override-args", "{}"], "SGLang's option"),
])
def test_sglang_only_and_vllm_only_options_are_refused(extra, message):
    args = [str(VLLM_CLI), "ppl", str(trained_fixture("deepseek-v2-tiny")), "--engine", "sglang",
            "--text", str(wikitext_file("test.raw.txt")), *extra]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
