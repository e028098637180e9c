"""MLA -> sharded latent: a DeepSeek-V2 checkpoint rewritten for MLA_PLUGIN_GLA.

Per layer (DESIGN.md section 1): the latent RMSNorm weight γ is folded into the
up-projections, the latent is rotated into the chosen orthogonal basis R
(W_DKV <- Rᵀ W_DKV on the latent rows of kv_a_proj_with_mqa; W_UK,h, W_UV,h <- · diag(γ) R),
and, for the approximate softmax modes, each slice's partial-logit scale is folded into
W_UK. config.json then declares ``"mla_plugin": {"layout": "sharded_latent", ...}`` so
vLLM with the plugin serves it with no flags. Under exact softmax and global RMSNorm
the result is still an ordinary DeepSeek-V2 checkpoint computing the same function
(transformers loads it too).

Streaming: tensors are read and written one at a time; only the attention latent
weights of all layers (small) are held while the rest is copied.
"""

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mla_plugin.convert.safetensors_stream import StreamingWriter, tensor_entries
from mla_plugin.gla_options import CONFIG_KEY, ResolvedSharding, ShardedLatentOptions
from mla_plugin.ops.latent_basis import fold_latent_weights

CONVERTER_BASES = ("identity", "hadamard", "pca")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(kv_a_proj_with_mqa|kv_a_layernorm|kv_b_proj)\.weight$")


class ConversionError(ValueError):
    """Bad input for a converter: the message says what and how to fix it."""


@dataclass
class ConversionReport:
    layers: int
    shards: int
    options: dict
    kv_values_per_token_per_layer_before: int
    kv_values_per_token_per_layer_per_rank_after: int
    changed_tensors: int
    copied_tensors: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        before, after = (self.kv_values_per_token_per_layer_before,
                         self.kv_values_per_token_per_layer_per_rank_after)
        lines = [
            f"converted {self.layers} layers to the sharded-latent layout, g = {self.shards}: "
            f"{self.changed_tensors} tensors rewritten, {self.copied_tensors} copied",
            f"options: {json.dumps(self.options)}",
            f"KV values per token per layer: {before} per rank as MLA (every rank holds the whole "
            f"latent) -> {after} per rank at TP = {self.shards} ({before / after:.2f}x the tokens "
            "in the same memory)",
        ]
        return "\n".join(lines + self.notes)


def _safetensors_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{src} has no *.safetensors files")
    return files


def _check_inputs(src: Path, dst: Path, config: dict, options: ShardedLatentOptions) -> ResolvedSharding:
    if config.get("model_type") != "deepseek_v2" or "kv_lora_rank" not in config:
        arch = ", ".join(config.get("architectures") or [config.get("model_type", "unknown")])
        raise ConversionError(
            f"mla-to-gla converts DeepSeek-V2 (MLA) checkpoints; {src} is {arch}. "
            "For Llama/Qwen/Mistral use gqa-to-mla.")
    if config.get("q_lora_rank") is not None:
        raise ConversionError("checkpoints with q_lora_rank set are not supported yet "
                              "(DeepSeek-V2-Lite style, q_lora_rank = null, is)")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; give a new or empty folder")
    return options.resolve(tp_size=1, kv_lora_rank=config["kv_lora_rank"],
                           num_heads=config["num_attention_heads"])


