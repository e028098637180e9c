"""Both converters stream: a multi-shard checkpoint converts in a process whose memory
limit is well below the checkpoint's size, and the result equals an in-memory conversion.

The limit is RLIMIT_DATA (private writable memory: every tensor torch allocates), set in
a subprocess after its imports. RLIMIT_AS would also count the read-only mmaps through
which safetensors reads, which are page cache, not the process's memory. A control run
shows the limit bites: loading the whole checkpoint under it fails.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mla_plugin.fixtures import make_tiny_deepseek_v2, make_tiny_llama
from mla_plugin.ops.latent_basis import fold_latent_weights

LIMIT_MB = 96  # headroom above the process's footprint after imports

CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from safetensors.torch import load_file
    from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
    from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla

    kind, src, dst, limit_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def data_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1])
    start = data_kb()
    cap = (start + limit_mb * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    try:
        if kind == "control":
            from pathlib import Path
            whole = {}
            for f in sorted(Path(src).glob("*.safetensors")):
                whole.update(load_file(str(f)))
            outcome = "loaded"
        elif kind == "mla-to-gla":
            convert_mla_to_gla(src, dst, shards=2, softmax="partitioned", basis="hadamard", show_progress=False)
            outcome = "converted"
        else:
            convert_gqa_to_mla(src, dst, rope_dim=2 * 32, kv_lora_rank=2 * 32, show_progress=False)
            outcome = "converted"
    except (MemoryError, RuntimeError) as err:
        outcome = "out of memory: " + str(err).splitlines()[0][:200]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(outcome=outcome, start_data_mb=start / 1024, peak_rss_mb=peak_kb / 1024)))
""")


def _run(kind, src, dst):
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(dst), str(LIMIT_MB)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20


def _shard(src: Path) -> None:
    """Re-save a checkpoint as several files (about 64 MB each) with an index."""
    from safetensors.torch import save_file

    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    files, current, size = [], {}, 0
    for name in sorted(tensors):
        current[name] = tensors[name]
        size += tensors[name].numel() * tensors[name].element_size()
        if size > 64 * 2 ** 20:
            files.append(current)
            current, size = {}, 0
    files.append(current)
    weight_map = {}
    for i, part in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(part, str(src / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _whole(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def big_deepseek(tmp_path_factory):
    src = make_tiny_deepseek_v2(tmp_path_factory.mktemp("big_ds") / "src", hidden_size=768, intermediate_size=3072,
                                num_layers=6, kv_lora_rank=256, qk_rope_head_dim=32, num_heads=4)
    _shard(src)
    return src


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory):
    src = make_tiny_llama(tmp_path_factory.mktemp("big_llama") / "src", hidden_size=768, intermediate_size=3072,
                          num_hidden_layers=6, num_heads=8, num_kv_heads=2, head_dim=32)
    _shard(src)
    return src


def test_mla_to_gla_streams_under_a_memory_limit(big_deepseek, tmp_path):
    src = big_deepseek
    assert len(list(src.glob("*.safetensors"))) >= 3 and _size_mb(src) > 2 * LIMIT_MB
    control = _run("control", src, tmp_path / "unused")
    assert control["outcome"].startswith("out of memory"), control
    result = _run("mla-to-gla", src, tmp_path / "out")
    assert result["outcome"] == "converted", result
    # The same conversion done in memory, from the whole state dict.
    config = json.loads((src / "config.json").read_text())
    before, after = _whole(src), _whole(tmp_path / "out")
    assert set(before) == set(after)
    d_c, heads = config["kv_lora_rank"], config["num_attention_heads"]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}.self_attn."
        kv_a = before[p + "kv_a_proj_with_mqa.weight"]
        _, w_dkv, w_uk, w_uv = fold_latent_weights(
            before[p + "kv_b_proj.weight"], before[p + "kv_a_layernorm.weight"], num_heads=heads,
            nope_dim=config["qk_nope_head_dim"], v_dim=config["v_head_dim"], basis="hadamard",
            logit_scale=2.0, w_dkv=kv_a[:d_c])
        expected_b = torch.cat([w_uk, w_uv], dim=1).reshape(-1, d_c).to(kv_a.dtype)
        torch.testing.assert_close(after[p + "kv_b_proj.weight"], expected_b, rtol=0, atol=0)
        torch.testing.assert_close(after[p + "kv_a_proj_with_mqa.weight"][:d_c], w_dkv.to(kv_a.dtype), rtol=0, atol=0)
    copied = [n for n in before if "kv_a" not in n and "kv_b" not in n]
    assert len(copied) > 20
    for name in copied:
        assert torch.equal(before[name], after[name]), name


def test_gqa_to_mla_streams_under_a_memory_limit(big_llama, tmp_path):
    from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla

    src = big_llama
    assert len(list(src.glob("*.safetensors"))) >= 3 and _size_mb(src) > 2 * LIMIT_MB
    result = _run("gqa-to-mla", src, tmp_path / "streamed")
    assert result["outcome"] == "converted", result
    # In memory: the same call without a limit, and the source merged into one file first.
    merged = tmp_path / "merged"
    merged.mkdir()
    from safetensors.torch import save_file

    save_file(_whole(src), str(merged / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json" or f.name.startswith("tokenizer"):
            (merged / f.name).write_bytes(f.read_bytes())
    convert_gqa_to_mla(merged, tmp_path / "in_memory", rope_dim=64, kv_lora_rank=64, show_progress=False)
    streamed, in_memory = _whole(tmp_path / "streamed"), _whole(tmp_path / "in_memory")
    assert set(streamed) == set(in_memory)
    for name in streamed:
        assert torch.equal(streamed[name], in_memory[name]), name
    index = json.loads((tmp_path / "streamed/model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(streamed)
