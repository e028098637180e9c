"""GQA/MHA (Llama, Mistral, Qwen2) -> DeepSeek-V2-style MLA checkpoint.

Qwen3 (per-head q/k RMSNorm) is refused with the reason: it has no exact MLA form
(_refuse_per_head_qk_norm).

The per-layer math is in gqa_latent.py, the calibration statistics (second moments of
every layer's keys and values on calibration text, one transformers forward pass per
window) in calibration_capture.py, the shared stages in pipeline.py. This module reads
the source and streams the result: each output file mirrors a source file; a layer's
new attention tensors are computed when the file holding its q_proj is written, so
memory holds one layer's attention at a time (plus the model during calibration).

    convert_gqa_to_mla = check the source, the plan and the settings
                       -> calibration moments -> weights, file by file -> index and side files
                       -> config.json (format declared) -> report

The output is a DeepSeek-V2 checkpoint (dense MLP in every layer) with no latent
RMSNorm, declared in config.json (checkpoint_format.py), plus modeling_mla_plugin.py for
transformers (trust_remote_code=True). vLLM with the plugin serves it with no flags.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mla_plugin.checkpoint_format import CONVERTED_ARCHITECTURE, CONVERTED_AUTO_MAP, LatentCheckpointFormat
from mla_plugin.convert import defaults
from mla_plugin.convert.calibration_capture import capture_kv_moments, source_tokenizer
from mla_plugin.convert.declared_config import write_config
from mla_plugin.convert.gqa_latent import LatentPlan, convert_layer, rope_frequencies
from mla_plugin.convert.pipeline import (
    INDEX_NAME,
    ConversionError,
    SourceCheckpoint,
    atomic_destination,
    check_config_types,
    check_layer_count,
    copy_side_files,
    progress_reporter,
    read_source,
    write_index,
    write_streamed,
)
from mla_plugin.convert.safetensors_stream import tensor_entries
from mla_plugin.eval.eval_text import check_calibration_text
from mla_plugin.text_windows import calibration_windows, read_text_file, tokenize_once

SOURCE_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
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


GQA_CONFIG_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _check_source(source: SourceCheckpoint) -> tuple[int, int, int]:
    """A Llama/Mistral/Qwen2 with full attention, no MLP bias and config values of the right
    types; returns (H, K, d_h)."""
    src, config = source.path, source.config
    model_type = config.get("model_type")
    _refuse_per_head_qk_norm(source)
    if model_type not in SOURCE_TYPES:
        arch = ", ".join(config.get("architectures") or [str(model_type)])
        hint = " For DeepSeek-V2 (MLA) checkpoints use mla-to-gla." if model_type == "deepseek_v2" else ""
        raise ConversionError(f"gqa-to-mla converts Llama, Mistral and Qwen2 checkpoints; {src} is {arch}.{hint}")
    check_config_types(source, ints=GQA_CONFIG_INTS, optional_ints=("num_key_value_heads", "head_dim",
                                                                    "sliding_window", "max_position_embeddings"),
                       optional_numbers=("rope_theta", "partial_rotary_factor"))
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
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return heads, kv_heads, head_dim


_QK_NORM = re.compile(r".*self_attn\.(q_norm|k_norm)\.weight$")


def _refuse_per_head_qk_norm(source: SourceCheckpoint) -> None:
    """Qwen3 (and any source with self_attn.q_norm / k_norm) has no exact MLA form: refused.

    Such a source RMS-normalises every head's query and key on its own before RoPE:
    k_j = g ⊙ W_j x / rms(W_j x), which is unchanged when x is scaled, so it is not linear in x.
    An MLA key is [W_UK c ; k^R] with the rope key k^R linear in x and c one latent shared
    by every head (DeepSeek's latent RMSNorm, where present, divides all heads by one common
    factor and never touches k^R). So an MLA layer equals the source for every input only if
    the per-head factor 1/rms(W_j x) is constant, i.e. W_j x = 0 for all x, or g = 0: keys (or
    queries) identically zero, attention that ignores its keys. No real checkpoint is that,
    so nothing is folded; an approximate fold would silently change the model.
    """
    found = {m.group(1) for name in source.tensors if (m := _QK_NORM.match(name))}
    normed = [norm for norm in ("q_norm", "k_norm") if norm in found]
    if not normed and not str(source.config.get("model_type", "")).startswith("qwen3"):
        return
    what = " and ".join(normed) if normed else "q_norm and k_norm"
    raise ConversionError(
        f"{source.path} normalises each attention head's query and key on its own (self_attn.{what}: "
        "RMSNorm over head_dim before RoPE, as Qwen3 does); that divides every key by its own head's "
        "length, a factor no MLA layer has (an MLA key is linear in the layer input, or in one latent "
        "shared by all heads), so no exact MLA form exists and gqa-to-mla does not approximate it. "
        "Serve this model with vLLM's own attention, or convert a Llama, Mistral or Qwen2 checkpoint")


@atomic_destination
def convert_gqa_to_mla(src, dst, *, kv_lora_rank: int, rope_dim: int, freqfold: int = defaults.GQA_TO_MLA_FREQFOLD,
                       calib_text=None, calib_tokens: int = defaults.GQA_TO_MLA_CALIB_TOKENS,
                       calib_window: int = defaults.GQA_TO_MLA_CALIB_WINDOW,
                       balance: bool = defaults.GQA_TO_MLA_BALANCE, dtype: str | None = None,
                       allow_eval_text: bool = False, show_progress: bool = True) -> GQAConversionReport:
    """Rewrite a Llama/Mistral/Qwen2 checkpoint ``src`` as an MLA checkpoint in ``dst``.

    ``dtype`` of the written weights: None keeps the source's. The evaluation text (the
    wikitext-2 test split, recognised by content) is refused as ``calib_text`` unless
    ``allow_eval_text``. The defaults are
    `mla-plugin convert gqa-to-mla`'s (convert/defaults.py). ``dst`` appears whole or not at all
    (convert/destination.py).
    """
    source, dst = read_source(src), Path(dst)
    heads, kv_heads, head_dim = _check_source(source)
    check_layer_count(source)
    _check_attention_tensors(source)
    plan = _latent_plan(heads=heads, kv_heads=kv_heads, head_dim=head_dim, rope_dim=rope_dim,
                        kv_lora_rank=kv_lora_rank, freqfold=freqfold, balance=balance)
    out_dtype = _output_dtype(dtype)
    source_freq = _source_inv_freq(source.config, head_dim)
    _check_calibration_text(plan, calib_text, allow_eval_text)
    progress = progress_reporter(show_progress)

    moments, calibration = _calibration_moments(source, calib_text, tokens=calib_tokens, window=calib_window,
                                                show_progress=show_progress)
    layout = _source_layout(source)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, alphas = _write_weights(source, dst, plan, layout, moments, out_dtype, progress)
    if source.has_index:
        write_index(dst, weight_map)
    copy_side_files(source.path, dst, skip=("config.json", INDEX_NAME))

    theta, rope_inv_freq = _declared_rope(source.config, plan, source_freq)
    settings = dict(kv_lora_rank=plan.kv_lora_rank, rope_dim=plan.rope_dim, freqfold=freqfold, balance=balance,
                    calibration=calibration)
    fmt = LatentCheckpointFormat(latent_norm=False, q_bias=layout.has_q_bias, kv_a_bias=layout.has_kv_bias,
                                 rope_inv_freq=rope_inv_freq,
                                 converted_from=dict(architecture=(source.config.get("architectures") or ["?"])[0],
                                                     **settings))
    out_config = _deepseek_config(source.config, plan, theta, fmt, dtype)
    write_config(dst, out_config)  # declares MLAPluginDeepseekV2ForCausalLM, writes the modeling file
    return _report(source.config, plan, layout, calibration=calibration, alphas=alphas,
                   explicit_rope=rope_inv_freq is not None)


def _latent_plan(**settings) -> LatentPlan:
    plan = LatentPlan(**settings)
    try:
        plan.check()
    except ValueError as err:
        raise ConversionError(str(err)) from None
    return plan


def _output_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in defaults.OUTPUT_DTYPES:
        raise ConversionError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def _check_calibration_text(plan: LatentPlan, calib_text, allow_eval_text: bool) -> None:
    if calib_text is not None and not Path(calib_text).is_file():
        raise ConversionError(f"calibration text {calib_text} does not exist")
    if calib_text is not None:
        check_calibration_text(read_text_file(calib_text), calib_text, allow_eval_text=allow_eval_text)
    if not plan.exact and calib_text is None:
        width = plan.kv_heads * plan.head_dim
        raise ConversionError(
            "these settings drop RoPE from some key dims or compress the latent, which needs calibration "
            "text: --calib-text FILE (train or validation text, never the test split). Without it only the "
            f"exact form converts: --rope-dim {width} --kv-lora-rank {width}")


def _calibration_moments(source: SourceCheckpoint, calib_text, *, tokens: int, window: int,
                         show_progress: bool) -> tuple[list[torch.Tensor | None], str]:
    """Per layer S = E[y yᵀ] of y = [k; v] on the calibration text (None each without text), and
    a line saying what was used."""
    num_layers = source.config["num_hidden_layers"]
    if calib_text is None:
        return [None] * num_layers, "none (exact form: no statistics needed)"
    text = read_text_file(calib_text)
    ids = tokenize_once(source_tokenizer(source.path), text[: 32 * tokens])  # enough characters for `tokens`
    try:
        windows = calibration_windows(ids, tokens, window)
    except ValueError as err:
        raise ConversionError(f"calibration text: {err}") from None
    moments, seen = capture_kv_moments(source.path, windows, num_layers=num_layers, show_progress=show_progress)
    return moments, f"{seen} tokens of {Path(calib_text).name} (windows of {window})"


@dataclass(frozen=True)
class _SourceLayout:
    """What the source's tensor names say about the output's attention tensors."""

    has_q_bias: bool  # q_proj.bias -> q_proj.bias (Qwen2)
    has_kv_bias: bool  # k_proj / v_proj biases -> kv_a_proj_with_mqa.bias
    tie: bool  # tied embeddings without an lm_head tensor: lm_head.weight is written out


def _source_layout(source: SourceCheckpoint) -> _SourceLayout:
    names = source.tensors
    return _SourceLayout(
        has_q_bias=any(n.endswith("self_attn.q_proj.bias") for n in names),
        has_kv_bias=any(n.endswith(("self_attn.k_proj.bias", "self_attn.v_proj.bias")) for n in names),
        tie=source.config.get("tie_word_embeddings", False) and "lm_head.weight" not in names)


def _new_attention_shapes(plan: LatentPlan, hidden: int, layout: _SourceLayout) -> dict[str, list[int]]:
    """Suffix -> shape of the tensors every converted layer writes in place of q/k/v_proj
    (computed without the weights, for the file headers)."""
    H, d_nope, d_r, d_c, d_h = plan.heads, plan.nope_dim, plan.rope_dim, plan.kv_lora_rank, plan.head_dim
    shapes = {"q_proj.weight": [H * (d_nope + d_r), hidden], "q_proj.bias": [H * (d_nope + d_r)],
              "kv_a_proj_with_mqa.weight": [d_c + d_r, hidden], "kv_a_proj_with_mqa.bias": [d_c + d_r],
              "kv_b_proj.weight": [H * (d_nope + d_h), d_c]}
    if not layout.has_q_bias:
        del shapes["q_proj.bias"]
    if not layout.has_kv_bias:
        del shapes["kv_a_proj_with_mqa.bias"]
    return shapes


@dataclass(frozen=True)
class _Output:
    """One tensor of an output file: copied from a source tensor, or new for a layer's attention."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    source: str | int  # the source tensor's name, or the layer index


