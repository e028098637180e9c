"""GQA/MHA (Llama, Mistral, Qwen2) -> DeepSeek-V2-style MLA checkpoint.

The per-layer math is in gqa_latent.py. This module reads the source, gathers the
calibration statistics (second moments of every layer's keys and values on calibration
text, one transformers forward pass per window), and streams the result: each output
file mirrors a source file; a layer's new attention tensors are computed when the file
holding its q_proj is written, so memory holds one layer's attention at a time (plus
the model during calibration).

The output is a DeepSeek-V2 checkpoint (dense MLP in every layer) with no latent
RMSNorm, declared in config.json (checkpoint_format.py), plus modeling_mla_plugin.py for
transformers (trust_remote_code=True). vLLM with the plugin serves it with no flags.
"""

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mla_plugin.checkpoint_format import LatentCheckpointFormat
from mla_plugin.convert.gqa_latent import LatentPlan, convert_layer, rope_frequencies
from mla_plugin.convert.mla_to_gla import ConversionError, _safetensors_files, progress_bar
from mla_plugin.convert.safetensors_stream import StreamingWriter, read_tensor, tensor_entries

SOURCE_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
REMOTE_CODE = Path(__file__).with_name("modeling_mla_plugin.py")
_ATTN = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$")
_ROPE_BUFFER = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass
class GQAConversionReport:
    source: str
    layers: int
    plan: dict
    kv_values_before: int
    kv_values_after: int
    calibration: str
    mean_alpha: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        p = self.plan
        lines = [
            f"converted {self.layers} {self.source} layers to MLA: kv_lora_rank {p['kv_lora_rank']}, "
            f"rope dim {p['rope_dim']} (freqfold {p['freqfold']}, {p['rope_components']} component(s) per "
            f"frequency group), no-rope dim {p['nope_dim']} per head, v dim {p['head_dim']}"
            + (" - exact" if p["exact"] else ""),
            f"KV values per token per layer: {self.kv_values_before} (GQA: {p['kv_heads']} kv heads x "
            f"{p['head_dim']} x 2) -> {self.kv_values_after} (latent {p['kv_lora_rank']} + rope key "
            f"{p['rope_dim']}): {self.kv_values_before / self.kv_values_after:.2f}x fewer",
            f"calibration: {self.calibration}; mean K/V balance factor {self.mean_alpha:.3f}",
        ]
        return "\n".join(lines + self.notes)


def _source_inv_freq(config: dict, head_dim: int) -> torch.Tensor:
    """The source's RoPE inverse frequencies (float32, as transformers computes them)."""
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("sources with partial_rotary_factor != 1 are not supported")
    if rope_type == "default":
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if rope_type in ("linear", "llama3"):
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf = AutoConfig.for_model(**config)
        freqs, factor = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
        if factor != 1.0:
            raise ConversionError(f"rope_type {rope_type!r} scales attention by {factor}; not supported")
        return freqs.float()
    raise ConversionError(f"rope_type {rope_type!r} is not supported (default, linear and llama3 are): "
                          "its frequencies depend on the sequence length or rescale attention")


def _check_source(src: Path, dst: Path, config: dict) -> tuple[int, int, int]:
    model_type = config.get("model_type")
    if model_type not in SOURCE_TYPES:
        arch = ", ".join(config.get("architectures") or [str(model_type)])
        hint = " For DeepSeek-V2 (MLA) checkpoints use mla-to-gla." if model_type == "deepseek_v2" else ""
        raise ConversionError(f"gqa-to-mla converts Llama, Mistral and Qwen2 checkpoints; {src} is {arch}.{hint}")
    if config.get("mlp_bias"):
        raise ConversionError("mlp_bias = true is not supported (DeepSeek-V2's MLP has no bias)")
    if model_type == "llama" and config.get("attention_bias"):
        raise ConversionError("Llama attention_bias = true also biases o_proj, which DeepSeek-V2 lacks; "
                              "not supported")
    window = config.get("sliding_window")
    if window is not None and (model_type != "qwen2" or config.get("use_sliding_window")):
        if window < config.get("max_position_embeddings", 0):
            raise ConversionError(f"sliding-window attention (window {window}) has no MLA equivalent here; "
                                  "only full-attention checkpoints convert")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; give a new or empty folder")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return heads, kv_heads, head_dim


