"""A perplexity regression check to put in your own CI.

What it shows: `mla_plugin.eval.perplexity(...)` (the wikitext-2 protocol: text tokenized
once, non-overlapping windows, ppl = exp(mean window NLL)) on the first N windows of a
text file, compared with a baseline you recorded once. It exits 1 with a message when
the perplexity is worse than the baseline by more than the relative tolerance, and 0
otherwise, so a CI job fails when a change (a new vLLM, a converter setting, a backend)
makes the model worse.

Run it (default model: the bundled tiny DeepSeek-V2; about half a minute on 2 CPU cores):

    .venv/bin/python examples/ppl_regression_check.py --text wikitext-2-raw/wiki.test.raw \
        --baseline 363.2201 [--rel-tol 0.01] [--window 256] [--max-windows 8] \
        [--attention-backend mla_plugin] [--engine vllm|transformers]

(363.2201: the bundled fixture on the first 8 windows of 256 of wikitext-2's test split,
float32, in vLLM and in transformers alike.) Record your baseline with the same settings
(the ppl this script prints), on the same kind of hardware and dtype.
"""

import argparse
import os
import sys

# vLLM's engine core in this process: it starts faster.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# GiB of KV cache on CPU (vLLM's default takes a large share of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from mla_plugin.fixtures import trained_fixture  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(trained_fixture("deepseek-v2-tiny")),
                        help="checkpoint to score (default: the bundled tiny DeepSeek-V2)")
    parser.add_argument("--text", required=True, help="text file to score, e.g. wikitext-2's test.raw.txt")
    parser.add_argument("--baseline", type=float, required=True, help="the perplexity recorded before")
    parser.add_argument("--rel-tol", type=float, default=0.01,
                        help="allowed relative increase over the baseline (default 0.01 = 1%%)")
    parser.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--max-windows", type=int, default=8, help="score the first N windows (default 8)")
    parser.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--attention-backend", default="mla_plugin",
                        help="vLLM attention backend (default mla_plugin); 'auto' lets vLLM choose")
    parser.add_argument("--dtype", default="float32")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mla_plugin.eval import perplexity

    engine_options = {}
    if args.engine == "vllm":
        import torch

        from mla_plugin.vllm.engine import exact_cpu_engine

        # On CPU: eager, vLLM's reference ops (README, "CPU notes"). On a GPU: vLLM's defaults.
        engine_options = {} if torch.cuda.is_available() else exact_cpu_engine()
        engine_options["attention_backend"] = None if args.attention_backend == "auto" else args.attention_backend
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    result = perplexity(args.model, engine=args.engine, text=text, window=args.window,
                        max_windows=args.max_windows, dtype=args.dtype, show_progress=False, **engine_options)
    print(result.summary())

    limit = args.baseline * (1 + args.rel_tol)
    change = result.ppl / args.baseline - 1
    if result.ppl > limit:
        print(f"FAIL: ppl {result.ppl:.4f} is {change:+.2%} against the baseline {args.baseline:.4f} "
              f"(allowed: up to {limit:.4f}, --rel-tol {args.rel_tol}). Find the change that made the model "
              "worse, or, if it is intended, record the new baseline.", file=sys.stderr)
        return 1
    print(f"OK: ppl {result.ppl:.4f} is {change:+.2%} against the baseline {args.baseline:.4f} "
          f"(allowed: up to {limit:.4f})")
    if result.ppl < args.baseline * (1 - args.rel_tol):
        print("note: better than the baseline by more than the tolerance; consider recording the new baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
