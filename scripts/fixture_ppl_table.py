"""Perplexity of the bundled trained fixtures under each engine: the README's tables.

    .venv/bin/python scripts/fixture_ppl_table.py [--window 256] [--max-windows N] [--score prefill,decode]

Text: ../shared/data/wikitext-2/test.raw.txt (the wikitext-2-raw-v1 test split). Each
engine starts once and scores every mode given with --score (prefill: prompt logprobs;
decode: every token generated, forced onto the text, through the decode path).
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mla_ppl_"))

from mla_plugin.eval.perplexity import SCORE_MODES, PerplexityScorer  # noqa: E402
from mla_plugin.fixtures import trained_fixture  # noqa: E402
from mla_plugin.vllm.engine import exact_cpu_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXACT = exact_cpu_engine()
GLA_EXACT = {"mla_plugin": {"shards": 2, "softmax": "exact"}}
GLA_PARTITIONED = {"mla_plugin": {"shards": 2, "softmax": "partitioned"}}

RUNS = [
    ("deepseek-v2-tiny", "transformers", {}),
    ("deepseek-v2-tiny", "vllm", {"attention_backend": "CPU_MLA", **EXACT}),
    ("deepseek-v2-tiny", "vllm", {"attention_backend": "mla_plugin", **EXACT}),
    ("deepseek-v2-tiny", "vllm", {"attention_backend": "mla_plugin_gla", "hf_overrides": GLA_EXACT, **EXACT}),
    ("deepseek-v2-tiny", "vllm", {"attention_backend": "mla_plugin_gla", "hf_overrides": GLA_PARTITIONED, **EXACT}),
    ("deepseek-v2-tiny-ratio8", "transformers", {}),
    ("deepseek-v2-tiny-ratio8", "vllm", {"attention_backend": "mla_plugin", **EXACT}),  # CPU_MLA: 512 + 64 only
    ("llama-gqa-tiny", "transformers", {}),
    ("llama-gqa-tiny", "vllm", EXACT),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=REPO.parent / "shared/data/wikitext-2/test.raw.txt")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--score", default="prefill", help=f"comma-separated, of {', '.join(SCORE_MODES)}")
    args = parser.parse_args()
    scores = args.score.split(",")
    text = args.text.read_text(encoding="utf-8")
    rows = ["| fixture | engine | score | window | windows | tokens scored | ppl |",
            "|---|---|---|---:|---:|---:|---:|"]
    for name, engine, options in RUNS:
        backend = options.get("attention_backend") or "default (CPU_ATTN)"
        label = engine if engine == "transformers" else f"vLLM {backend}"
        if options.get("hf_overrides"):
            label += " ({shards} slices, {softmax})".format(**options["hf_overrides"]["mla_plugin"])
        with PerplexityScorer(str(trained_fixture(name)), engine=engine, window=args.window, dtype="float32",
                              **options) as scorer:
            for score in scores:
                result = scorer.perplexity(text, max_windows=args.max_windows, score=score)
                rows.append(f"| {name} | {label} | {score} | {result.window} | {result.windows} | "
                            f"{result.tokens_scored} | {result.ppl:.4f} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
