"""`mla-plugin`: command-line tools around the vLLM plugin.

    mla-plugin demo                 serve a bundled tiny DeepSeek-V2 through the plugin
    mla-plugin ppl MODEL            wikitext-2 perplexity (vLLM, SGLang or transformers engine)
    mla-plugin convert mla-to-gla SRC DST --shards G   DeepSeek-V2/V3 (bf16 or fp8) -> sharded-latent layout
    mla-plugin convert gqa-to-mla SRC DST --kv-lora-rank D_C --rope-dim D_R   Llama/Qwen2/Mistral -> MLA
    mla-plugin make-tiny-model DIR  write a tiny random DeepSeek-V2 checkpoint
"""

import argparse
import sys
import tempfile
from pathlib import Path

from mla_plugin.convert import defaults as convert_defaults
from mla_plugin.errors import MLAPluginInputError
from mla_plugin.eval.perplexity import (
    DEFAULT_DTYPE,
    DEFAULT_ENGINE,
    DEFAULT_SCORE,
    DEFAULT_WINDOW,
    DTYPES,
    ENGINES,
    SCORE_MODES,
)
from mla_plugin.gla_options import CONVERTER_BASES, RMSNORM_MODES, SOFTMAX_MODES


def _cmd_make_tiny_model(args) -> int:
    from mla_plugin.fixtures import make_tiny_deepseek_v2

    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        print(f"error: {dst} is a file; give a new or empty folder", file=sys.stderr)
        return 2
    if dst.exists() and any(dst.iterdir()):
        print(f"error: {dst} exists and is not empty", file=sys.stderr)
        return 2
    make_tiny_deepseek_v2(
        dst, seed=args.seed, kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=args.rope_dim,
        num_heads=args.heads, num_layers=args.layers, hidden_size=args.hidden_size,
    )
    print(f"wrote a tiny DeepSeek-V2 (kv_lora_rank {args.kv_lora_rank} + rope {args.rope_dim}, "
          f"{args.heads} heads, {args.layers} layers, random weights) to {dst}")
    return 0


