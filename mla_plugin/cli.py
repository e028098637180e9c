"""`mla-plugin`: command-line tools around the vLLM / SGLang plugin.

    mla-plugin demo                 serve a bundled tiny DeepSeek-V2 through the plugin (needs vLLM)
    mla-plugin ppl MODEL            wikitext-2 perplexity (vLLM, SGLang or transformers engine)
    mla-plugin convert mla-to-gla SRC DST --shards G   DeepSeek-V2/V3 (bf16 or fp8) -> sharded-latent layout
    mla-plugin convert gqa-to-mla SRC DST --kv-lora-rank D_C --rope-dim D_R   Llama/Qwen2/Mistral -> MLA
    mla-plugin make-tiny-model DIR  write a tiny random DeepSeek-V2 checkpoint
    mla-plugin plan MODEL --tp N    cache, weights and collectives per rank of each MLA parallel mode

`mla-plugin COMMAND --help` shows each command's options with their defaults and an example.
"""

import argparse
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

from mla_plugin import __version__
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
    work = Path(tempfile.mkdtemp(prefix="mla_plugin_demo_"))
    try:
        return _run_demo(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the server log and the decode trace: gone, also on failure


def _run_demo(args, work: Path) -> int:
    from tqdm import tqdm

    from mla_plugin.fixtures import trained_fixture
    from mla_plugin.serving import post_json, start_server, stop_server, wait_ready

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
    try:
        server = start_server(model, work / "server.log", serve_args=serve_args,
                              env={"MLA_PLUGIN_TRACE_FILE": str(trace)})
    except OSError as err:  # no `vllm` in this environment, or it cannot be run
        print(f"error: cannot start vllm serve: {err}; install vLLM beside the plugin "
              "(pip install \"mla_plugin[vllm]\")", file=sys.stderr)
        return 1
    print(f"[2/3] vllm serve {model} {' '.join(serve_args)}  (pid {server.proc.pid})")
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
        print(f"error: {err}", file=sys.stderr)  # a server that died or hung: its log's tail is in err
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
    note = approximation_note(args.softmax, args.rmsnorm)
    if note:
        print(note)
    return 0


def approximation_note(softmax: str, rmsnorm: str) -> str | None:
    """One line when mla-to-gla wrote an approximation of its source, and what exact would keep."""
    changed = [f"--{flag} {value}" for flag, value, exact in (("softmax", softmax, "exact"),
                                                              ("rmsnorm", rmsnorm, "global")) if value != exact]
    if not changed:
        return None
    return (f"note: {' '.join(changed)} wrote an approximation: the converted model computes a different function "
            "from its source (compare them with `mla-plugin ppl`); --softmax exact --rmsnorm global would keep the "
            "source's outputs with the same KV cache per rank, at one all-reduce of the attention logits per layer")


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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; an option whose default is None says in its
    help what happens without it; a flag shows "(default: off)"."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in help_text \
                or not action.option_strings:
            return help_text
        if action.default is False and action.nargs == 0:
            return help_text + " (default: off)"
        return help_text + " (default: %(default)s)"


def _command(sub, name: str, *, help: str, example: str, description: str | None = None):
    """A subcommand whose --help shows every default and ends with an example."""
    return sub.add_parser(name, help=help, description=textwrap.fill(description or help, 100),
                          formatter_class=_HelpFormatter, epilog="example:\n  " + example)


def _add_demo(sub) -> None:
    demo = _command(sub, "demo", help="serve a tiny DeepSeek-V2 through the plugin with `vllm serve` and print "
                                      "a completion (needs vLLM in this environment)",
                    example="mla-plugin demo --prompt 'The album was released in' --max-tokens 16")
    demo.add_argument("--model", help="checkpoint to serve (default: the bundled tiny DeepSeek-V2)")
    demo.add_argument("--prompt", default="The album was released in", help="prompt of the one completion")
    demo.add_argument("--max-tokens", type=int, default=16, help="tokens generated (greedy)")
    demo.add_argument("--max-model-len", type=int, default=512, help="vllm serve --max-model-len")
    demo.add_argument("--dtype", default="float32", help="vllm serve --dtype")
    demo.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server to be ready")
    demo.set_defaults(func=_cmd_demo)


def _add_ppl(sub) -> None:
    ppl = _command(
        sub, "ppl", help="wikitext-2 perplexity by the published protocol",
        description="Rows joined with '\\n\\n', tokenized once (BOS at the start only), non-overlapping "
                    "windows (remainder dropped), ppl = exp(mean of per-window mean NLL).",
        example="mla-plugin ppl MODEL --text wiki.test.raw --attention-backend mla_plugin --max-windows 8")
    ppl.add_argument("model", help="checkpoint directory (or hub name where a hub is reachable)")
    ppl.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                     help="who runs the model (sglang: from an environment with SGLang installed)")
    ppl.add_argument("--text", help="text file to score (default: the wikitext-2-raw-v1 test split from the "
                                    "`datasets` package: pip install \"mla_plugin[datasets]\")")
    ppl.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per window")
    ppl.add_argument("--max-windows", type=int, help="score only the first N windows (default: all)")
    ppl.add_argument("--score", default=DEFAULT_SCORE, metavar="|".join(SCORE_MODES),
                     help="prefill: prompt logprobs of each window (fast). decode: the window's first token as "
                          "the prompt, every later token generated (forced onto the text) and scored through the "
                          "decode path; slower, use --max-windows")
    ppl.add_argument("--dtype", default=DEFAULT_DTYPE, metavar="|".join(DTYPES), help="model dtype")
    ppl.add_argument("--attention-backend", help="vLLM / SGLang attention backend, e.g. mla_plugin "
                                                 "(default: the engine's choice)")
    ppl.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, help="TP size (vLLM, SGLang)")
    ppl.add_argument("--json-model-override-args", help="SGLang: JSON merged into the model config "
                                                         "(e.g. '{\"mla_plugin\": {\"softmax\": \"exact\"}}') "
                                                         "(default: none)")
    ppl.add_argument("--hf-overrides", help="vLLM: JSON merged into the model config (vLLM's hf_overrides) "
                                                 "(default: none)")
    ppl.add_argument("--enforce-eager", action="store_true", help="vLLM: no torch.compile / CUDA graphs")
    ppl.add_argument("--compilation-config", help="vLLM: JSON passed as compilation_config "
                                                       "(default: vLLM's)")
    ppl.add_argument("--block-size", type=int, help="vLLM KV-cache block size (default: vLLM's)")
    ppl.add_argument("--kv-cache-dtype", help="vLLM KV-cache dtype: auto, bfloat16, float16, or fp8 (e4m3, one "
                                              "byte per value; decode reads it, --score decode) (default: auto)")
    ppl.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")
    ppl.set_defaults(func=_cmd_ppl)


