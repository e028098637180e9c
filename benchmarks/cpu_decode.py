"""Decode speed on CPU: mla_plugin's backend against vLLM's CPU_MLA, same run.

Two tables:
  1. the decode op alone on one random paged cache (ours: mla_plugin.ops.paged_latent_attention;
     CPU_MLA: vLLM's mla_decode_kvcache_cpu kernel), time per call and their ratio;
  2. whole engines on the same tiny DeepSeek-V2: decode tokens/s through each backend.

    .venv/bin/python benchmarks/cpu_decode.py [--quick]
"""

import argparse
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mla_bench_"))

import torch  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def op_table(batches, contexts, heads, dtype, reps) -> list[str]:
    from vllm import _custom_ops as vllm_ops

    from mla_plugin.ops import paged_latent_attention

    d_c, d_r, block_size = 512, 64, 16
    rows = ["| batch | context | heads | ours ms/call | CPU_MLA ms/call | ours / CPU_MLA | max abs diff |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        for ctx in contexts:
            blocks_per_seq = math.ceil(ctx / block_size)
            num_blocks = batch * blocks_per_seq
            cache = torch.randn(num_blocks, block_size, d_c + d_r, generator=gen).to(dtype)
            table = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).to(torch.int32)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
            q = torch.randn(batch, heads, d_c + d_r, generator=gen).to(dtype)
            starts = torch.arange(batch + 1, dtype=torch.int32)  # one query per request
            scale = (128 + 64) ** -0.5

            def ours():  # as MLA_PLUGIN's forward_mqa calls it
                return paged_latent_attention(q[..., :d_c], q[..., d_c:], cache, starts, seq_lens, table, scale,
                                              max_query_len=1, max_seq_len=ctx, return_lse=True)[0]

            out_ref = torch.zeros(batch, heads, d_c, dtype=dtype)

            def cpu_mla():
                vllm_ops.mla_decode_kvcache_cpu(out_ref, q, cache, scale, table, seq_lens)
                return out_ref

            t_ours, t_ref = _time(ours, reps), _time(cpu_mla, reps)
            diff = (ours().float() - cpu_mla().float()).abs().max().item()
            rows.append(f"| {batch} | {ctx} | {heads} | {t_ours*1e3:.2f} | {t_ref*1e3:.2f} | "
                        f"{t_ours / t_ref:.2f} | {diff:.1e} |")
    return rows


def engine_table(batch, prompt_tokens, new_tokens) -> list[str]:
    from vllm import LLM, SamplingParams

    from mla_plugin.fixtures import make_tiny_deepseek_v2
    from mla_plugin.vllm.engine import exact_cpu_engine, release_engine

    model = str(make_tiny_deepseek_v2(tempfile.mkdtemp(prefix="mla_bench_model_"), seed=0, num_layers=4,
                                      num_heads=16, hidden_size=256))
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 4000 + 3 for j in range(prompt_tokens)]}
               for i in range(batch)]
    rows = ["| backend | batch | prompt | new tokens | decode tokens/s | ratio to CPU_MLA |",
            "|---|---:|---:|---:|---:|---:|"]
    speeds = {}
    for backend in ("CPU_MLA", "MLA_PLUGIN"):
        llm = LLM(model, attention_backend=backend, **exact_cpu_engine(
            dtype="float32", max_model_len=prompt_tokens + new_tokens + 16, max_num_seqs=batch, seed=0))

        def gen(n):
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        gen(2)  # warm-up
        prefill = min(gen(1) for _ in range(2))
        total = min(gen(new_tokens) for _ in range(2))
        speeds[backend] = batch * (new_tokens - 1) / max(total - prefill, 1e-9)
        del llm
        release_engine()
    for backend, speed in speeds.items():
        rows.append(f"| {backend} | {batch} | {prompt_tokens} | {new_tokens} | {speed:.0f} | "
                    f"{speed / speeds['CPU_MLA']:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [1, 8] if args.quick else [1, 8, 32]
    contexts = [256, 1024] if args.quick else [256, 1024, 4096]
    print(f"# CPU decode benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads}, torch {torch.__version__})\n")
    print("## Decode op, d_c 512 + d_R 64, block 16, float32, median of repeats\n")
    print("\n".join(op_table(batches, contexts, 16, torch.float32, 3 if args.quick else 10)))
    print("\n## Engine decode, tiny DeepSeek-V2 (4 layers, 16 heads, 512 + 64), float32\n")
    print("\n".join(engine_table(8 if args.quick else 16, 128, 16 if args.quick else 64)))


if __name__ == "__main__":
    main()
