"""The SGLang engine of the perplexity tool: SGLang's offline ``sglang.Engine``, prefill-scored.

prefill: each window is one request (``input_ids``) with ``return_logprob=True`` and
``logprob_start_len=0``; SGLang reports, for every prompt position t, the logprob of token
t given the tokens before it (``meta_info["input_token_logprobs"]``: ``(logprob, token
id, text)``, None at t = 0). Tokens 1 … W−1 of the window are scored, exactly as the vLLM
engine scores its prompt logprobs. The prefix (radix) cache is off, so every window's
prompt runs through the model in full (a cached prefix would report no logprobs for its
tokens). The logprobs are the model's raw ones: the sampling parameters keep SGLang's
defaults (temperature 1, no top-p / top-k), under which input logprobs are plain
log-softmax of the logits.

Runs inside the SGLang virtualenv (``.venv-sglang``, built by ``scripts/setup.sh``); the
plugin's ``sglang.srt.plugins`` entry point registers ``mla_plugin`` / ``mla_plugin_gla``
and supplies what SGLang on CPU lacks. Without a GPU the tool turns on SGLang's CPU engine
(``SGLANG_USE_CPU_ENGINE=1`` unless set) and uses ``mla_plugin.sglang.engine.exact_cpu_engine``
(eager, seeded; fp32 works there, and the tool passes the dtype through).
"""

import json
import os

from mla_plugin.errors import MLAPluginInputError

# SGLang admits prompts of up to context_length minus a few reserved tokens (6 in 0.5.23).
CONTEXT_SLACK = 16


def sglang_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


def require_sglang() -> None:
    """One clear error where SGLang is not importable in this interpreter."""
    if not sglang_available():
        raise MLAPluginInputError(
            "--engine sglang needs SGLang, which is not installed in this Python environment; run "
            "mla-plugin from the environment SGLang is installed in (pip install \"mla_plugin[sglang]\" "
            "installs both), or use --engine vllm / transformers")


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# SGLang's CPU engine binds each TP rank to its own cores: by NUMA node, unless this names them.
CPU_CORES_PER_RANK = "SGLANG_CPU_OMP_THREADS_BIND"


def cores_per_rank(tp_size: int, cores: list[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND splitting ``cores`` into ``tp_size`` contiguous groups, "0-3|4-7"."""
    if tp_size > len(cores):
        raise MLAPluginInputError(f"--tp {tp_size} needs at least {tp_size} CPU cores here, found {len(cores)}")
    groups = [cores[len(cores) * r // tp_size: len(cores) * (r + 1) // tp_size] for r in range(tp_size)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def use_cpu_engine(tp_size: int = 1) -> None:
    """No GPU here: turn on SGLang's CPU engine (its own switch, inherited by its processes) and
    the plugin's CPU stand-ins in this process (mla_plugin.sglang.cpu_support), before SGLang loads.
    At TP > 1 each rank gets an equal share of this process's cores unless SGLANG_CPU_OMP_THREADS_BIND
    says otherwise (SGLang's own default wants a NUMA node per rank)."""
    from mla_plugin.sglang import cpu_support

    os.environ.setdefault(cpu_support.CPU_SWITCH, "1")
    if tp_size > 1 and not os.environ.get(CPU_CORES_PER_RANK):
        os.environ[CPU_CORES_PER_RANK] = cores_per_rank(tp_size, sorted(os.sched_getaffinity(0)))
    cpu_support.boot()


class SGLangScorer:
    def __init__(self, model_path: str, *, window: int, dtype: str, attention_backend=None,
                 tp_size: int = 1, json_model_override_args=None, batch: int = 8, **engine_kwargs) -> None:
        require_sglang()
        on_cpu = _on_cpu()
        if on_cpu:
            use_cpu_engine(tp_size)
        import sglang

        if isinstance(json_model_override_args, dict):
            json_model_override_args = json.dumps(json_model_override_args)
        kwargs = {}
        if on_cpu:
            from mla_plugin.sglang.engine import exact_cpu_engine

            # A pool for one batch of windows: SGLang's CPU sizing takes most of RAM (and none at TP > 1).
            kwargs = exact_cpu_engine(max_total_tokens=max(4096, 2 * batch * (window + CONTEXT_SLACK)))
        kwargs.update(
            model_path=model_path, dtype=dtype, tp_size=tp_size, context_length=window + CONTEXT_SLACK,
            disable_radix_cache=True, random_seed=0, max_running_requests=batch, log_level="error",
        )
        if attention_backend is not None:
            kwargs["attention_backend"] = attention_backend
        if json_model_override_args:
            kwargs["json_model_override_args"] = json_model_override_args
        kwargs.update(engine_kwargs)
        self.window = window
        self.batch = batch
        self.engine = sglang.Engine(**kwargs)

    def window_nlls(self, windows: list[list[int]], score: str, progress) -> list[float]:
        if score != "prefill":
            raise MLAPluginInputError("--engine sglang scores prefill only so far (prompt logprobs); "
                                      "use --score prefill, or --engine vllm / transformers for --score decode")
        nlls = []
        for start in range(0, len(windows), self.batch):
            chunk = windows[start : start + self.batch]
            nlls += self._prefill(chunk)
            progress.update(len(chunk))
        return nlls

    def _prefill(self, chunk) -> list[float]:
        outs = self.engine.generate(input_ids=[list(w) for w in chunk], sampling_params={"max_new_tokens": 1},
                                    return_logprob=True, logprob_start_len=0)
        if isinstance(outs, dict):
            outs = [outs]
        nlls = []
        for out, w in zip(outs, chunk, strict=True):
            rows = out["meta_info"]["input_token_logprobs"]  # [(logprob, token id, text)] per prompt position
            if len(rows) != len(w) or [int(r[1]) for r in rows[1:]] != list(w[1:]):
                raise RuntimeError(f"SGLang returned {len(rows)} prompt logprobs for a {len(w)}-token window, "
                                   "or for other tokens than the window's (is a prefix cache on?)")
            scored = [float(r[0]) for r in rows[1:]]
            nlls.append(-sum(scored) / len(scored))
        return nlls

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