def _add_mla_to_gla(convert) -> None:
    to_gla = _command(
        convert, "mla-to-gla",
        help="DeepSeek-V2/V3 (MLA; bf16 or fp8 blocks) -> sharded-latent layout served by mla_plugin_gla "
             "with no flags",
        description="Folds the latent RMSNorm weight into the up-projections, rotates the latent into the "
                    "chosen basis, folds the slice logit scale (approximate modes), and declares the layout "
                    "in config.json. Streams tensor by tensor. --softmax exact (with --rmsnorm global) keeps "
                    "the source's outputs; partitioned and grouped are approximations (a different function: "
                    "check it with `mla-plugin ppl`).",
        example="mla-plugin convert mla-to-gla deepseek-v2-lite/ dsv2-lite-g2/ --shards 2 --softmax exact")
    to_gla.add_argument("src", help="source checkpoint folder (DeepSeek-V2/V3 layout)")
    to_gla.add_argument("dst", help="output folder: new or empty")
    to_gla.add_argument("--shards", type=int, required=True, help="g, the number of latent slices (required)")
    to_gla.add_argument("--softmax", choices=SOFTMAX_MODES, default=convert_defaults.MLA_TO_GLA_SOFTMAX,
                        help="exact: = the source (one all-reduce of the logits per layer); partitioned: one "
                             "softmax per slice, outputs summed (approximation); grouped: head group j reads "
                             "slice j only (approximation; splits the heads too)")
    to_gla.add_argument("--rmsnorm", choices=RMSNORM_MODES, default=convert_defaults.MLA_TO_GLA_RMSNORM,
                        help="global: the latent RMSNorm over the whole latent (= the source); local: per slice, "
                             "as a GLA-trained model does (approximation)")
    to_gla.add_argument("--basis", choices=CONVERTER_BASES, default=convert_defaults.MLA_TO_GLA_BASIS,
                        help="orthogonal basis the latent is rotated into before slicing: pca = PCA of the "
                             "up-projection weights, pca-act = PCA of the latent on --calib-text, group-pca "
                             "(--softmax grouped) = per head group its own projection of the latent fitted to "
                             "the group's keys and values on --calib-text")
    to_gla.add_argument("--logit-scale", default=convert_defaults.MLA_TO_GLA_LOGIT_SCALE,
                        help="number, or auto (g for partitioned, 1 for grouped); the starting point when "
                             "calibrating")
    to_gla.add_argument("--calib-text", help="calibration text file for pca-act, group-pca and --calibrate (train "
                                             "or validation text, never the test split) (default: none)")
    to_gla.add_argument("--calibrate", choices=convert_defaults.CALIBRATE_MODES,
                        default=convert_defaults.MLA_TO_GLA_CALIBRATE,
                        help="fit a logit scale per (layer, head, slice) (logit), and an output scale too "
                             "(logit+output), to match the exact attention output on --calib-text; folded into "
                             "the weights. Loads the model once with transformers (whole model in memory)")
    to_gla.add_argument("--calib-tokens", type=int, default=convert_defaults.MLA_TO_GLA_CALIB_TOKENS,
                        help="calibration tokens used at most")
    to_gla.add_argument("--calib-window", type=int, default=convert_defaults.MLA_TO_GLA_CALIB_WINDOW,
                        help="tokens per calibration window")
    to_gla.add_argument("--allow-eval-text", action="store_true", help=ALLOW_EVAL_TEXT_HELP)
    to_gla.add_argument("--dequantize", action="store_true",
                        help="fp8 block-quantised source: write every fp8 weight (experts, q_b_proj, o_proj, ...) "
                             "in bf16, drop the block scales and quantization_config, so mla_plugin_gla serves "
                             "the output (it runs unquantised weights only); no-op for an unquantised source")
    to_gla.set_defaults(func=_cmd_convert_mla_to_gla)


