"""Perplexity through vLLM on the trained fixtures (fp32), scored both ways.

- prefill-scored vLLM equals transformers (mla_plugin, CPU_MLA, vLLM's default for Llama; the
  ratio-8 DeepSeek fixture, 128 + 32, through mla_plugin);
- decode-scored equals prefill-scored within 1e-5 relative through mla_plugin (the
  DeepSeek fixture, and a gqa-to-mla conversion of the Llama fixture: our backends serve
  MLA only), through mla_plugin_gla exact (TP=1 and TP=2) and partitioned (TP=1 and TP=2);
- our decode ran for every scored token of every layer (the decode probe counts
  tokens x layers query rows; DECODE_CALLS in-process, the trace file across processes),
  prefill scoring ran none, and a backend named is the one whose decode ran;
- a decode broken on purpose (a wrong softmax scale) moves the decode-scored perplexity
  and leaves the prefill-scored one as it was.

One engine start per configuration scores both ways (module-scoped fixtures); the TP=2
engines run one after another in one spawned subprocess.
"""

import json
from pathlib import Path

import pytest

from mla_plugin import GLA_BACKEND_NAME, MLA_BACKEND_NAME
from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.eval.perplexity import PerplexityScorer
from mla_plugin.fixtures import trained_fixture
from mla_plugin.vllm.engine import exact_cpu_engine
from mla_plugin.vllm.mla_backend import DECODE_CALLS
from tests.paths import wikitext_file
from tests.vllm.decode_probe import probe_decode
from tests.vllm.helpers import gla, trace_lines, trace_pids
from tests.vllm.ppl_runs import run_in_subprocess, score_modes

WINDOW, WINDOWS = 128, 4
TOKENS = WINDOWS * (WINDOW - 1)  # tokens scored per mode
DECODE_EQUALS_PREFILL = 1e-5  # relative, fp32
ENGINES_AGREE = 1e-4  # vLLM vs transformers, relative, fp32
BREAK_FACTOR = 1.5  # the broken decode's softmax scale, relative to the right one
DEEPSEEK = str(trained_fixture("deepseek-v2-tiny"))
LLAMA = str(trained_fixture("llama-gqa-tiny"))
RATIO8 = str(trained_fixture("deepseek-v2-tiny-ratio8"))  # d_c 128 + 32, 8 heads of 64 + 64
PARTITIONED = gla("partitioned", "local", "hadamard")


def _layers(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]


def _rel(a: float, b: float) -> float:
    return abs(a / b - 1)


def _ppl(run: dict, score: str) -> float:
    return run[score]["result"]["ppl"]


