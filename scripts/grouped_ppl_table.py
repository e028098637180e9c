"""Grouped (GLA-native) conversions of the ratio-8 fixture against MLA and the partitioned mode.

    PYTHONPATH=. .venv/bin/python scripts/grouped_ppl_table.py [--shards 2 4] [--window 256]
        [--max-windows N] [--calib-tokens 4096] [--engine transformers|vllm] [--json FILE]

Fixture: deepseek-v2-tiny-ratio8 (8 heads of d_nope = d_v = 64, d_c = 128, d_R = 32: H (d_nope
+ d_v) / d_c = 8 as DeepSeek-V2-Lite, so a head group needs more latent directions than its
d_c / g slice and the choice of subspace matters). Every row but MLA is a checkpoint written by
`mla-plugin convert mla-to-gla` into a temporary folder:

- grouped, naive: group r reads slice r of the latent as it is (identity basis), local RMSNorm
  (the naive GLA load), and the same with the global RMSNorm;
- grouped + pca-act + calibration: one orthogonal basis for all groups, from the latent's activations;
- grouped + group-pca: each group its own projection B_r (design.md section 5), without and with
  calibrated scales (logit; logit+output);
- partitioned (hadamard; pca-act), calibrated logit+output: the best partitioned rows of
  scripts/gla_ppl_table.py.

Calibration text: the held-out tail of the wikitext-2 validation text (the part the fixture was
not trained on; mla_plugin/fixtures/training_text.py), never the test split. Perplexity: the
wikitext-2 test split (../shared/data/wikitext-2/test.raw.txt), fp32, by the protocol of
`mla-plugin ppl`, through ``--engine`` (default transformers: the converted checkpoints' modeling
file computes their declared function; vLLM serves grouped checkpoints per issue 16's heads split).

Per row: KV values cached per token per layer per rank, and attention parameters per layer per
rank, both at TP = g (one group per rank): MLA as vLLM shards it (heads split, whole latent cached
on every rank); grouped with the heads split with the latent (the rank's query heads, o_proj
columns, and its heads' rows x its slice's columns of kv_b_proj; W_DKV, W_KR replicated; group-pca
adds the rank's d_c/g rows of P); partitioned with every head on every rank (q_proj, o_proj and
kv_b_proj's rows whole, kv_b_proj's columns of the rank's slice).
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mla_grouped_ppl_"))

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla  # noqa: E402
from mla_plugin.eval.perplexity import perplexity  # noqa: E402
from mla_plugin.fixtures import trained_fixture  # noqa: E402
from mla_plugin.fixtures.training_text import held_out_calibration_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/wikitext-2"
FIXTURE = "deepseek-v2-tiny-ratio8"


def settings():
    """(label, layout for the per-rank counts, converter options or None for the source)."""
    yield "MLA", "mla", None
    yield "grouped, naive (identity, local RMSNorm)", "grouped", dict(softmax="grouped", rmsnorm="local",
                                                                      basis="identity")
    yield "grouped, naive (identity, global RMSNorm)", "grouped", dict(softmax="grouped", basis="identity")
    yield "grouped + pca-act, calibrated logit+output", "grouped", dict(softmax="grouped", basis="pca-act",
                                                                         calibrate="logit+output")
    yield "grouped + group-pca", "grouped+P", dict(softmax="grouped", basis="group-pca")
    yield "grouped + group-pca, calibrated logit", "grouped+P", dict(softmax="grouped", basis="group-pca",
                                                                     calibrate="logit")
    yield "grouped + group-pca, calibrated logit+output", "grouped+P", dict(softmax="grouped", basis="group-pca",
                                                                            calibrate="logit+output")
    yield "partitioned + hadamard, calibrated logit+output", "partitioned", dict(softmax="partitioned",
                                                                                 basis="hadamard",
                                                                                 calibrate="logit+output")
    yield "partitioned + pca-act, calibrated logit+output", "partitioned", dict(softmax="partitioned",
                                                                                basis="pca-act",
                                                                                calibrate="logit+output")


def per_rank(config: dict, layout: str, tp: int) -> tuple[int, int]:
    """(KV values per token per layer, attention parameters per layer) on one of ``tp`` ranks."""
    d_model, heads = config["hidden_size"], config["num_attention_heads"]
    d_c, d_r = config["kv_lora_rank"], config["qk_rope_head_dim"]
    nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
    q_proj = heads * (nope + d_r) * d_model
    down = (d_c + d_r) * d_model + d_c  # kv_a_proj_with_mqa (W_DKV, W_KR) + kv_a_layernorm: replicated
    kv_b = heads * (nope + v) * d_c
    o_proj = d_model * heads * v
    if layout == "mla":  # vLLM's DeepSeek TP: heads split, the whole latent cached on every rank
        return d_c + d_r, (q_proj + kv_b + o_proj) // tp + down
    if layout in ("grouped", "grouped+P"):  # heads split with the latent (issue 16)
        params = (q_proj + o_proj) // tp + down + kv_b // (tp * tp)
        if layout == "grouped+P":
            params += (d_c // tp) * d_c  # this rank's rows of P
        return d_c // tp + d_r, params
    if layout == "partitioned":  # every head on every rank; kv_b_proj's columns of the rank's slice
        return d_c // tp + d_r, q_proj + o_proj + down + kv_b // tp
    raise ValueError(layout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DATA / "test.raw.txt")
    parser.add_argument("--fixture", default=FIXTURE, help=f"a bundled trained fixture (default {FIXTURE})")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    model = trained_fixture(args.fixture)
    config = json.loads((model / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="grouped_ppl_"))
    calib_text = held_out_calibration_text(DATA / "valid.tokens.txt", work)
    records, mla_ppl = [], None
    engine_options = {}
    if args.engine == "vllm":
        from mla_plugin.vllm.engine import exact_cpu_engine

        engine_options = exact_cpu_engine()
    try:
        for shards in args.shards:
            rows = [f"\n**g = {shards}, TP = {shards}** ({args.fixture}, window {args.window}, engine {args.engine})\n",
                    "| setting | KV values / token / layer / rank | attention params / layer / rank | ppl | vs MLA |",
                    "|---|---:|---:|---:|---:|"]
            for label, layout, options in settings():
                path = model
                if options is not None:
                    path = work / f"g{shards}-{len(records)}"
                    needs_text = options.get("basis") in ("pca-act", "group-pca") or "calibrate" in options
                    report = convert_mla_to_gla(model, path, shards=shards, show_progress=False,
                                                calib_text=calib_text if needs_text else None,
                                                calib_tokens=args.calib_tokens, **options)
                    if report.notes:
                        print("   ", report.notes[-1], flush=True)
                if options is None and mla_ppl is not None:
                    ppl, result = mla_ppl, None
                else:
                    if args.engine == "vllm" and options is None:
                        engine_options["attention_backend"] = "mla_plugin"
                    result = perplexity(str(path), engine=args.engine, text=text, window=args.window,
                                        max_windows=args.max_windows, dtype="float32", show_progress=False,
                                        **engine_options)
                    engine_options.pop("attention_backend", None)  # converted checkpoints declare theirs
                    ppl = result.ppl
                    mla_ppl = mla_ppl or ppl
                    if options is not None:
                        shutil.rmtree(path, ignore_errors=True)
                kv, params = per_rank(config, layout, shards)
                rows.append(f"| {label} | {kv} | {params:,} | {ppl:.4f} | {100 * (ppl / mla_ppl - 1):+.2f}% |")
                records.append(dict(shards=shards, setting=label, layout=layout, engine=args.engine, ppl=ppl,
                                    kv_values_per_token_per_layer_per_rank=kv,
                                    attention_params_per_layer_per_rank=params,
                                    windows=None if result is None else result.windows,
                                    tokens=None if result is None else result.tokens_scored))
                print(rows[-1], flush=True)
            scored = next(r for r in records if r["tokens"] is not None)
            rows.append(f"\n{scored['windows']} windows, {scored['tokens']} tokens scored; calibrated rows on "
                        f"{calib_text.name} (at most {args.calib_tokens} tokens). MLA whole: {per_rank(config, 'mla', 1)[1]:,} "
                        "attention parameters per layer.")
            print("\n".join(rows), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