def collect_kv_moments(src: Path, text: str, *, num_layers: int, tokens: int, window: int,
                       show_progress: bool) -> tuple[list[torch.Tensor], int]:
    """Per layer E[y yᵀ] of y = [k; v] (pre-RoPE, bias included) on calibration text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mla_plugin.eval.perplexity import make_windows, tokenize_once

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    ids = tokenize_once(tokenizer, text[: 32 * tokens])  # enough characters for `tokens` tokens
    try:
        windows = make_windows(ids, window, max(1, tokens // window))
    except ValueError as err:
        raise ConversionError(f"calibration text: {err}") from None
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    moments = [None] * num_layers
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def hook(layer, kind):
        def save(_module, _inputs, output):
            captured[(layer, kind)] = output.detach().reshape(-1, output.shape[-1]).double()
            if kind == "v":
                y = torch.cat([captured.pop((layer, "k")), captured.pop((layer, "v"))], dim=1)  # [T, 2Kd]
                moment = y.T @ y
                moments[layer] = moment if moments[layer] is None else moments[layer] + moment
        return save

    handles = []
    for index, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(index, "k")))
        handles.append(layer.self_attn.v_proj.register_forward_hook(hook(index, "v")))
    seen = 0
    with torch.no_grad():
        for w in progress_bar(windows, "calibrate", show_progress):
            model(torch.tensor([w]))
            seen += len(w)
    for h in handles:
        h.remove()
    return [m / seen for m in moments], seen


def convert_gqa_to_mla(src, dst, *, kv_lora_rank: int, rope_dim: int, freqfold: int = 1,
                       calib_text=None, calib_tokens: int = 32768, calib_window: int = 256,
                       balance: bool = True, dtype: str | None = None,
                       show_progress: bool = True) -> GQAConversionReport:
    """Rewrite a Llama/Mistral/Qwen2 checkpoint ``src`` as an MLA checkpoint in ``dst``."""

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    config = json.loads((src / "config.json").read_text())
    heads, kv_heads, head_dim = _check_source(src, dst, config)
    plan = LatentPlan(heads=heads, kv_heads=kv_heads, head_dim=head_dim, rope_dim=rope_dim,
                      kv_lora_rank=kv_lora_rank, freqfold=freqfold, balance=balance)
    try:
        plan.check()
    except ValueError as err:
        raise ConversionError(str(err)) from None
    out_dtype, dtype_name = None, dtype
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConversionError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        out_dtype = getattr(torch, dtype)
    source_freq = _source_inv_freq(config, head_dim)
    if calib_text is not None and not Path(calib_text).is_file():
        raise ConversionError(f"calibration text {calib_text} does not exist")
    if not plan.exact and calib_text is None:
        raise ConversionError(
            "these settings drop RoPE from some key dims or compress the latent, which needs calibration "
            "text: --calib-text FILE (train or validation text, never the test split). Without it only the "
            f"exact form converts: --rope-dim {kv_heads * head_dim} --kv-lora-rank {kv_heads * head_dim}")

    def progress(items, desc):
        return progress_bar(items, desc, show_progress)

    num_layers = config["num_hidden_layers"]
    moments, calibration = [None] * num_layers, "none (exact form: no statistics needed)"
    if calib_text is not None:
        text = Path(calib_text).read_text(encoding="utf-8")
        moments, seen = collect_kv_moments(src, text, num_layers=num_layers, tokens=calib_tokens,
                                           window=calib_window, show_progress=show_progress)
        calibration = f"{seen} tokens of {Path(calib_text).name} (windows of {calib_window})"

    files = _safetensors_files(src)
    where: dict[str, Path] = {}
    for path in files:
        for name in tensor_entries(path):
            where[name] = path

    def read(name):
        return read_tensor(where[name], name) if name in where else None

    def layer_tensors(layer: int):
        p = f"model.layers.{layer}.self_attn."
        missing = [f"{p}{k}_proj.weight" for k in "qkvo" if f"{p}{k}_proj.weight" not in where]
        if missing:
            raise ConversionError(f"missing tensors: {missing}")
        if f"{p}o_proj.bias" in where:
            raise ConversionError(f"{p}o_proj has a bias; DeepSeek-V2's o_proj has none")
        out = convert_layer(plan, w_q=read(p + "q_proj.weight"), b_q=read(p + "q_proj.bias"),
                            w_k=read(p + "k_proj.weight"), b_k=read(p + "k_proj.bias"),
                            w_v=read(p + "v_proj.weight"), b_v=read(p + "v_proj.bias"),
                            w_o=read(p + "o_proj.weight"), moment=moments[layer])
        named = [(p + "q_proj.weight", out.q_proj), (p + "q_proj.bias", out.q_bias),
                 (p + "kv_a_proj_with_mqa.weight", out.kv_a_proj_with_mqa),
                 (p + "kv_a_proj_with_mqa.bias", out.kv_a_bias), (p + "kv_b_proj.weight", out.kv_b_proj)]
        return [(n, t) for n, t in named if t is not None], out.alpha

    has_q_bias = any(n.endswith("self_attn.q_proj.bias") for n in where)
    has_kv_bias = any(n.endswith(("self_attn.k_proj.bias", "self_attn.v_proj.bias")) for n in where)
    # Shapes of every layer's new tensors, for the headers (computed without the weights).
    dn, r, R, d = plan.nope_dim, plan.rope_dim, plan.kv_lora_rank, head_dim
    new_shapes = {"q_proj.weight": [heads * (dn + r), config["hidden_size"]], "q_proj.bias": [heads * (dn + r)],
                  "kv_a_proj_with_mqa.weight": [R + r, config["hidden_size"]],
                  "kv_a_proj_with_mqa.bias": [R + r], "kv_b_proj.weight": [heads * (dn + d), R]}

    dst.mkdir(parents=True, exist_ok=True)
    weight_map, alphas = {}, []
    tie = config.get("tie_word_embeddings", False) and "lm_head.weight" not in where
    for path in progress(files, desc="convert"):
        entries = tensor_entries(path)
        plan_out = []  # (name, dtype, shape, source: str | (layer,))
        for name, (stored, shape) in entries.items():
            dtype = out_dtype if out_dtype is not None and stored.is_floating_point else stored
            match = _ATTN.match(name)
            if _ROPE_BUFFER.match(name):
                continue
            if match is None:
                plan_out.append((name, dtype, shape, name))
                if tie and name == "model.embed_tokens.weight":
                    plan_out.append(("lm_head.weight", dtype, shape, name))
                continue
            layer, kind, what = int(match.group(1)), match.group(2), match.group(3)
            if kind == "o_proj":
                plan_out.append((name, dtype, shape, name))
            elif kind == "q_proj" and what == "weight":
                p = f"model.layers.{layer}.self_attn."
                for suffix, new_shape in new_shapes.items():
                    if (suffix == "q_proj.bias" and not has_q_bias) or \
                            (suffix == "kv_a_proj_with_mqa.bias" and not has_kv_bias):
                        continue
                    plan_out.append((p + suffix, dtype, new_shape, (layer,)))
        writer = StreamingWriter(dst / path.name, [(n, dt, s) for n, dt, s, _ in plan_out],
                                 metadata={"format": "pt"})
        pending: dict[str, torch.Tensor] = {}
        for name, dtype, _, source in plan_out:
            if isinstance(source, tuple):
                if name not in pending:
                    tensors, alpha = layer_tensors(source[0])
                    alphas.append(alpha)
                    pending.update(tensors)
                    if has_q_bias and not any(n.endswith("q_proj.bias") for n, _ in tensors):
                        pending[name.rsplit("self_attn.", 1)[0] + "self_attn.q_proj.bias"] = \
                            torch.zeros(new_shapes["q_proj.bias"])
                    if has_kv_bias and not any(n.endswith("kv_a_proj_with_mqa.bias") for n, _ in tensors):
                        pending[name.rsplit("self_attn.", 1)[0] + "self_attn.kv_a_proj_with_mqa.bias"] = \
                            torch.zeros(new_shapes["kv_a_proj_with_mqa.bias"])
                writer.write(name, pending.pop(name).to(dtype))
            else:
                writer.write(name, read(source).to(dtype))
            weight_map[name] = path.name
        writer.close()
    if len(alphas) != num_layers:
        raise ConversionError(f"found attention weights for {len(alphas)} of {num_layers} layers")
    if (src / "model.safetensors.index.json").exists():
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(other, dst / other.name)
    shutil.copy2(REMOTE_CODE, dst / REMOTE_CODE.name)

    kept_freq = rope_frequencies(plan, source_freq)
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    default_freq = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    explicit = not torch.allclose(kept_freq, default_freq, rtol=1e-6, atol=0)
    settings = dict(kv_lora_rank=R, rope_dim=r, freqfold=freqfold, balance=balance, calibration=calibration)
    fmt = LatentCheckpointFormat(latent_norm=False, q_bias=has_q_bias, kv_a_bias=has_kv_bias,
                                 rope_inv_freq=tuple(float(x) for x in kept_freq) if explicit else None,
                                 converted_from=dict(architecture=(config.get("architectures") or ["?"])[0],
                                                     **settings))
    out_config = _deepseek_config(config, plan, theta, fmt, dtype_name)
    (dst / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    plan_info = dict(kv_lora_rank=R, rope_dim=r, freqfold=freqfold, rope_components=plan.rope_components,
                     nope_dim=dn, head_dim=d, kv_heads=kv_heads, exact=plan.exact)
    notes = []
    if explicit:
        notes.append("rope frequencies are not DeepSeek's default for this rope dim: written to "
                     "config.json as mla_plugin.rope_inv_freq")
    if tie:
        notes.append("tied embeddings: lm_head.weight written out")
    return GQAConversionReport(
        source=SOURCE_TYPES[config["model_type"]], layers=num_layers, plan=plan_info,
        kv_values_before=2 * kv_heads * d, kv_values_after=R + r, calibration=calibration,
        mean_alpha=sum(alphas) / len(alphas), notes=notes)


def _deepseek_config(src: dict, plan: LatentPlan, theta: float, fmt: LatentCheckpointFormat,
                     dtype: str | None) -> dict:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings",
            "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "hidden_act")
    out = {k: src[k] for k in keep if k in src}
    out.update(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
        auto_map={"AutoModelForCausalLM": "modeling_mla_plugin.LatentConvertedDeepseekV2ForCausalLM"},
        dtype=dtype or src.get("dtype", src.get("torch_dtype", "float32")),
        num_attention_heads=plan.heads, num_key_value_heads=plan.heads,
        q_lora_rank=None, kv_lora_rank=plan.kv_lora_rank, qk_rope_head_dim=plan.rope_dim,
        qk_nope_head_dim=plan.nope_dim, v_head_dim=plan.head_dim,
        head_dim=plan.rope_dim, qk_head_dim=plan.nope_dim + plan.rope_dim,
        # Dense MLP everywhere: MoE would start at layer num_hidden_layers. (vLLM's loader still
        # wants an expert count, so one expert of each kind is declared and never built.)
        first_k_dense_replace=src["num_hidden_layers"], moe_intermediate_size=src["intermediate_size"],
        n_routed_experts=1, n_shared_experts=1, num_experts_per_tok=1, topk_method="greedy",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        rope_parameters={"rope_theta": theta, "rope_type": "default"},
        mla_plugin=dict(layout="mla", **fmt.to_dict()),
    )
    return out
