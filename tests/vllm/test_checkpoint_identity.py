"""A converted checkpoint is served as the model its weights mean, or not at all.

Sharded-latent conversions (partitioned / grouped softmax, local RMSNorm) and gqa-to-mla
outputs declare MLAPluginDeepseekV2ForCausalLM, which only the plugin registers:
- vLLM without the plugin (VLLM_PLUGINS naming another plugin only) refuses both kinds;
- with the plugin, an explicit backend that would compute another function is refused at
  start-up with one message naming the right flag, for new checkpoints and for ones
  written before they declared the architecture;
- the perplexity of `--engine vllm` (the checkpoint picks MLA_PLUGIN_GLA) equals
  `--engine transformers` (the modeling file written beside the weights) to 1e-4, and
  differs from the original model's: both compute the converted function.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mla_plugin.checkpoint_format import CONVERTED_ARCHITECTURE, REMOTE_CODE_FILE, STOCK_ARCHITECTURE
from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.eval.perplexity import perplexity
from mla_plugin.fixtures import trained_fixture
from mla_plugin.vllm.engine import exact_cpu_engine
from tests.converters import exact_settings
from tests.paths import wikitext_file
from tests.vllm.engines import REPO, run_engine

WINDOW, WINDOWS = 128, 4
GLA_FLAG = "--attention-backend mla_plugin_gla"

# Runs in a fresh Python with VLLM_PLUGINS set: starts each engine, records how it ended.
_NO_PLUGIN_SCRIPT = """
import json, sys
from vllm import LLM
from vllm.v1.attention.backends.registry import AttentionBackendEnum
outcome = {"plugin_loaded": "mla_plugin.vllm.registration" in sys.modules
           or "MLA_PLUGIN" in AttentionBackendEnum._member_map_}
for name, path, options in json.loads(sys.argv[1]):
    try:
        LLM(path, dtype="float32", max_model_len=256, **options)
        outcome[name] = "served"
    except Exception as err:
        outcome[name] = f"{type(err).__name__}: {err}"
print("OUTCOME " + json.dumps(outcome))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """partitioned and grouped (+ local RMSNorm) conversions of the trained fixture, the
    partitioned one again as written before checkpoints declared their architecture, and a
    gqa-to-mla conversion of the trained Llama fixture."""
    root = tmp_path_factory.mktemp("identity")
    source = trained_fixture("deepseek-v2-tiny")
    paths = {"source": str(source)}
    for name, rmsnorm in (("partitioned", "global"), ("grouped", "local")):
        convert_mla_to_gla(source, root / name, shards=2, softmax=name, rmsnorm=rmsnorm, show_progress=False)
        paths[name] = str(root / name)
    old = root / "partitioned-old-style"
    shutil.copytree(root / "partitioned", old)
    config = json.loads((old / "config.json").read_text())
    config["architectures"] = [STOCK_ARCHITECTURE]
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config, indent=2))
    (old / REMOTE_CODE_FILE).unlink()
    paths["partitioned-old-style"] = str(old)
    llama = trained_fixture("llama-gqa-tiny")
    convert_gqa_to_mla(llama, root / "gqa", dtype="float32", show_progress=False, **exact_settings(str(llama)))
    paths["gqa"] = str(root / "gqa")
    for name in ("partitioned", "grouped", "gqa"):
        assert json.loads((root / name / "config.json").read_text())["architectures"] == [CONVERTED_ARCHITECTURE]
    return paths


@pytest.fixture(scope="module")
def test_text():
    return wikitext_file("test.raw.txt").read_text(encoding="utf-8")


def _ppl(model, engine, text, **options):
    return perplexity(model, engine=engine, text=text, window=WINDOW, max_windows=WINDOWS, dtype="float32",
                      show_progress=False, **options).ppl


def test_vllm_without_the_plugin_refuses_both_kinds(checkpoints, tmp_path):
    """VLLM_PLUGINS lists another plugin only (vLLM 0.32 splits it on commas and loads the
    plugins named): both kinds are refused, also with trust_remote_code (vLLM's Transformers
    backend must not run the modeling file with its own attention)."""
    runs = [[f"{kind}{suffix}", checkpoints[kind], options]
            for kind in ("partitioned", "gqa")
            for suffix, options in (("", {}), (" trust_remote_code", {"trust_remote_code": True}))]
    env = dict(os.environ, VLLM_PLUGINS="not_mla_plugin", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _NO_PLUGIN_SCRIPT, json.dumps(runs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OUTCOME ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    outcome = json.loads(lines[-1][len("OUTCOME "):])
    assert outcome.pop("plugin_loaded") is False
    assert len(outcome) == len(runs)
    for name, result in outcome.items():
        assert CONVERTED_ARCHITECTURE in result and "not supported" in result, f"{name}: {result[:500]}"


@pytest.mark.parametrize("kind", ["partitioned", "partitioned-old-style"])
@pytest.mark.parametrize("backend", ["mla_plugin", "CPU_MLA"])
def test_other_backend_is_refused_with_the_flag_to_use(checkpoints, kind, backend):
    with pytest.raises(ValueError) as err:
        run_engine(checkpoints[kind], backend=backend, max_tokens=1)
    message = str(err.value)
    assert "only the MLA_PLUGIN_GLA backend computes" in message and GLA_FLAG in message, message
    assert "softmax partitioned" in message and "2 latent slices" in message, message


def test_gqa_conversion_refused_by_the_sharded_backend(checkpoints):
    with pytest.raises(ValueError, match="--attention-backend mla_plugin, or leave out"):
        run_engine(checkpoints["gqa"], backend="mla_plugin_gla", max_tokens=1)


@pytest.fixture(scope="module")
def vllm_ppl(checkpoints, test_text):
    """vLLM perplexity with no backend flag (the checkpoint picks MLA_PLUGIN_GLA)."""
    exact = exact_cpu_engine()
    return {kind: _ppl(checkpoints[kind], "vllm", test_text, **exact)
            for kind in ("partitioned", "grouped", "partitioned-old-style")}


@pytest.mark.parametrize("kind", ["partitioned", "grouped"])
def test_perplexity_engines_agree_on_converted(checkpoints, test_text, vllm_ppl, kind):
    reference = _ppl(checkpoints[kind], "transformers", test_text)
    original = _ppl(checkpoints["source"], "transformers", test_text)
    assert abs(vllm_ppl[kind] / reference - 1) < 1e-4, (vllm_ppl[kind], reference)
    # Not the original model's function under another name: the conversion moved the ppl.
    assert abs(reference / original - 1) > 1e-3, (reference, original)


def test_old_style_checkpoint_still_served_as_itself(checkpoints, test_text, vllm_ppl):
    """Written before checkpoints declared their architecture: served the same by vLLM; the
    transformers engine refuses it (stock DeepseekV2 would score a different model)."""
    assert abs(vllm_ppl["partitioned-old-style"] / vllm_ppl["partitioned"] - 1) < 1e-6
    from mla_plugin.errors import MLAPluginInputError

    with pytest.raises(MLAPluginInputError, match="no auto_map"):
        _ppl(checkpoints["partitioned-old-style"], "transformers", test_text)
