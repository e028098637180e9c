"""Convert a DeepSeek-V2 checkpoint to the sharded-latent layout, then load it with no flags.

What it shows: `mla-plugin convert mla-to-gla` (here through its Python API,
`convert_mla_to_gla`) writes a checkpoint whose config.json declares the layout and its
options; vLLM with the plugin installed then serves it with NO `attention_backend` and
NO `hf_overrides`: the checkpoint selects the plugin's sharded-latent backend
(MLA_PLUGIN_GLA) by itself. The same as the command line:

    .venv/bin/mla-plugin convert mla-to-gla SRC DST --shards 2 --softmax partitioned
    vllm serve DST

Run it (default: the bundled tiny DeepSeek-V2 into a temporary folder; about a minute on 2 CPU cores):

    .venv/bin/python examples/convert_then_serve.py
    .venv/bin/python examples/convert_then_serve.py --model /path/to/deepseek-v2-lite --out /data/lite-g2

Exit status 0 when the converted checkpoint was served by MLA_PLUGIN_GLA, 1 otherwise.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# vLLM's engine core in this process: it starts faster, and DECODE_CALLS below sees its calls.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# GiB of KV cache on CPU (vLLM's default takes a large share of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from mla_plugin.fixtures import trained_fixture  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(trained_fixture("deepseek-v2-tiny")),
                        help="DeepSeek-V2-style source checkpoint (default: the bundled tiny DeepSeek-V2)")
    parser.add_argument("--out", type=Path,
                        help="new or empty folder for the converted checkpoint (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--shards", type=int, default=2, help="g, the number of latent slices (default 2)")
    parser.add_argument("--softmax", default="partitioned", help="exact, partitioned or grouped (default partitioned)")
    parser.add_argument("--basis", default="hadamard", help="identity, hadamard or pca (default hadamard)")
    parser.add_argument("--prompt", default="The album was released in")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    return parser.parse_args(argv)


def convert(args, dst: Path) -> None:
    from mla_plugin.convert.mla_to_gla import convert_mla_to_gla

    print(f"[1/2] mla-plugin convert mla-to-gla {args.model} {dst} --shards {args.shards} "
          f"--softmax {args.softmax} --basis {args.basis}")
    report = convert_mla_to_gla(args.model, dst, shards=args.shards, softmax=args.softmax, basis=args.basis,
                                show_progress=False)
    print(report.summary())
    declared = json.loads((dst / "config.json").read_text())["mla_plugin"]
    print(f"config.json declares: \"mla_plugin\": {json.dumps(declared)}")


def serve(args, dst: Path) -> int:
    import torch
    from vllm import LLM, SamplingParams

    from mla_plugin.vllm.engine import exact_cpu_engine
    from mla_plugin.vllm.mla_backend import DECODE_CALLS

    print(f"[2/2] LLM({str(dst)!r})  (no attention_backend, no hf_overrides)")
    # On CPU: eager, vLLM's reference ops, float32 (README, "CPU notes"). On a GPU: vLLM's defaults.
    engine = {} if torch.cuda.is_available() else exact_cpu_engine(dtype="float32")
    llm = LLM(str(dst), max_model_len=args.max_model_len, **engine)
    out = llm.generate([args.prompt], SamplingParams(temperature=0, max_tokens=args.max_tokens))[0]
    print(f"prompt:     {out.prompt!r}")
    print(f"completion: {out.outputs[0].text!r}")
    ran = {name: calls for name, calls in DECODE_CALLS.items() if calls}
    if "MLA_PLUGIN_GLA" not in ran:
        print(f"error: the sharded-latent decode did not run (decode calls per backend: {ran}); "
              "is mla_plugin installed in this environment?", file=sys.stderr)
        return 1
    print(f"backend selected by the checkpoint: MLA_PLUGIN_GLA ({ran['MLA_PLUGIN_GLA']} decode calls)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    dst = args.out or Path(tempfile.mkdtemp(prefix="mla_plugin_converted_")) / "model"
    try:
        convert(args, dst)
        return serve(args, dst)
    finally:
        if args.out is None:
            shutil.rmtree(dst.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
