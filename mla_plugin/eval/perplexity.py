"""The perplexity protocol (docs/design.md, "Perplexity protocol") and its two engines.

wikitext-2-raw-v1 test split, rows joined with "\\n\\n", tokenized once with BOS only at
the very start, non-overlapping windows (stride = window, remainder dropped), every
token after the first of a window scored, ppl = exp(mean over windows of the window's
mean NLL). This is the protocol behind DeepSeek-V2-Lite's published 6.3102.

Engines: ``transformers`` (the reference; ``scoring_transformers.py``) and ``vllm`` (any
attention backend, TP size and hf_overrides; ``scoring_vllm.py``), ``sglang`` (SGLang's offline
engine, prefill only, run from the SGLang venv; ``scoring_sglang.py``). Scoring modes:
``prefill`` scores each window's prompt logprobs (the model's prefill); ``decode`` feeds
the window's first token and scores every later token as a generated one, forced onto the
reference text (through vLLM's decode path, or transformers' KV cache). The windowing
itself is in ``mla_plugin.text_windows`` (no vLLM, no transformers), which the
converters' calibration shares.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mla_plugin.errors import MLAPluginInputError
from mla_plugin.text_windows import make_windows, read_text_file, tokenize_once

ENGINES = ("vllm", "transformers", "sglang")
DTYPES = ("float32", "bfloat16", "float16")
SCORE_MODES = ("prefill", "decode")
# Defaults of perplexity() and of `mla-plugin ppl` (the CLI reads these).
DEFAULT_ENGINE = "vllm"
DEFAULT_WINDOW = 2048
DEFAULT_DTYPE = "bfloat16"
DEFAULT_SCORE = "prefill"
# Engine options both engines take; every other option is an LLM(...) keyword argument (vLLM only).
SHARED_ENGINE_OPTIONS = ("batch",)


class TextUnavailableError(MLAPluginInputError):
    """No --text given and wikitext-2 could not be had from `datasets`."""


def _looks_like_local_path(model: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything else is meant as a local folder."""
    return (Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
            or "\\" in model)


def check_arguments(model, *, engine: str, window: int, max_windows: int | None, dtype: str,
                    score: str = DEFAULT_SCORE) -> None:
    """Refuse bad arguments before any text is read or any engine starts."""
    if engine not in ENGINES:
        raise MLAPluginInputError(f"engine (--engine) must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "sglang":
        from mla_plugin.eval.scoring_sglang import require_sglang

        if score != "prefill":
            raise MLAPluginInputError("--engine sglang scores prefill only so far (prompt logprobs); use "
                                      "--score prefill, or --engine vllm / transformers for --score decode")
        require_sglang()
    if score not in SCORE_MODES:
        raise MLAPluginInputError(f"score (--score) must be one of {', '.join(SCORE_MODES)}, got {score!r}")
    if dtype not in DTYPES:
        raise MLAPluginInputError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise MLAPluginInputError(f"window (--window) must be an integer of at least 2 tokens, got {window!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise MLAPluginInputError(f"max_windows (--max-windows) must be a positive integer (or omitted for all windows), "
                                  f"got {max_windows!r}")
    model = str(model)
    if _looks_like_local_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise MLAPluginInputError(f"model directory {model} does not exist; give a checkpoint folder "
                                      "(config.json, tokenizer, *.safetensors)")
        if not (path / "config.json").is_file():
            raise MLAPluginInputError(f"model directory {model} has no config.json; give a checkpoint folder")


@dataclass
class PerplexityResult:
    model: str
    engine: str
    window: int
    windows: int
    tokens_scored: int
    mean_nll: float
    ppl: float
    text_tokens: int
    score: str = DEFAULT_SCORE
    options: dict = field(default_factory=dict)

    def summary(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.options.items() if v not in (None, {}, ""))
        return (f"model {self.model} | engine {self.engine}{' (' + opts + ')' if opts else ''} | "
                f"score {self.score} | window {self.window} | windows {self.windows} | "
                f"tokens scored {self.tokens_scored} "
                f"(of {self.text_tokens}) | ppl {self.ppl:.4f}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def load_text(path: str | Path | None = None) -> str:
    """The evaluation text: a file, or wikitext-2-raw-v1's test split from `datasets`."""
    if path is not None:
        return read_text_file(path)
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as err:  # ImportError, no network, no cache: all the same to the user
        raise TextUnavailableError(
            "wikitext-2-raw-v1 is not available from `datasets` "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}). "
            'Install it (pip install "mla_plugin[datasets]") where a hub is reachable, or pass the text with '
            '--text FILE (wikitext-2-raw-v1\'s test split, its rows joined with "\\n\\n").'
        ) from None
    return "\n\n".join(rows)


def perplexity_from_window_nlls(window_nlls: list[float]) -> float:
    return math.exp(sum(window_nlls) / len(window_nlls))