@pytest.fixture(scope="module")
def text():
    return wikitext_file("test.raw.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def reference(text):
    """transformers, the reference: DeepSeek both ways, Llama prefill-scored."""
    out = {}
    for name, model, modes in (("deepseek", DEEPSEEK, ("prefill", "decode")), ("llama", LLAMA, ("prefill",)),
                               ("ratio8", RATIO8, ("prefill",))):
        with PerplexityScorer(model, engine="transformers", window=WINDOW, dtype="float32",
                              show_progress=False) as scorer:
            out[name] = {score: scorer.perplexity(text, max_windows=WINDOWS, score=score).ppl for score in modes}
    return out


def _vllm_both_ways(model: str, text: str, backend: str | None, *, hf_overrides=None, broken=False) -> dict:
    """Prefill-, then decode-scored on one in-process engine; with ``broken``, both again
    with the decode's query scaled by BREAK_FACTOR. Each mode's "rows": our decode probe's
    query rows and DECODE_CALLS, per backend, during that mode."""
    with probe_decode() as probe, PerplexityScorer(model, engine="vllm", window=WINDOW, dtype="float32",
                                                   show_progress=False, attention_backend=backend,
                                                   hf_overrides=hf_overrides, **exact_cpu_engine()) as scorer:
        def rows_now():
            return {"probe": dict(probe.rows), "DECODE_CALLS": dict(DECODE_CALLS)}

        run = score_modes(scorer, text, WINDOWS, rows_now)
        if broken:
            probe.factor = BREAK_FACTOR
            run["broken"] = score_modes(scorer, text, WINDOWS, rows_now)
    return run


@pytest.fixture(scope="module")
def llama_as_mla(tmp_path_factory):
    """The Llama fixture in the exact MLA form (gqa-to-mla; 2 kv heads x head_dim 32)."""
    dst = tmp_path_factory.mktemp("llama_mla") / "exact"
    convert_gqa_to_mla(LLAMA, dst, kv_lora_rank=64, rope_dim=64, dtype="float32", show_progress=False)
    return str(dst)


# Each configuration: (model, backend, hf_overrides, broken), started once per module.
CONFIGS = {
    "deepseek-mla_plugin": (DEEPSEEK, "mla_plugin", None, True),
    "deepseek-gla-exact": (DEEPSEEK, "mla_plugin_gla", gla("exact"), True),
    "deepseek-gla-partitioned": (DEEPSEEK, "mla_plugin_gla", PARTITIONED, False),
    "deepseek-CPU_MLA": (DEEPSEEK, "CPU_MLA", None, False),
    "llama-default": (LLAMA, None, None, False),
    "llama-as-mla-mla_plugin": ("llama_as_mla", "mla_plugin", None, False),
    "ratio8-mla_plugin": (RATIO8, "mla_plugin", None, False),
}
OURS = {"deepseek-mla_plugin": MLA_BACKEND_NAME, "deepseek-gla-exact": GLA_BACKEND_NAME,
        "deepseek-gla-partitioned": GLA_BACKEND_NAME, "llama-as-mla-mla_plugin": MLA_BACKEND_NAME,
        "ratio8-mla_plugin": MLA_BACKEND_NAME}


@pytest.fixture(scope="module")
def runs(text, llama_as_mla):
    """Configuration name -> (model, its run), each engine started on first use."""
    cache = {}

    def get(name: str) -> tuple[str, dict]:
        if name not in cache:
            model, backend, overrides, broken = CONFIGS[name]
            model = llama_as_mla if model == "llama_as_mla" else model
            cache[name] = (model, _vllm_both_ways(model, text, backend, hf_overrides=overrides, broken=broken))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_scored_equals_prefill_scored(runs, name):
    _, run = runs(name)
    for score in ("prefill", "decode"):
        result = run[score]["result"]
        assert (result["score"], result["windows"], result["tokens_scored"]) == (score, WINDOWS, TOKENS)
    assert _ppl(run, "prefill") < 1000, "a trained fixture is far better than chance (4096)"
    assert _rel(_ppl(run, "decode"), _ppl(run, "prefill")) < DECODE_EQUALS_PREFILL, run


@pytest.mark.parametrize("name", list(OURS))
def test_our_decode_ran_for_every_scored_token(runs, name):
    """Decode scoring: every scored token of every layer went through the named backend's
    decode, and no other decode ran; prefill scoring ran no decode at all."""
    model, run = runs(name)
    backend, layers = OURS[name], _layers(model)
    decode_rows = run["decode"]["rows"]
    assert decode_rows["probe"] == {backend: TOKENS * layers}, decode_rows
    assert set(decode_rows["DECODE_CALLS"]) == {backend}
    assert decode_rows["DECODE_CALLS"][backend] >= (WINDOW - 1) * layers  # one call per step and layer
    assert run["prefill"]["rows"] == {}, run["prefill"]["rows"]


@pytest.mark.parametrize("name", ["deepseek-CPU_MLA", "llama-default"])
def test_other_backends_run_none_of_ours(runs, name):
    """CPU_MLA by name: its decode ran for every scored token, ours never; Llama (not MLA):
    no MLA decode at all."""
    model, run = runs(name)
    expected = {"CPU_MLA": TOKENS * _layers(model)} if name == "deepseek-CPU_MLA" else {}
    assert run["decode"]["rows"].get("probe", {}) == expected, run["decode"]["rows"]
    assert "DECODE_CALLS" not in run["decode"]["rows"] and run["prefill"]["rows"] == {}


@pytest.mark.parametrize("name", ["deepseek-mla_plugin", "deepseek-CPU_MLA", "llama-default", "ratio8-mla_plugin"])
def test_vllm_equals_transformers(runs, reference, name):
    _, run = runs(name)
    expected = reference[name.split("-")[0]]["prefill"]
    assert _rel(_ppl(run, "prefill"), expected) < ENGINES_AGREE, (_ppl(run, "prefill"), expected)


def test_transformers_engine_scores_decode_through_its_kv_cache(reference):
    """The transformers engine's decode mode (one token at a time, KV cache): the same numbers."""
    ppl = reference["deepseek"]
    assert _rel(ppl["decode"], ppl["prefill"]) < DECODE_EQUALS_PREFILL, ppl


def test_exact_forms_score_as_their_source(runs, reference):
    """gla exact = MLA; the exact gqa-to-mla form of the Llama fixture = the Llama fixture."""
    mla, exact = runs("deepseek-mla_plugin")[1], runs("deepseek-gla-exact")[1]
    for score in ("prefill", "decode"):
        assert _rel(_ppl(exact, score), _ppl(mla, score)) < DECODE_EQUALS_PREFILL
    llama_as_mla = runs("llama-as-mla-mla_plugin")[1]
    assert _rel(_ppl(llama_as_mla, "decode"), reference["llama"]["prefill"]) < ENGINES_AGREE


@pytest.mark.parametrize("name", ["deepseek-mla_plugin", "deepseek-gla-exact"])
def test_broken_decode_moves_decode_scored_ppl_only(runs, name):
    model, run = runs(name)
    broken = run["broken"]
    assert broken["decode"]["rows"]["probe"] == {OURS[name]: TOKENS * _layers(model)}  # the break was applied
    # 100x the tolerance of the equality tests: they would see this bug
    assert _rel(_ppl(broken, "decode"), _ppl(run, "decode")) > 100 * DECODE_EQUALS_PREFILL, (broken, run)
    assert _ppl(broken, "prefill") == pytest.approx(_ppl(run, "prefill"), rel=1e-9)


# -- TP=2: the sharded latent over two ranks, spawned engines -------------------------

TP2 = {"exact": gla("exact"), "partitioned": PARTITIONED}


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("ppl_tp2")
    specs = [dict(name=name, model=DEEPSEEK, backend="mla_plugin_gla", hf_overrides=overrides,
                  tensor_parallel_size=2, window=WINDOW, windows=WINDOWS, text_file=str(wikitext_file("test.raw.txt")),
                  work_dir=str(work)) for name, overrides in TP2.items()]
    results = run_in_subprocess(specs, work / "results.json", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    return {name: (result, work / f"{name}.trace") for name, result in zip(TP2, results)}


@pytest.mark.slow
@pytest.mark.parametrize("softmax", list(TP2))
def test_tp2_decode_scored_equals_prefill_scored_and_tp1(tp2_runs, runs, softmax):
    run, trace = tp2_runs[softmax]
    assert _rel(_ppl(run, "decode"), _ppl(run, "prefill")) < DECODE_EQUALS_PREFILL, run
    tp1 = runs(f"deepseek-gla-{softmax}")[1]
    for score in ("prefill", "decode"):
        assert run[score]["result"]["tokens_scored"] == TOKENS
        assert _rel(_ppl(run, score), _ppl(tp1, score)) < DECODE_EQUALS_PREFILL, (score, run, tp1)
    # both ranks ran our sharded-latent decode, for every scored token of every layer
    decode_rows = run["decode"]["rows"]
    assert len(decode_rows) == 2, decode_rows
    assert all(rows == {GLA_BACKEND_NAME: TOKENS * _layers(DEEPSEEK)} for rows in decode_rows.values()), decode_rows
    assert run["prefill"]["rows"] == {}
    assert trace_pids(trace) == set(decode_rows), trace_lines(trace)
    assert all(line.startswith(f"{GLA_BACKEND_NAME} pid=") for line in trace_lines(trace))