def _file_outputs(entries: dict, new_shapes: dict[str, list[int]], out_dtype: torch.dtype | None,
                  tie: bool) -> list[_Output]:
    """One output file's tensors in the source file's order: k_proj, v_proj and the rope
    buffers dropped, a layer's new attention tensors where its q_proj.weight was."""
    outputs = []
    for name, (stored, shape) in entries.items():
        dtype = out_dtype if out_dtype is not None and stored.is_floating_point else stored
        if _ROPE_BUFFER.match(name):
            continue
        match = _ATTN.match(name)
        if match is None:
            outputs.append(_Output(name, dtype, shape, name))
            if tie and name == "model.embed_tokens.weight":
                outputs.append(_Output("lm_head.weight", dtype, shape, name))
            continue
        layer, kind, what = int(match.group(1)), match.group(2), match.group(3)
        if kind == "o_proj":
            outputs.append(_Output(name, dtype, shape, name))
        elif kind == "q_proj" and what == "weight":
            prefix = f"model.layers.{layer}.self_attn."
            outputs += [_Output(prefix + suffix, dtype, new_shape, layer) for suffix, new_shape in new_shapes.items()]
    return outputs


def _check_attention_tensors(source: SourceCheckpoint) -> None:
    """Every layer has its q/k/v/o_proj weights and no o_proj bias (checked before any writing)."""
    for layer in range(source.config["num_hidden_layers"]):
        p = f"model.layers.{layer}.self_attn."
        missing = [f"{p}{k}_proj.weight" for k in "qkvo" if f"{p}{k}_proj.weight" not in source.tensors]
        if missing:
            raise ConversionError(f"{source.path}: missing tensors {missing}; restore the missing weights")
        if f"{p}o_proj.bias" in source.tensors:
            raise ConversionError(f"{p}o_proj has a bias; DeepSeek-V2's o_proj has none")


