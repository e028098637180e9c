"""Perplexity of the trained DeepSeek-V2 fixture under every sharded-latent mode.

    .venv/bin/python scripts/gla_ppl_table.py [--shards 2 4] [--window 256] [--max-windows N]

Rows: MLA (mla_plugin); exact; partitioned x {identity, hadamard, pca} x {global, local}
(logit scale "auto" = g, and 1 for contrast); grouped + local (the naive GLA load).
All at TP = 1 (the g slices computed on one rank: the same function as TP = g).
Text: ../shared/data/wikitext-2/test.raw.txt. Prints a markdown table per g.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mla_gla_ppl_"))

from mla_plugin.eval.perplexity import perplexity  # noqa: E402
from mla_plugin.fixtures import trained_fixture  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXACT = dict(enforce_eager=True, compilation_config={"custom_ops": ["none"]}, distributed_executor_backend="uni")


def settings(shards: int):
    yield "MLA (mla_plugin)", "mla_plugin", None
    yield "exact", "mla_plugin_gla", dict(softmax="exact")
    for norm in ("global", "local"):
        for basis in ("identity", "hadamard", "pca"):
            yield f"partitioned, {basis}, {norm}", "mla_plugin_gla", dict(softmax="partitioned", basis=basis, rmsnorm=norm)
    yield "partitioned, identity, global, logit scale 1", "mla_plugin_gla", dict(softmax="partitioned", logit_scale=1.0)
    yield "grouped, identity, local (naive GLA load)", "mla_plugin_gla", dict(softmax="grouped", rmsnorm="local")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=REPO.parent / "shared/data/wikitext-2/test.raw.txt")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    model = str(trained_fixture("deepseek-v2-tiny"))
    records = []
    for shards in args.shards:
        rows = [f"\n**g = {shards}** (deepseek-v2-tiny, window {args.window})\n",
                "| setting | ppl | vs MLA |", "|---|---:|---:|"]
        mla_ppl = None
        for label, backend, options in settings(shards):
            overrides = None if options is None else {"mla_plugin": dict(shards=shards, **options)}
            result = perplexity(model, engine="vllm", text=text, window=args.window, max_windows=args.max_windows,
                                dtype="float32", show_progress=False, attention_backend=backend,
                                hf_overrides=overrides, **EXACT)
            mla_ppl = mla_ppl or result.ppl
            rows.append(f"| {label} | {result.ppl:.4f} | {100 * (result.ppl / mla_ppl - 1):+.2f}% |")
            records.append(dict(shards=shards, setting=label, ppl=result.ppl, windows=result.windows,
                                window=result.window, tokens=result.tokens_scored))
            print(rows[-1], flush=True)
        rows.append(f"\n{records[-1]['windows']} windows, {records[-1]['tokens']} tokens scored")
        print("\n".join(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
