"""Perplexity of the trained GQA fixture after each gqa-to-mla stage.

    .venv/bin/python scripts/gqa_to_mla_table.py [--window 256] [--max-windows N] [--json FILE]

Stages (llama-gqa-tiny: 8 query heads, 2 kv heads, head dim 32; KV 128 values per token
per layer): original; exact MLA form (every key dim keeps RoPE, latent = the values);
partial RoPE (RoRoPE, d_R = 32) and RoRoPE + FreqFold 2 (d_R = 16), the rest of the keys
and the values kept whole; full MLA (BKV-PCA to a smaller latent). Calibration on the
held-out tail of ../shared/data/wikitext-2/valid.tokens.txt (about 6,000 tokens the
fixture was not trained on: mla_plugin/fixtures/training_text.py), never the test split;
ppl on the test split through transformers (float32); the last stage also through vLLM
with the plugin.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mla_gqa_ppl_"))

from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla  # noqa: E402
from mla_plugin.eval.perplexity import perplexity  # noqa: E402
from mla_plugin.fixtures import trained_fixture  # noqa: E402
from mla_plugin.fixtures.training_text import held_out_calibration_text  # noqa: E402
from mla_plugin.vllm.engine import exact_cpu_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/wikitext-2"
EXACT = exact_cpu_engine()

# label, converter settings (None: the source itself)
STAGES = [
    ("original (GQA)", None),
    ("exact MLA form", dict(rope_dim=64, kv_lora_rank=64)),
    ("partial RoPE: RoRoPE d_R=32", dict(rope_dim=32, kv_lora_rank=96)),
    ("partial RoPE: RoRoPE + FreqFold 2, d_R=16", dict(rope_dim=16, kv_lora_rank=112, freqfold=2)),
    ("full MLA: d_R=32, d_c=64 (BKV-PCA)", dict(rope_dim=32, kv_lora_rank=64)),
    ("full MLA: d_R=16, d_c=64 (FreqFold 2, BKV-PCA)", dict(rope_dim=16, kv_lora_rank=64, freqfold=2)),
    ("full MLA: d_R=16, d_c=48 (FreqFold 2, BKV-PCA)", dict(rope_dim=16, kv_lora_rank=48, freqfold=2)),
    ("full MLA: d_R=16, d_c=48, no K/V balance", dict(rope_dim=16, kv_lora_rank=48, freqfold=2, balance=False)),
    ("full MLA: d_R=16, d_c=32 (FreqFold 2, BKV-PCA)", dict(rope_dim=16, kv_lora_rank=32, freqfold=2)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DATA / "test.raw.txt")
    parser.add_argument("--calib-text", type=Path, help="default: the held-out tail of valid.tokens.txt")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM check of the last stage")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    source = trained_fixture("llama-gqa-tiny")
    work = Path(tempfile.mkdtemp(prefix="gqa_to_mla_"))
    if args.calib_text is None:
        args.calib_text = held_out_calibration_text(DATA / "valid.tokens.txt", work)
    rows = ["| stage | KV values / token / layer | ppl (transformers) | vs original |", "|---|---:|---:|---:|"]
    records, base, last = [], None, None
    for index, (label, settings) in enumerate(STAGES):
        model, kv = str(source), 128
        if settings is not None:
            dst = work / f"stage{index}"
            calib = None if settings == dict(rope_dim=64, kv_lora_rank=64) else args.calib_text
            report = convert_gqa_to_mla(source, dst, calib_text=calib, dtype="float32", show_progress=False,
                                        **settings)
            model, kv, last = str(dst), report.kv_values_after, str(dst)
        result = perplexity(model, engine="transformers", text=text, window=args.window,
                            max_windows=args.max_windows, dtype="float32", show_progress=False)
        base = base or result.ppl
        rows.append(f"| {label} | {kv} | {result.ppl:.4f} | {100 * (result.ppl / base - 1):+.2f}% |")
        records.append(dict(stage=label, settings=settings, kv_values=kv, ppl=result.ppl,
                            windows=result.windows, window=result.window, tokens=result.tokens_scored))
        print(rows[-1], flush=True)
    footer = f"\n{records[-1]['windows']} windows of {args.window}, {records[-1]['tokens']} tokens scored"
    if not args.no_vllm and last is not None:
        served = perplexity(last, engine="vllm", text=text, window=args.window, max_windows=args.max_windows,
                            dtype="float32", show_progress=False, **EXACT)
        footer += f"; last stage through vLLM + mla_plugin (no flags): ppl {served.ppl:.4f}"
        records.append(dict(stage=STAGES[-1][0] + " (vLLM)", ppl=served.ppl, windows=served.windows))
    print("\n".join(rows) + footer, flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
