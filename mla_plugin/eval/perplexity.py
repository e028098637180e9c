"""The perplexity protocol (docs/design.md, "Perplexity protocol") and its two engines.

wikitext-2-raw-v1 test split, rows joined with "\\n\\n", tokenized once with BOS only at
the very start, non-overlapping windows (stride = window, remainder dropped), every
token after the first of a window scored, ppl = exp(mean over windows of the window's
mean NLL). This is the protocol behind DeepSeek-V2-Lite's published 6.3102.

Engines: ``transformers`` (the reference) and ``vllm`` (prompt logprobs; any attention
backend, TP size and hf_overrides). The windowing itself is in ``mla_plugin.text_windows``
(no vLLM, no transformers), which the converters' calibration shares.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mla_plugin.errors import MLAPluginInputError
from mla_plugin.text_windows import make_windows, read_text_file, tokenize_once

ENGINES = ("vllm", "transformers")
DTYPES = ("float32", "bfloat16", "float16")
# Defaults of perplexity() and of `mla-plugin ppl` (the CLI reads these).
DEFAULT_ENGINE = "vllm"
DEFAULT_WINDOW = 2048
DEFAULT_DTYPE = "bfloat16"


class TextUnavailableError(MLAPluginInputError):
    """No --text given and wikitext-2 could not be had from `datasets`."""


def _looks_like_local_path(model: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything else is meant as a local folder."""
    return (Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
            or "\\" in model)


def check_arguments(model, *, engine: str, window: int, max_windows: int | None, dtype: str) -> None:
    """Refuse bad arguments before any text is read or any engine starts."""
    if engine not in ENGINES:
        raise MLAPluginInputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if dtype not in DTYPES:
        raise MLAPluginInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise MLAPluginInputError(f"window must be an integer of at least 2 tokens, got {window!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise MLAPluginInputError(f"max_windows must be a positive integer (or omitted for all windows), "
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
    options: dict = field(default_factory=dict)

    def summary(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.options.items() if v not in (None, {}, ""))
        return (f"model {self.model} | engine {self.engine}{' (' + opts + ')' if opts else ''} | "
                f"window {self.window} | windows {self.windows} | tokens scored {self.tokens_scored} "
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
            "Pass the text with --text FILE, e.g. --text ../shared/data/wikitext-2/test.raw.txt "
            '(the test split\'s rows joined with "\\n\\n").'
        ) from None
    return "\n\n".join(rows)


def perplexity_from_window_nlls(window_nlls: list[float]) -> float:
    return math.exp(sum(window_nlls) / len(window_nlls))


def _score_transformers(model_path: str, windows, dtype: str, progress) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    # Checkpoints from `mla-plugin convert gqa-to-mla` carry their own modeling file.
    config = json.loads((Path(model_path) / "config.json").read_text()) if (Path(model_path) / "config.json").exists() else {}
    remote = "auto_map" in config and "mla_plugin" in config
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), trust_remote_code=remote).eval()
    nlls = []
    with torch.no_grad():
        for window in progress(windows):
            ids = torch.tensor([window])
            logits = model(ids).logits[0, :-1].double()  # row t predicts token t + 1
            logprobs = torch.log_softmax(logits, dim=-1)
            nll = -logprobs.gather(1, ids[0, 1:, None]).mean()
            nlls.append(float(nll))
    return nlls


def _score_vllm(model_path: str, windows, dtype: str, progress, *, attention_backend=None,
                tensor_parallel_size: int = 1, hf_overrides=None, batch: int = 8,
                **engine_kwargs) -> list[float]:
    from vllm import LLM, SamplingParams

    window = len(windows[0])
    llm = LLM(
        model_path, dtype=dtype, attention_backend=attention_backend,
        tensor_parallel_size=tensor_parallel_size, hf_overrides=hf_overrides,
        max_model_len=window + 1, max_num_seqs=batch, seed=0, **engine_kwargs,
    )
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    nlls = []
    try:
        chunks = [windows[i : i + batch] for i in range(0, len(windows), batch)]
        for chunk in progress(chunks, unit_scale=batch):
            outs = llm.generate([{"prompt_token_ids": w} for w in chunk], params, use_tqdm=False)
            for out, w in zip(outs, chunk):
                scored = [out.prompt_logprobs[t][w[t]].logprob for t in range(1, len(w))]
                nlls.append(-sum(scored) / len(scored))
    finally:
        del llm
        from mla_plugin.vllm.engine import release_engine

        release_engine()
    return nlls


def perplexity(
    model: str,
    *,
    engine: str = DEFAULT_ENGINE,
    text: str | None = None,
    text_path: str | Path | None = None,
    window: int = DEFAULT_WINDOW,
    max_windows: int | None = None,
    dtype: str = DEFAULT_DTYPE,
    show_progress: bool = True,
    **engine_options,
) -> PerplexityResult:
    """Perplexity of ``model`` by the protocol above, with one of the two engines.

    The defaults are `mla-plugin ppl`'s: engine vllm, window 2048, dtype bfloat16 (pass
    ``dtype="float32"`` to compare engines or backends at tight tolerances).
    """
    check_arguments(model, engine=engine, window=window, max_windows=max_windows, dtype=dtype)
    if text is None:
        text = load_text(text_path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MLAPluginInputError(f"cannot load the tokenizer of {model}: {first_line}") from None
    ids = tokenize_once(tokenizer, text)
    windows = make_windows(ids, window, max_windows)

    def progress(items, unit_scale=1):
        if not show_progress:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=f"ppl {engine}", unit="window" if unit_scale == 1 else f"x{unit_scale} windows")

    if engine == "transformers":
        nlls = _score_transformers(model, windows, dtype, progress)
    else:
        nlls = _score_vllm(model, windows, dtype, progress, **engine_options)
    return PerplexityResult(
        model=str(model), engine=engine, window=window, windows=len(windows),
        tokens_scored=len(windows) * (window - 1), mean_nll=sum(nlls) / len(nlls),
        ppl=perplexity_from_window_nlls(nlls), text_tokens=len(ids),
        options={k: v for k, v in engine_options.items() if k in
                 ("attention_backend", "tensor_parallel_size", "hf_overrides")},
    )