def _layer_transforms(files, config, scale, basis, progress) -> dict[str, torch.Tensor]:
    """New kv_a_proj_with_mqa, kv_a_layernorm and kv_b_proj weights for every layer."""
    from safetensors import safe_open

    d_c, heads = config["kv_lora_rank"], config["num_attention_heads"]
    nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
    found: dict[int, dict[str, tuple[Path, torch.dtype]]] = {}
    for path in files:
        for name, (dtype, _) in tensor_entries(path).items():
            match = _LAYER_KEY.match(name)
            if match:
                found.setdefault(int(match.group(1)), {})[match.group(2)] = (path, dtype)
    if not found:
        raise ConversionError("no MLA attention weights (kv_a_proj_with_mqa, kv_b_proj) found")
    replaced = {}
    for layer in progress(sorted(found), desc="fold and rotate"):
        parts = found[layer]
        missing = {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"} - set(parts)
        if missing:
            raise ConversionError(f"layer {layer}: missing {sorted(missing)}")

        def load(kind):
            path, _ = parts[kind]
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(f"model.layers.{layer}.self_attn.{kind}.weight").to(torch.float64)

        kv_a, gamma, kv_b = load("kv_a_proj_with_mqa"), load("kv_a_layernorm"), load("kv_b_proj")
        _, w_dkv, w_uk, w_uv = fold_latent_weights(kv_b, gamma, num_heads=heads, nope_dim=nope, v_dim=v,
                                                   basis=basis, logit_scale=scale, w_dkv=kv_a[:d_c])
        prefix = f"model.layers.{layer}.self_attn."
        replaced[prefix + "kv_a_proj_with_mqa.weight"] = (torch.cat([w_dkv, kv_a[d_c:]]), parts["kv_a_proj_with_mqa"][1])
        replaced[prefix + "kv_a_layernorm.weight"] = (torch.ones(d_c, dtype=torch.float64), parts["kv_a_layernorm"][1])
        replaced[prefix + "kv_b_proj.weight"] = (torch.cat([w_uk, w_uv], dim=1).reshape(heads * (nope + v), d_c),
                                                 parts["kv_b_proj"][1])
    return {name: tensor.to(dtype) for name, (tensor, dtype) in replaced.items()}


def convert_mla_to_gla(src, dst, *, shards: int, softmax: str = "partitioned", rmsnorm: str = "global",
                       basis: str = "identity", logit_scale="auto", show_progress: bool = True) -> ConversionReport:
    """Rewrite checkpoint ``src`` into ``dst`` for the sharded-latent layout with g = ``shards``."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    config = json.loads((src / "config.json").read_text())
    if basis not in CONVERTER_BASES:
        raise ConversionError(f"basis must be one of {list(CONVERTER_BASES)}, got {basis!r}")
    try:
        runtime = ShardedLatentOptions.from_config(dict(
            shards=shards, softmax=softmax, rmsnorm=rmsnorm, basis="identity",
            logit_scale=logit_scale, layout="sharded_latent"))
        resolved = _check_inputs(src, dst, config, runtime)
    except ValueError as err:
        raise ConversionError(str(err)) from None

    def progress(items, desc):
        if not show_progress:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc)

    files = _safetensors_files(src)
    replaced = _layer_transforms(files, config, resolved.logit_scale, basis, progress)
    dst.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in progress(files, desc="write"):
        entries = tensor_entries(path)
        writer = StreamingWriter(dst / path.name, [(n, d, s) for n, (d, s) in entries.items()],
                                 metadata={"format": "pt"})
        with safe_open(str(path), "pt") as f:
            for name in entries:
                if name in replaced:
                    writer.write(name, replaced[name])
                else:
                    writer.write(name, f.get_tensor(name))
                    copied += 1
        writer.close()
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name != "config.json":
            shutil.copy2(other, dst / other.name)
    # The scale is folded into W_UK, so the runtime multiplies by 1.
    config[CONFIG_KEY] = dict(runtime.to_dict(), logit_scale=1.0,
                              converted_with={"basis": basis, "logit_scale": resolved.logit_scale})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    d_c, d_r = config["kv_lora_rank"], config["qk_rope_head_dim"]
    return ConversionReport(
        layers=len(replaced) // 3, shards=resolved.shards, options=config[CONFIG_KEY],
        kv_values_per_token_per_layer_before=d_c + d_r,
        kv_values_per_token_per_layer_per_rank_after=d_c // resolved.shards + d_r,
        changed_tensors=len(replaced), copied_tensors=copied,
    )
