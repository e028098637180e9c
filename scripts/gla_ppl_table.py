"""Perplexity of the trained DeepSeek-V2 fixture under every sharded-latent mode.

    .venv/bin/python scripts/gla_ppl_table.py [--shards 2 4] [--window 256] [--max-windows N]
        [--calib-text FILE] [--calib-tokens N]

Rows: MLA (mla_plugin); exact; partitioned x {identity, hadamard, pca} x {global, local}
(logit scale "auto" = g, and 1 for contrast); grouped + local (the naive GLA load), all
applied at load time with hf_overrides. Then checkpoints written by `mla-plugin convert
mla-to-gla` (partitioned, global) into a temporary folder and served with no flags:
calibrated logit scales and logit+output scales (identity and hadamard), and the
activation-PCA basis (pca-act) without and with calibration, calibrated on --calib-text
(default: the held-out tail of the wikitext-2 validation text, the part the fixture was not
trained on, mla_plugin/fixtures/training_text.py; never the test split).
All at TP = 1 (the g slices computed on one rank: the same function as TP = g).
Text: ../shared/data/wikitext-2/test.raw.txt. Prints a markdown table per g.
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mla_gla_ppl_"))

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla  # noqa: E402
from mla_plugin.eval.perplexity import perplexity  # noqa: E402
from mla_plugin.fixtures import trained_fixture  # noqa: E402
from mla_plugin.fixtures.training_text import held_out_calibration_text  # noqa: E402
from mla_plugin.vllm.engine import exact_cpu_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/wikitext-2"
EXACT = exact_cpu_engine()


def settings(shards: int):
    yield "MLA (mla_plugin)", "mla_plugin", None
    yield "exact", "mla_plugin_gla", dict(softmax="exact")
    for norm in ("global", "local"):
        for basis in ("identity", "hadamard", "pca"):
            yield f"partitioned, {basis}, {norm}", "mla_plugin_gla", dict(softmax="partitioned", basis=basis, rmsnorm=norm)
    yield "partitioned, identity, global, logit scale 1", "mla_plugin_gla", dict(softmax="partitioned", logit_scale=1.0)
    yield "grouped, identity, local (naive GLA load)", "mla_plugin_gla", dict(softmax="grouped", rmsnorm="local")
    # converted checkpoints (no flags at serving time)
    for basis in ("identity", "hadamard"):
        for mode in ("logit", "logit+output"):
            yield f"converted: partitioned, {basis}, calibrated {mode}", "convert", dict(basis=basis, calibrate=mode)
    yield "converted: partitioned, pca-act (logit scale g)", "convert", dict(basis="pca-act", calibrate="none")
    for mode in ("logit", "logit+output"):
        yield f"converted: partitioned, pca-act, calibrated {mode}", "convert", dict(basis="pca-act", calibrate=mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DATA / "test.raw.txt")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--calib-text", type=Path,
                        help="calibration text for the converted rows (default: the held-out tail of "
                             "valid.tokens.txt, about 6,000 tokens; never the test split)")
    parser.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    model = str(trained_fixture("deepseek-v2-tiny"))
    work = Path(tempfile.mkdtemp(prefix="gla_ppl_convert_"))
    if args.calib_text is None:
        args.calib_text = held_out_calibration_text(DATA / "valid.tokens.txt", work)
    records = []
    try:
        for shards in args.shards:
            table(args, text, model, shards, work, records)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


def table(args, text: str, model: str, shards: int, work: Path, records: list) -> None:
    """Measure every setting at g = ``shards``; print its markdown table, append to ``records``."""
    rows = [f"\n**g = {shards}** (deepseek-v2-tiny, window {args.window})\n",
            "| setting | ppl | vs MLA |", "|---|---:|---:|"]
    mla_ppl = None
    for label, backend, options in settings(shards):
        path, overrides = model, None if options is None else {"mla_plugin": dict(shards=shards, **options)}
        if backend == "convert":
            path = work / f"g{shards}-{options['basis']}-{options['calibrate']}"
            report = convert_mla_to_gla(model, path, shards=shards, softmax="partitioned", rmsnorm="global",
                                        calib_text=args.calib_text, calib_tokens=args.calib_tokens,
                                        show_progress=False, **options)
            print("   ", report.notes[-1] if report.notes else "", flush=True)
            path, backend, overrides = str(path), None, None
        result = perplexity(path, engine="vllm", text=text, window=args.window, max_windows=args.max_windows,
                            dtype="float32", show_progress=False, attention_backend=backend,
                            hf_overrides=overrides, **EXACT)
        mla_ppl = mla_ppl or result.ppl
        rows.append(f"| {label} | {result.ppl:.4f} | {100 * (result.ppl / mla_ppl - 1):+.2f}% |")
        records.append(dict(shards=shards, setting=label, ppl=result.ppl, windows=result.windows,
                            window=result.window, tokens=result.tokens_scored))
        print(rows[-1], flush=True)
    rows.append(f"\n{records[-1]['windows']} windows, {records[-1]['tokens']} tokens scored; converted rows "
                f"calibrated on {args.calib_text.name} (at most {args.calib_tokens} tokens)")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