def _convert_attention(source: SourceCheckpoint, plan: LatentPlan, layer: int, moment: torch.Tensor | None,
                       new_shapes: dict[str, list[int]]) -> tuple[dict[str, torch.Tensor], float]:
    """One layer's new attention tensors (float64; zero biases where the output declares a bias
    this layer lacks) and its K/V balance factor α."""
    p = f"model.layers.{layer}.self_attn."
    out = convert_layer(plan, w_q=source.read(p + "q_proj.weight"), b_q=source.read(p + "q_proj.bias"),
                        w_k=source.read(p + "k_proj.weight"), b_k=source.read(p + "k_proj.bias"),
                        w_v=source.read(p + "v_proj.weight"), b_v=source.read(p + "v_proj.bias"),
                        w_o=source.read(p + "o_proj.weight"), moment=moment)
    named = {"q_proj.weight": out.q_proj, "q_proj.bias": out.q_bias, "kv_a_proj_with_mqa.weight": out.kv_a_proj_with_mqa,
             "kv_a_proj_with_mqa.bias": out.kv_a_bias, "kv_b_proj.weight": out.kv_b_proj}
    tensors = {p + suffix: t for suffix, t in named.items() if t is not None}
    for bias in ("q_proj.bias", "kv_a_proj_with_mqa.bias"):
        if bias in new_shapes and p + bias not in tensors:
            tensors[p + bias] = torch.zeros(new_shapes[bias])
    return tensors, out.alpha


