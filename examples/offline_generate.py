"""Offline generation with vLLM's `LLM(...)` through the plugin's MLA backend.

What it shows: asking vLLM for the plugin by name (`attention_backend="mla_plugin"`),
greedy completions of a few prompts, and proof that the plugin's own decode ran (its
per-process call counter, `mla_plugin.vllm.mla_backend.DECODE_CALLS`), not vLLM's
MLA backend under another name.

Run it (the default model is the bundled tiny DeepSeek-V2; about half a minute on 2 CPU cores):

    .venv/bin/python examples/offline_generate.py
    .venv/bin/python examples/offline_generate.py --model /path/to/deepseek-v2-lite --max-tokens 32 \
        --prompt "The capital of France is"

Exit status 0 when the completions came from the plugin's decode, 1 otherwise.
"""

import argparse
import os
import sys

# vLLM's engine core in this process: it starts faster, and DECODE_CALLS below sees its calls.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# GiB of KV cache on CPU (vLLM's default takes a large share of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from mla_plugin.fixtures import trained_fixture  # noqa: E402

PROMPTS = [
    "The album was released in",
    "The tower is 324 metres tall , about the same height as",
    "In the early 20th century , the city",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(trained_fixture("deepseek-v2-tiny")),
                        help="DeepSeek-V2-style checkpoint (default: the bundled tiny DeepSeek-V2)")
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help="a prompt (repeat for several; default: three built-in prompts)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    parser.add_argument("--max-model-len", type=int, default=512)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from vllm import LLM, SamplingParams

    from mla_plugin.vllm.engine import exact_cpu_engine
    from mla_plugin.vllm.mla_backend import DECODE_CALLS

    # On CPU: eager, vLLM's reference ops, float32 (README, "CPU notes"). On a GPU: vLLM's defaults.
    engine = {} if torch.cuda.is_available() else exact_cpu_engine(dtype="float32")
    llm = LLM(args.model, attention_backend="mla_plugin", max_model_len=args.max_model_len, **engine)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    outputs = llm.generate(args.prompts or PROMPTS, greedy)

    print(f"\nmodel: {args.model}")
    for out in outputs:
        print(f"prompt:     {out.prompt!r}")
        print(f"completion: {out.outputs[0].text!r}")
    calls = DECODE_CALLS.get("MLA_PLUGIN", 0)
    if calls == 0:
        print("error: no mla_plugin decode call in this process; did another backend serve the model?",
              file=sys.stderr)
        return 1
    print(f"mla_plugin decode calls in this process: {calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