class _Progress:
    """A tqdm bar over windows, or nothing."""

    def __init__(self, show: bool, total: int, desc: str) -> None:
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="window")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class PerplexityScorer:
    """One model in one engine, scoring texts by the protocol in either mode.

    The engine starts on the first scoring (after the text and its windows are checked)
    and serves every later one, so prefill and decode scoring share one engine start::

        with PerplexityScorer(model, engine="vllm", window=128, dtype="float32",
                              attention_backend="mla_plugin") as scorer:
            prefill = scorer.perplexity(text, max_windows=4, score="prefill")
            decode = scorer.perplexity(text, max_windows=4, score="decode")
    """

    def __init__(self, model: str, *, engine: str = DEFAULT_ENGINE, window: int = DEFAULT_WINDOW,
                 dtype: str = DEFAULT_DTYPE, show_progress: bool = True, **engine_options) -> None:
        check_arguments(model, engine=engine, window=window, max_windows=None, dtype=dtype)
        if engine == "transformers" and set(engine_options) - set(SHARED_ENGINE_OPTIONS):
            raise MLAPluginInputError(f"{', '.join(sorted(set(engine_options) - set(SHARED_ENGINE_OPTIONS)))}: "
                                      "vLLM engine options; use engine='vllm' or leave them out")
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except OSError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MLAPluginInputError(f"cannot load the tokenizer of {model}: {first_line}") from None
        self.model, self.engine, self.window, self.dtype = str(model), engine, window, dtype
        self.show_progress = show_progress
        self.engine_options = engine_options
        self._scorer = None

    def _engine(self):
        if self._scorer is None:
            if self.engine == "transformers":
                from mla_plugin.eval.scoring_transformers import TransformersScorer

                self._scorer = TransformersScorer(self.model, dtype=self.dtype, **self.engine_options)
            elif self.engine == "sglang":
                from mla_plugin.eval.scoring_sglang import SGLangScorer

                self._scorer = SGLangScorer(self.model, window=self.window, dtype=self.dtype, **self.engine_options)
            else:
                from mla_plugin.eval.scoring_vllm import VLLMScorer

                self._scorer = VLLMScorer(self.model, window=self.window, dtype=self.dtype, **self.engine_options)
        return self._scorer

    def perplexity(self, text: str | None = None, *, text_path: str | Path | None = None,
                   max_windows: int | None = None, score: str = DEFAULT_SCORE) -> PerplexityResult:
        check_arguments(self.model, engine=self.engine, window=self.window, max_windows=max_windows,
                        dtype=self.dtype, score=score)
        if text is None:
            text = load_text(text_path)
        ids = tokenize_once(self.tokenizer, text)
        windows = make_windows(ids, self.window, max_windows)
        progress = _Progress(self.show_progress, len(windows), f"ppl {self.engine} {score}")
        try:
            nlls = self._engine().window_nlls(windows, score, progress)
        finally:
            progress.close()
        return PerplexityResult(
            model=self.model, engine=self.engine, window=self.window, windows=len(windows),
            tokens_scored=len(windows) * (self.window - 1), mean_nll=sum(nlls) / len(nlls),
            ppl=perplexity_from_window_nlls(nlls), text_tokens=len(ids), score=score,
            options={k: v for k, v in self.engine_options.items() if k in
                     ("attention_backend", "tensor_parallel_size", "hf_overrides", "tp_size",
                      "json_model_override_args")},
        )

    def close(self) -> None:
        if self._scorer is not None:
            scorer, self._scorer = self._scorer, None
            scorer.close()

    def __enter__(self) -> "PerplexityScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def perplexity(
    model: str,
    *,
    engine: str = DEFAULT_ENGINE,
    text: str | None = None,
    text_path: str | Path | None = None,
    window: int = DEFAULT_WINDOW,
    max_windows: int | None = None,
    dtype: str = DEFAULT_DTYPE,
    score: str = DEFAULT_SCORE,
    show_progress: bool = True,
    **engine_options,
) -> PerplexityResult:
    """Perplexity of ``model`` by the protocol above, with one of the two engines.

    The defaults are `mla-plugin ppl`'s: engine vllm, window 2048, dtype bfloat16 (pass
    ``dtype="float32"`` to compare engines or backends at tight tolerances), score prefill
    (``score="decode"`` scores every token through the decode path; slower). To score
    both ways on one engine start, use :class:`PerplexityScorer`.
    """
    check_arguments(model, engine=engine, window=window, max_windows=max_windows, dtype=dtype, score=score)
    if text is None:
        text = load_text(text_path)
    with PerplexityScorer(model, engine=engine, window=window, dtype=dtype, show_progress=show_progress,
                          **engine_options) as scorer:
        return scorer.perplexity(text, max_windows=max_windows, score=score)