def _add_gqa_to_mla(convert) -> None:
    to_mla = _command(
        convert, "gqa-to-mla", help="Llama/Mistral/Qwen2 (GQA or MHA) -> DeepSeek-V2-style MLA (TransMLA-style)",
        description="RoRoPE (+ FreqFold) keeps RoPE on --rope-dim key dims shared by all heads; BKV-PCA "
                    "compresses the other key dims and the values into a --kv-lora-rank latent. The output "
                    "has no latent RMSNorm; vLLM with the plugin serves it with no flags, transformers "
                    "loads it with trust_remote_code=True. Exact form: --rope-dim = kv_heads x head_dim "
                    "and --kv-lora-rank = kv_heads x head_dim (no calibration needed).",
        example="mla-plugin convert gqa-to-mla llama/ llama-mla/ --kv-lora-rank 448 --rope-dim 64 --freqfold 2 "
                "--calib-text wiki.valid.raw")
    to_mla.add_argument("src", help="source checkpoint folder (Llama, Mistral or Qwen2 layout)")
    to_mla.add_argument("dst", help="output folder: new or empty")
    to_mla.add_argument("--kv-lora-rank", type=int, required=True, metavar="D_C",
                        help="latent width d_c (kv_lora_rank) (required)")
    to_mla.add_argument("--rope-dim", type=int, required=True, metavar="D_R",
                        help="rope key dims d_R (qk_rope_head_dim): a multiple of head_dim / freqfold (required)")
    to_mla.add_argument("--freqfold", type=int, default=convert_defaults.GQA_TO_MLA_FREQFOLD,
                        help="neighbouring rope frequencies folded together")
    to_mla.add_argument("--calib-text", help="calibration text file (train or validation text, never the "
                                             "test split); needed unless the settings are exact (default: none)")
    to_mla.add_argument("--calib-tokens", type=int, default=convert_defaults.GQA_TO_MLA_CALIB_TOKENS,
                        help="calibration tokens")
    to_mla.add_argument("--calib-window", type=int, default=convert_defaults.GQA_TO_MLA_CALIB_WINDOW,
                        help="tokens per calibration window")
    to_mla.add_argument("--no-balance", action="store_true", help="skip the K/V norm balance before the PCA")
    to_mla.add_argument("--dtype", choices=convert_defaults.OUTPUT_DTYPES,
                        help="dtype of the written weights (default: the source's)")
    to_mla.add_argument("--allow-eval-text", action="store_true", help=ALLOW_EVAL_TEXT_HELP)
    to_mla.set_defaults(func=_cmd_convert_gqa_to_mla)


