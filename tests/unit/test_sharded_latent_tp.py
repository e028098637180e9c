"""Sharded-latent attention across two real processes (torch.distributed, gloo, CPU).

Each rank holds half of the latent shards and its slice of the queries; ``exact`` mode
all-reduces the partial latent logits with ``torch.distributed.all_reduce``. The ranks'
outputs, concatenated along the latent dim, must equal the single-process result.
"""

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mla_plugin.ops.paged_attention import paged_latent_attention
from mla_plugin.ops.sharded_latent import SOFTMAX_MODES, LatentSlices
from tests.unit.paged_cases import (
    MIXED_REQUESTS,
    make_batch,
    mla_reference,
    per_request,
    random_logit_scale,
    rank_view,
)

WORLD = 2
SHARD_COUNTS = (2, 4)
D_C, D_R, HEADS, BLOCK_SIZE = 32, 16, 8, 8


def rank_outputs(rank: int, world: int, inputs: dict, all_reduce) -> dict:
    """This rank's outputs for every (num_shards, mode), holding shards [rank*g/world, ...)."""
    results = {}
    for num_shards in SHARD_COUNTS:
        local = num_shards // world
        offset = rank * local
        cache, q_part = rank_view(inputs["cache"], inputs["q_lat"], D_C, num_shards, offset, local)
        for mode in SOFTMAX_MODES:
            slices = LatentSlices(
                num_shards=num_shards, shard_offset=offset, shards_local=local, softmax=mode,
                logit_scale=None if mode == "exact" else inputs["lam"][num_shards],
            )
            results[(num_shards, mode)] = paged_latent_attention(
                q_part, inputs["q_rope"], cache, inputs["qsl"], inputs["seq_lens"], inputs["block_table"],
                inputs["scale"], slices=slices, all_reduce=all_reduce if mode == "exact" else None,
                chunk_tokens=16,
            )
    return results


def tp_worker(rank: int, world: int, init_file: str, inputs: dict, out_dir: str) -> None:
    """Spawned entry point: join the gloo group on loopback, compute, save this rank's outputs."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # stay on 127.0.0.1
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        results = rank_outputs(rank, world, inputs, dist.all_reduce)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(tmp_path, rng):
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, D_C, D_R, HEADS, BLOCK_SIZE, torch.float32, rng)
    inputs = dict(
        cache=case.cache, q_lat=q_lat, q_rope=q_rope, qsl=qsl, seq_lens=case.seq_lens,
        block_table=case.block_table, scale=1.0 / math.sqrt(D_C + D_R),
        lam={g: random_logit_scale(HEADS, g, rng).float() for g in SHARD_COUNTS},
    )
    mp.spawn(
        tp_worker, args=(WORLD, str(tmp_path / "rendezvous"), inputs, str(tmp_path)),
        nprocs=WORLD, join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = rank_outputs(0, 1, inputs, None)  # one process holding every shard
    mla = mla_reference(q_lat, q_rope, qsl, case, inputs["scale"])
    for key, whole in single.items():
        joined = torch.cat([r[key] for r in ranks], dim=-1)  # [T, H, d_c]
        torch.testing.assert_close(joined, whole, atol=2e-5, rtol=2e-5, msg=lambda m: f"{key}: {m}")
        if key[1] == "exact":
            for got, want in zip(per_request(joined, qsl), mla):
                torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{key}: {m}")
