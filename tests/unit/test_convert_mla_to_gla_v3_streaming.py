"""mla-to-gla streams MoE checkpoints: a DeepSeek-V3-style source (routed and shared experts)
several times larger than a memory limit converts under it, experts byte for byte; a multi-file
fp8 source gets an index without the dropped block scales.

The memory limit and the child process are those of test_convert_pipeline_streaming.py.
"""

import json

import pytest
from safetensors.torch import load_file, save_file

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.fixtures.fp8_checkpoints import all_tensor_names, make_fp8_checkpoint, raw_tensor_bytes
from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family
from tests.unit.test_convert_pipeline_streaming import LIMIT_MB, _run, _shard, _size_mb

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def big_v3(tmp_path_factory):
    """About 240 MB of fp32: 3 MoE layers of 8 experts (hidden 768, expert width 1024), 1 shared each."""
    src = make_tiny_deepseek_family(tmp_path_factory.mktemp("big_v3") / "src", "deepseek_v3", seed=3,
                                    num_layers=4, hidden_size=768, moe_intermediate_size=1024, n_routed_experts=8,
                                    kv_lora_rank=256, qk_rope_head_dim=32)
    _shard(src)
    return src


def test_moe_source_streams_under_a_memory_limit(big_v3, tmp_path):
    src = big_v3
    assert len(list(src.glob("*.safetensors"))) >= 3 and _size_mb(src) > 2 * LIMIT_MB
    assert _run("control", src, tmp_path / "unused")["outcome"].startswith("out of memory")
    result = _run("mla-to-gla", src, tmp_path / "out")
    assert result["outcome"] == "converted", result
    before, after = all_tensor_names(src), all_tensor_names(tmp_path / "out")
    assert set(before) == set(after)
    moe = [n for n in before if ".mlp." in n]
    assert len(moe) == 1 * 3 + 3 * (8 * 3 + 3 + 2)  # dense MLP; per MoE layer experts, shared, gate + bias
    for name in moe + [n for n in before if "q_a_" in n or "q_b_" in n]:
        assert raw_tensor_bytes(before[name], name) == raw_tensor_bytes(after[name], name), name


def _split_by_layer(folder):
    """Re-save a one-file checkpoint as one file per layer (and one for the rest), with an index."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    groups: dict[str, dict] = {}
    for name, tensor in tensors.items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = tensor
    weight_map = {}
    for i, key in enumerate(sorted(groups)):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(groups[key], str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(groups[key], file))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_multi_file_fp8_source_gets_an_index_without_the_dropped_scales(tmp_path):
    fp8 = make_fp8_checkpoint(make_tiny_deepseek_family(tmp_path / "bf16", "deepseek_v3", seed=4), tmp_path / "fp8")
    _split_by_layer(fp8)
    convert_mla_to_gla(fp8, tmp_path / "out", shards=2, softmax="grouped", basis="hadamard", show_progress=False)
    index = json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"]
    after = all_tensor_names(tmp_path / "out")
    assert set(index) == set(after) and all(after[n].name == f for n, f in index.items())
    dropped = set(all_tensor_names(fp8)) - set(after)
    assert dropped == {f"model.layers.{i}.self_attn.{k}.weight_scale_inv" for i in range(2)
                       for k in ("kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj")}