def _add_make_tiny_model(sub) -> None:
    tiny = _command(sub, "make-tiny-model", help="write a tiny random DeepSeek-V2 checkpoint (for trying things)",
                    example="mla-plugin make-tiny-model /tmp/tiny-dsv2 --kv-lora-rank 256 --rope-dim 32")
    tiny.add_argument("dst", help="output folder: new or empty")
    tiny.add_argument("--kv-lora-rank", type=int, default=512, help="latent width d_c")
    tiny.add_argument("--rope-dim", type=int, default=64, help="rope key dims d_R")
    tiny.add_argument("--heads", type=int, default=4, help="attention heads")
    tiny.add_argument("--layers", type=int, default=2, help="decoder layers")
    tiny.add_argument("--hidden-size", type=int, default=128, help="model width")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.set_defaults(func=_cmd_make_tiny_model)


def _cmd_plan(args) -> int:
    from mla_plugin.plan import Step, check_options, load_shape, render

    check_options(args.tp, args.batch, args.context, args.kv_cache_dtype)
    shape = load_shape(args.model)
    print(render(shape, args.tp, Step(batch=args.batch, context=args.context), args.kv_cache_dtype,
                 args.format), end="")
    return 0


def _add_plan(sub) -> None:
    from mla_plugin import plan

    parser = _command(
        sub, "plan", help="per rank: cache, attention weights and collectives of MLA TP, DCP, DP-attention and "
                          "the sharded latent's modes, computed from a model config",
        description="Computed from the config with plain arithmetic (mla_plugin/plan.py), not measured: values "
                    "cached per token per rank, tokens per GiB per rank, attention weights per rank, the "
                    "collectives each layer runs per decode step with their bytes, and whether the mode "
                    "computes MLA's function. A mode that cannot run at --tp is shown as 'not possible: why'.",
        example="mla-plugin plan docs/plan_configs/deepseek-v3.json --tp 8 --format markdown")
    parser.add_argument("model", help="checkpoint folder (its config.json) or a config.json path of a "
                                      "DeepSeek-V2/V3-style (MLA) model")
    parser.add_argument("--tp", type=int, required=True, help="N, the ranks (TP size; DCP size; DP size; "
                                                               "latent slices g) (required)")
    parser.add_argument("--batch", type=int, default=plan.DEFAULT_BATCH,
                        help="B, requests decoding one token in the step (over all ranks)")
    parser.add_argument("--context", type=int, default=plan.DEFAULT_CONTEXT,
                        help="C, cached tokens per request (sizes exact mode's logits all-reduce)")
    parser.add_argument("--kv-cache-dtype", choices=tuple(plan.CACHE_DTYPES), default=plan.DEFAULT_CACHE_DTYPE,
                        help="bytes per cached value: bf16 2, fp8 (e4m3, one per-layer scale) 1")
    parser.add_argument("--format", choices=plan.FORMATS, default="text", help="aligned text or Markdown tables")
    parser.set_defaults(func=_cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-plugin", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_ppl(sub)
    convert = _command(sub, "convert", help="checkpoint converters (mla-to-gla, gqa-to-mla)",
                       example="mla-plugin convert mla-to-gla SRC DST --shards 2 --softmax exact")
    converters = convert.add_subparsers(dest="converter", required=True, metavar="CONVERTER")
    _add_mla_to_gla(converters)
    _add_gqa_to_mla(converters)
    _add_make_tiny_model(sub)
    _add_plan(sub)
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