def _cmd_demo(args) -> int:
    from tqdm import tqdm

    from mla_plugin.serving import post_json, start_server, stop_server, wait_ready

    from mla_plugin.fixtures import trained_fixture

    work = Path(tempfile.mkdtemp(prefix="mla_plugin_demo_"))
    model = args.model
    if model is None:
        model = str(trained_fixture("deepseek-v2-tiny"))
        print(f"[1/3] bundled tiny DeepSeek-V2 (MLA, kv_lora_rank 512 + rope 64, 8 heads, 4 layers, "
              f"trained on wikitext-2 validation text): {model}")
    else:
        print(f"[1/3] using model {model}")
    trace = work / "decode-trace.txt"
    serve_args = ["--attention-backend", "mla_plugin", "--enforce-eager", "--max-model-len",
                  str(args.max_model_len), "--dtype", args.dtype]
    server = start_server(model, work / "server.log", serve_args=serve_args,
                          env={"MLA_PLUGIN_TRACE_FILE": str(trace)})
    print(f"[2/3] vllm serve {model} {' '.join(serve_args)}  (pid {server.proc.pid}, log {server.log_path})")
    try:
        with tqdm(desc="      waiting for the server", unit="s", bar_format="{desc}: {n}s") as bar:
            wait_ready(server, timeout=args.timeout, on_tick=lambda: bar.update(1))
        reply = post_json(server.url + "/v1/completions", {
            "model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
        })
        text = reply["choices"][0]["text"]
        print(f"[3/3] completion (greedy, {args.max_tokens} tokens):")
        print(f"      prompt: {args.prompt!r}")
        print(f"      output: {text!r}")
        if args.model is None:
            print("      (a 6.8M-parameter model trained briefly on CPU: wiki-flavoured, not wise)")
        ran = trace.read_text().strip().splitlines() if trace.exists() else []
        if not ran:
            print("error: the server answered, but mla_plugin's decode never ran", file=sys.stderr)
            return 1
        print(f"      served by mla_plugin: {ran[0]}")
        return 0
    except (RuntimeError, TimeoutError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        stop_server(server)
        print(f"      server (pid {server.proc.pid}) stopped")


def _cmd_ppl(args) -> int:
    import json

    from mla_plugin.eval.perplexity import check_arguments, load_text, perplexity

    check_arguments(args.model, engine=args.engine, window=args.window, max_windows=args.max_windows,
                    dtype=args.dtype, score=args.score)
    try:
        text = load_text(args.text)
    except OSError as err:
        print(f"error: cannot read --text: {err}", file=sys.stderr)
        return 2
    options = {}
    if args.json_model_override_args and args.engine != "sglang":
        print("error: --json-model-override-args is SGLang's option; with --engine vllm pass --hf-overrides",
              file=sys.stderr)
        return 2
    if args.engine == "vllm":
        try:
            hf_overrides = json.loads(args.hf_overrides) if args.hf_overrides else None
            compilation_config = json.loads(args.compilation_config) if args.compilation_config else None
        except json.JSONDecodeError as err:
            print(f"error: --hf-overrides / --compilation-config must be JSON: {err}", file=sys.stderr)
            return 2
        options = dict(attention_backend=args.attention_backend, tensor_parallel_size=args.tensor_parallel_size,
                       hf_overrides=hf_overrides, enforce_eager=args.enforce_eager)
        if compilation_config is not None:
            options["compilation_config"] = compilation_config
        if args.block_size:
            options["block_size"] = args.block_size
        if args.kv_cache_dtype:
            options["kv_cache_dtype"] = args.kv_cache_dtype
    elif args.engine == "sglang":
        if args.hf_overrides or args.enforce_eager or args.compilation_config or args.block_size \
                or args.kv_cache_dtype:
            print("error: --hf-overrides, --enforce-eager, --compilation-config, --block-size and --kv-cache-dtype "
                  "are vLLM options; "
                  "with --engine sglang pass --json-model-override-args (SGLang's hf_overrides)", file=sys.stderr)
            return 2
        try:
            overrides = json.loads(args.json_model_override_args) if args.json_model_override_args else None
        except json.JSONDecodeError as err:
            print(f"error: --json-model-override-args must be JSON: {err}", file=sys.stderr)
            return 2
        options = dict(attention_backend=args.attention_backend, tp_size=args.tensor_parallel_size,
                       json_model_override_args=overrides)
    elif args.attention_backend or args.tensor_parallel_size != 1 or args.hf_overrides:
        print("error: --attention-backend, --tensor-parallel-size and --hf-overrides need --engine vllm",
              file=sys.stderr)
        return 2
    try:
        result = perplexity(args.model, engine=args.engine, text=text, window=args.window,
                            max_windows=args.max_windows, dtype=args.dtype, score=args.score,
                            show_progress=not args.json, **options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.summary())
    return 0


def _cmd_convert_mla_to_gla(args) -> int:
    from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
    from mla_plugin.convert.pipeline import ConversionError

    try:
        logit_scale = float(args.logit_scale)
    except ValueError:
        logit_scale = args.logit_scale  # "auto", or a bad value the converter refuses with its message
    try:
        report = convert_mla_to_gla(args.src, args.dst, shards=args.shards, softmax=args.softmax,
                                    rmsnorm=args.rmsnorm, basis=args.basis, logit_scale=logit_scale,
                                    calib_text=args.calib_text, calibrate=args.calibrate,
                                    calib_tokens=args.calib_tokens, calib_window=args.calib_window,
                                    allow_eval_text=args.allow_eval_text,
                                    dequantize=args.dequantize)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _cmd_convert_gqa_to_mla(args) -> int:
    from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
    from mla_plugin.convert.pipeline import ConversionError

    try:
        report = convert_gqa_to_mla(args.src, args.dst, kv_lora_rank=args.kv_lora_rank, rope_dim=args.rope_dim,
                                    freqfold=args.freqfold, calib_text=args.calib_text,
                                    calib_tokens=args.calib_tokens, calib_window=args.calib_window,
                                    balance=not args.no_balance, dtype=args.dtype,
                                    allow_eval_text=args.allow_eval_text)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


ALLOW_EVAL_TEXT_HELP = ("calibrate on --calib-text even though it is the evaluation text (the wikitext-2 test "
                        "split, recognised by content), which is refused otherwise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-plugin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="serve a tiny DeepSeek-V2 through the plugin and print a completion")
    demo.add_argument("--model", help="checkpoint to serve instead of the bundled tiny model")
    demo.add_argument("--prompt", default="The album was released in")
    demo.add_argument("--max-tokens", type=int, default=16)
    demo.add_argument("--max-model-len", type=int, default=512)
    demo.add_argument("--dtype", default="float32")
    demo.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server")
    demo.set_defaults(func=_cmd_demo)

    ppl = sub.add_parser(
        "ppl", help="wikitext-2 perplexity by the published protocol (docs/design.md, \"Perplexity protocol\")",
        description="Rows joined with '\\n\\n', tokenized once (BOS at the start only), non-overlapping "
                    "windows (remainder dropped), ppl = exp(mean of per-window mean NLL).")
    ppl.add_argument("model", help="checkpoint directory (or hub name where a hub is reachable)")
    ppl.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE)
    ppl.add_argument("--text", help="text file (default: wikitext-2-raw-v1 test split from `datasets`)")
    ppl.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                     help=f"tokens per window (default {DEFAULT_WINDOW})")
    ppl.add_argument("--max-windows", type=int, help="score only the first N windows")
    ppl.add_argument("--score", default=DEFAULT_SCORE, metavar="|".join(SCORE_MODES),
                     help="prefill: prompt logprobs of each window (fast). decode: the window's first token as "
                          "the prompt, every later token generated (forced onto the text) and scored through the "
                          "decode path; slower, use --max-windows "
                          f"(default {DEFAULT_SCORE})")
    ppl.add_argument("--dtype", default=DEFAULT_DTYPE,
                     help=f"{' / '.join(DTYPES)} (default {DEFAULT_DTYPE})")
    ppl.add_argument("--attention-backend", help="vLLM / SGLang attention backend, e.g. mla_plugin")
    ppl.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    ppl.add_argument("--json-model-override-args", help="SGLang: JSON merged into the model config "
                                                         "(e.g. '{\"mla_plugin\": {\"softmax\": \"exact\"}}')")
    ppl.add_argument("--hf-overrides", help="JSON passed to vLLM's hf_overrides")
    ppl.add_argument("--enforce-eager", action="store_true", help="vLLM: no torch.compile / CUDA graphs")
    ppl.add_argument("--compilation-config", help="JSON passed to vLLM's compilation_config")
    ppl.add_argument("--block-size", type=int, help="vLLM KV-cache block size")
    ppl.add_argument("--kv-cache-dtype", help="vLLM KV-cache dtype: auto (default), bfloat16, float16, or fp8 "
                                              "(e4m3, one byte per value; decode reads it, --score decode)")
    ppl.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")
    ppl.set_defaults(func=_cmd_ppl)

    convert = sub.add_parser("convert", help="checkpoint converters").add_subparsers(dest="converter", required=True)
    to_gla = convert.add_parser(
        "mla-to-gla",
        help="DeepSeek-V2/V3 (MLA; bf16 or fp8 blocks) -> sharded-latent layout served by mla_plugin_gla with no flags",
        description="Folds the latent RMSNorm weight into the up-projections, rotates the latent into the "
                    "chosen basis, folds the slice logit scale (approximate modes), and declares the layout "
                    "in config.json. Streams tensor by tensor.")
    to_gla.add_argument("src")
    to_gla.add_argument("dst", help="new or empty folder")
    to_gla.add_argument("--shards", type=int, required=True, help="g, the number of latent slices")
    to_gla.add_argument("--softmax", choices=SOFTMAX_MODES, default=convert_defaults.MLA_TO_GLA_SOFTMAX)
    to_gla.add_argument("--rmsnorm", choices=RMSNORM_MODES, default=convert_defaults.MLA_TO_GLA_RMSNORM)
    to_gla.add_argument("--basis", choices=CONVERTER_BASES, default=convert_defaults.MLA_TO_GLA_BASIS,
                        help="orthogonal basis the latent is rotated into before slicing: pca = PCA of the "
                             "up-projection weights, pca-act = PCA of the latent on --calib-text, group-pca "
                             "(--softmax grouped) = per head group its own projection of the latent fitted to "
                             "the group's keys and values on --calib-text "
                             f"(default {convert_defaults.MLA_TO_GLA_BASIS})")
    to_gla.add_argument("--logit-scale", default=convert_defaults.MLA_TO_GLA_LOGIT_SCALE,
                        help="number, or auto (g for partitioned); the starting point when calibrating")
    to_gla.add_argument("--calib-text", help="calibration text file for pca-act and --calibrate (train or "
                                             "validation text, never the test split)")
    to_gla.add_argument("--calibrate", choices=convert_defaults.CALIBRATE_MODES,
                        default=convert_defaults.MLA_TO_GLA_CALIBRATE,
                        help="fit a logit scale per (layer, head, slice) (logit), and an output scale too "
                             "(logit+output), to match the exact attention output on --calib-text; folded into "
                             "the weights. Loads the model once with transformers (whole model in memory)")
    to_gla.add_argument("--calib-tokens", type=int, default=convert_defaults.MLA_TO_GLA_CALIB_TOKENS,
                        help=f"calibration tokens used at most (default {convert_defaults.MLA_TO_GLA_CALIB_TOKENS})")
    to_gla.add_argument("--calib-window", type=int, default=convert_defaults.MLA_TO_GLA_CALIB_WINDOW,
                        help=f"tokens per calibration window (default {convert_defaults.MLA_TO_GLA_CALIB_WINDOW})")
    to_gla.add_argument("--allow-eval-text", action="store_true", help=ALLOW_EVAL_TEXT_HELP)
    to_gla.add_argument("--dequantize", action="store_true",
                        help="fp8 block-quantised source: write every fp8 weight (experts, q_b_proj, o_proj, ...) "
                             "in bf16, drop the block scales and quantization_config, so mla_plugin_gla serves "
                             "the output (it runs unquantised weights only); no-op for an unquantised source")
    to_gla.set_defaults(func=_cmd_convert_mla_to_gla)

    to_mla = convert.add_parser(
        "gqa-to-mla", help="Llama/Mistral/Qwen2 (GQA or MHA) -> DeepSeek-V2-style MLA (TransMLA-style)",
        description="RoRoPE (+ FreqFold) keeps RoPE on --rope-dim key dims shared by all heads; BKV-PCA "
                    "compresses the other key dims and the values into a --kv-lora-rank latent. The output "
                    "has no latent RMSNorm; vLLM with the plugin serves it with no flags, transformers "
                    "loads it with trust_remote_code=True. Exact form: --rope-dim = kv_heads x head_dim "
                    "and --kv-lora-rank = kv_heads x head_dim (no calibration needed).")
    to_mla.add_argument("src")
    to_mla.add_argument("dst", help="new or empty folder")
    to_mla.add_argument("--kv-lora-rank", type=int, required=True, metavar="D_C",
                        help="latent width d_c (kv_lora_rank)")
    to_mla.add_argument("--rope-dim", type=int, required=True, metavar="D_R",
                        help="rope key dims d_R (qk_rope_head_dim): a multiple of head_dim / freqfold")
    to_mla.add_argument("--freqfold", type=int, default=convert_defaults.GQA_TO_MLA_FREQFOLD,
                        help="neighbouring rope frequencies folded together")
    to_mla.add_argument("--calib-text", help="calibration text file (train or validation text, never the "
                                             "test split); needed unless the settings are exact")
    to_mla.add_argument("--calib-tokens", type=int, default=convert_defaults.GQA_TO_MLA_CALIB_TOKENS,
                        help=f"calibration tokens (default {convert_defaults.GQA_TO_MLA_CALIB_TOKENS})")
    to_mla.add_argument("--calib-window", type=int, default=convert_defaults.GQA_TO_MLA_CALIB_WINDOW,
                        help="tokens per calibration window")
    to_mla.add_argument("--no-balance", action="store_true", help="skip the K/V norm balance before the PCA")
    to_mla.add_argument("--dtype", choices=convert_defaults.OUTPUT_DTYPES,
                        help="dtype of the written weights (default: the source's)")
    to_mla.add_argument("--allow-eval-text", action="store_true", help=ALLOW_EVAL_TEXT_HELP)
    to_mla.set_defaults(func=_cmd_convert_gqa_to_mla)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random DeepSeek-V2 checkpoint")
    tiny.add_argument("dst")
    tiny.add_argument("--kv-lora-rank", type=int, default=512)
    tiny.add_argument("--rope-dim", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_make_tiny_model)
    return parser


def main(argv=None) -> int:
    """Run one command; bad input (``MLAPluginInputError``) is one line, ``error: ...``, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MLAPluginInputError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