def _write_weights(source: SourceCheckpoint, dst: Path, plan: LatentPlan, layout: _SourceLayout,
                   moments: list, out_dtype: torch.dtype | None, progress) -> tuple[dict[str, str], list[float]]:
    """Each output file mirrors a source file; a layer's attention is converted when the file
    holding its q_proj is written (one layer in memory at a time). Returns the weight map
    (tensor -> file) and every layer's α."""
    new_shapes = _new_attention_shapes(plan, source.config["hidden_size"], layout)
    weight_map, alphas = {}, []
    for path in progress(source.files, desc="convert"):
        outputs = {o.name: o for o in _file_outputs(tensor_entries(path), new_shapes, out_dtype, layout.tie)}
        pending: dict[str, torch.Tensor] = {}

        def tensor_for(name, outputs=outputs, pending=pending):
            out = outputs[name]
            if isinstance(out.source, str):
                return source.read(out.source).to(out.dtype)
            if name not in pending:
                tensors, alpha = _convert_attention(source, plan, out.source, moments[out.source], new_shapes)
                alphas.append(alpha)
                pending.update(tensors)
            return pending.pop(name).to(out.dtype)

        write_streamed(dst / path.name, [(o.name, o.dtype, o.shape) for o in outputs.values()], tensor_for)
        weight_map.update({name: path.name for name in outputs})
    num_layers = source.config["num_hidden_layers"]
    if len(alphas) != num_layers:
        raise ConversionError(f"found attention weights for {len(alphas)} of {num_layers} layers")
    return weight_map, alphas


def _declared_rope(config: dict, plan: LatentPlan, source_freq: torch.Tensor) -> tuple[float, tuple | None]:
    """(θ, the kept rope frequencies when they are not DeepSeek's default for θ and d_R, else None)."""
    d_r = plan.rope_dim
    kept_freq = rope_frequencies(plan, source_freq)  # [d_R / 2]
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    default_freq = 1.0 / (theta ** (torch.arange(0, d_r, 2, dtype=torch.float64) / d_r))
    explicit = not torch.allclose(kept_freq, default_freq, rtol=1e-6, atol=0)
    return theta, tuple(float(x) for x in kept_freq) if explicit else None


def _report(config: dict, plan: LatentPlan, layout: _SourceLayout, *, calibration: str, alphas: list[float],
            explicit_rope: bool) -> GQAConversionReport:
    plan_info = dict(kv_lora_rank=plan.kv_lora_rank, rope_dim=plan.rope_dim, freqfold=plan.freqfold,
                     rope_components=plan.rope_components, nope_dim=plan.nope_dim, head_dim=plan.head_dim,
                     kv_heads=plan.kv_heads, exact=plan.exact)
    notes = []
    if explicit_rope:
        notes.append("rope frequencies are not DeepSeek's default for this rope dim: written to "
                     "config.json as mla_plugin.rope_inv_freq")
    if layout.tie:
        notes.append("tied embeddings: lm_head.weight written out")
    return GQAConversionReport(
        source=SOURCE_TYPES[config["model_type"]], layers=config["num_hidden_layers"], plan=plan_info,
        kv_values_before=2 * plan.kv_heads * plan.head_dim, kv_values_after=plan.kv_lora_rank + plan.rope_dim,
        calibration=calibration, mean_alpha=sum(alphas) / len(alphas), notes=notes)


def _deepseek_config(src: dict, plan: LatentPlan, theta: float, fmt: LatentCheckpointFormat,
                     dtype: str | None) -> dict:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings",
            "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "hidden_act")
    out = {k: src[k] for k in keep if k in src}
    out.update(
        # Not an ordinary DeepSeek-V2 (no latent RMSNorm): an architecture only mla_plugin serves.
        architectures=[CONVERTED_ARCHITECTURE], model_type="deepseek_v2", auto_map=dict(CONVERTED_AUTO_MAP),
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
