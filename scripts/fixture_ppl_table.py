"""Perplexity of the bundled trained fixtures under each engine: the README's table.

    .venv/bin/python scripts/fixture_ppl_table.py [--window 256] [--max-windows N]

Text: ../shared/data/wikitext-2/test.raw.txt (the wikitext-2-raw-v1 test split).
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mla_ppl_"))

from mla_plugin.eval.perplexity import perplexity  # noqa: E402
from mla_plugin.fixtures import trained_fixture  # noqa: E402
from mla_plugin.vllm.engine import exact_cpu_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXACT = exact_cpu_engine()

RUNS = [
    ("deepseek-v2-tiny", "transformers", {}),
    ("deepseek-v2-tiny", "vllm", {"attention_backend": "CPU_MLA", **EXACT}),
    ("deepseek-v2-tiny", "vllm", {"attention_backend": "mla_plugin", **EXACT}),
    ("llama-gqa-tiny", "transformers", {}),
    ("llama-gqa-tiny", "vllm", EXACT),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=REPO.parent / "shared/data/wikitext-2/test.raw.txt")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    rows = ["| fixture | engine | window | windows | tokens scored | ppl |", "|---|---|---:|---:|---:|---:|"]
    for name, engine, options in RUNS:
        result = perplexity(str(trained_fixture(name)), engine=engine, text=text, window=args.window,
                            max_windows=args.max_windows, dtype="float32", **options)
        label = engine if engine == "transformers" else f"vLLM {options.get('attention_backend') or 'default (CPU_ATTN)'}"
        rows.append(f"| {name} | {label} | {result.window} | {result.windows} | {result.tokens_scored} | "
                    f"{result.ppl:.4f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
