"""MLA -> sharded latent: a DeepSeek-V2 checkpoint rewritten for MLA_PLUGIN_GLA.

Per layer (docs/design.md, "Sharded latent" and "Bases"): the latent RMSNorm weight γ is
folded into the up-projections, the latent is rotated into the chosen orthogonal basis Q
(W_DKV <- Qᵀ W_DKV on the latent rows of kv_a_proj_with_mqa; W_UK,h, W_UV,h <- · diag(γ) Q),
and, for the approximate softmax modes, each slice's partial-logit scale λ is folded into
W_UK. With calibration text (``calib_text``; train or validation text, never the test
split) the basis may be the activation PCA (``pca-act``), and the logit scale λ (and an
output scale μ) may be fitted per (layer, head, slice) and folded into W_UK (and W_UV);
see calibration_fit.py (the math) and calibration_capture.py (the transformers run).
With the grouped softmax, ``basis="group-pca"`` gives each head group r its own projection
B_r of the latent (fitted to the group's keys and values on the calibration text,
ops/latent_basis.group_subspace_projection), written as one extra tensor per layer,
``self_attn.latent_projection.weight`` = [B_0; …; B_{g−1}], declared by
``"latent_projection": true``; W_DKV is then kept as it is.
config.json then declares ``"mla_plugin": {"layout": "sharded_latent", ...}`` so
vLLM with the plugin serves it with no flags. Under exact softmax and global RMSNorm
the result is still an ordinary DeepSeek-V2 (or V3) checkpoint computing the same function
(transformers loads it too).

DeepSeek-V3-style sources (model_type deepseek_v3; V3/R1, Kimi-K2 shapes) convert the same
way. The low-rank query (q_lora_rank set: q_a_proj, q_a_layernorm, q_b_proj) is copied
untouched: nothing is folded into the query (λ and μ go into W_UK and W_UV, the basis into
W_DKV and kv_b_proj). MoE layers (experts, gate, shared experts, e_score_correction_bias)
are copied tensor by tensor, byte for byte. fp8 block-quantised sources (fp8_blocks.py):
the tensors folded here are dequantised, folded in float64 and written in bfloat16 without
their weight_scale_inv, and so is q_a_proj (vLLM fuses it with kv_a_proj_with_mqa, and a
fused layer is quantised whole or not at all); the config's quantization_config lists
them as not quantised; every other tensor is copied bit for bit. With ``dequantize`` every
fp8 weight (experts, q_b_proj, o_proj, ...) is dequantised too and written in bfloat16, tensor
by tensor, its weight_scale_inv read by name wherever the index puts it; all block scales are
dropped and quantization_config removed: an unquantised checkpoint mla_plugin_gla serves.

Streaming (pipeline.py): tensors are read and written one at a time; only the attention
latent weights of all layers (small) are held while the rest is copied. Calibration
(``pca-act`` or ``calibrate`` other than "none") first runs the source model once with
transformers in float32, which needs the whole model in memory, and keeps per layer the
latent and rope key of every calibration token and the queries at a sample of positions.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mla_plugin.checkpoint_format import LatentCheckpointFormat
from mla_plugin.convert import defaults
from mla_plugin.convert.calibration_capture import Capture, capture_activations
from mla_plugin.convert.calibration_fit import (
    active_slices,
    activation_pca_basis,
    calibrate_layer,
    fold_shard_scales,
    latent_second_moment,
)
from mla_plugin.convert.declared_config import write_config
from mla_plugin.convert.defaults import CALIBRATE_MODES
from mla_plugin.convert.fp8_blocks import (
    SCALE_SUFFIX,
    UNQUANTISED_DTYPE,
    BlockFp8,
    is_quantised,
    unquantised_config,
    write_dequantised_copy,
)
from mla_plugin.convert.pipeline import (
    INDEX_NAME,
    ConversionError,
    SourceCheckpoint,
    TensorEntry,
    atomic_destination,
    check_config_types,
    check_layer_count,
    copy_side_files,
    progress_reporter,
    read_source,
    write_index,
    write_streamed,
)
from mla_plugin.convert.safetensors_stream import read_tensor, tensor_entries
from mla_plugin.eval.eval_text import check_calibration_text
from mla_plugin.gla_options import CONFIG_KEY, CONVERTER_BASES, ShardedLatentOptions, ShardingPlan
from mla_plugin.ops.latent_basis import fold_gamma_and_rotate, fold_latent_weights, group_subspace_projection
from mla_plugin.text_windows import read_text_file

CALIB_TEXT_NEEDED = "needs calibration text: --calib-text FILE (train or validation text, never the test split)"
GROUP_PCA = "group-pca"
LATENT_PROJECTION = "latent_projection"  # the per-layer [d_c, d_c] tensor group-pca adds (gla_options.py)
# Whether group-pca measures key errors in each head's query metric E[q qᵀ] and value errors in
# its output metric W_O,hᵀ W_O,h (logit and output errors, docs/design.md section 5), or plainly.
GROUP_PCA_METRICS = True
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\."
                        r"(kv_a_proj_with_mqa|kv_a_layernorm|kv_b_proj|o_proj|q_a_proj)\.weight$")
SOURCE_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")  # V2, V2-Lite; V3, R1 (and Kimi-K2's shape)
# Written unquantised with the folded kv_a_proj_with_mqa of an fp8 source: vLLM fuses them into one layer.
FUSED_WITH_KV_A = ("q_a_proj",)


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


MLA_CONFIG_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                   "qk_rope_head_dim", "v_head_dim")


def _check_inputs(source: SourceCheckpoint, options: ShardedLatentOptions) -> ShardingPlan:
    """The source must be a stock DeepSeek-V2/V3 (MLA) checkpoint, unquantised or in fp8 blocks, whose
    config types and layer count match its weights."""
    src, config = source.path, source.config
    if config.get("model_type") not in SOURCE_MODEL_TYPES or "kv_lora_rank" not in config:
        arch = ", ".join(config.get("architectures") or [config.get("model_type", "unknown")])
        raise ConversionError(
            f"mla-to-gla converts DeepSeek-V2/V3 (MLA) checkpoints (model_type {' or '.join(SOURCE_MODEL_TYPES)}); "
            f"{src} is {arch} (model_type {config.get('model_type')!r}). For Llama/Qwen/Mistral use gqa-to-mla.")
    check_config_types(source, ints=MLA_CONFIG_INTS, optional_ints=("num_key_value_heads", "q_lora_rank"),
                       optional_numbers=("rope_theta",))
    BlockFp8.of_config(config, src / "config.json")  # refuses quantisations other than fp8 blocks
    declared = config.get(CONFIG_KEY)
    if isinstance(declared, dict) and declared.get("layout") == "sharded_latent":
        raise ConversionError(
            f"{src} is already a sharded-latent checkpoint (its config.json says layout sharded_latent, "
            f"converted with {declared.get('converted_with')}); convert the original MLA checkpoint instead")
    try:
        fmt = LatentCheckpointFormat.from_config(declared, rope_dim=config.get("qk_rope_head_dim"))
    except ValueError as err:
        raise ConversionError(f"{src}/config.json: {err}") from None
    if not fmt.is_stock:
        raise ConversionError(
            f"{src} was converted from a GQA/MHA model (gqa-to-mla: {fmt.to_dict().get('converted_from', {})}) "
            "and has no latent RMSNorm, or carries biases / its own rope frequencies; the sharded-latent "
            "layout does not support such checkpoints yet. Serve it with --attention-backend mla_plugin.")
    check_layer_count(source)
    return options.resolve(latent_dim=config["kv_lora_rank"], num_heads=config["num_attention_heads"], tp_size=1)


@dataclass
class _Calibration:
    capture: Capture
    mode: str  # "none", "logit", "logit+output"
    softmax: str
    rmsnorm: str
    fits: dict = field(default_factory=dict)  # layer -> ShardScaleFit


def _attention_weights_by_layer(source: SourceCheckpoint) -> dict[int, dict[str, TensorEntry]]:
    """layer -> {"kv_a_proj_with_mqa" | "kv_a_layernorm" | "kv_b_proj" | "o_proj": where the weight is}."""
    found: dict[int, dict[str, TensorEntry]] = {}
    for name, entry in source.tensors.items():
        match = _LAYER_KEY.match(name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = entry
    latent = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")  # o_proj alone is no MLA attention
    have = {layer for layer, parts in found.items() if any(kind in parts for kind in latent)}
    missing = sorted(set(range(source.config["num_hidden_layers"])) - have)
    if missing:
        raise ConversionError(f"{source.path}: layers {missing} have no MLA attention weights (kv_a_proj_with_mqa, "
                              "kv_a_layernorm, kv_b_proj); restore the missing weights")
    return found


def _weight_reader(source: SourceCheckpoint, fp8: BlockFp8 | None):
    """``read(name)``: a source weight in float64, dequantised where it is stored in fp8."""

    def read(name: str) -> torch.Tensor:
        entry = source.tensors[name]
        tensor = read_tensor(entry.path, name)
        if not is_quantised(entry.dtype):
            return tensor.to(torch.float64)
        scale = source.tensors.get(name + SCALE_SUFFIX)
        if fp8 is None or scale is None:
            raise ConversionError(
                f"{source.path}: {name} is stored in {entry.dtype} but "
                + ("config.json has no quantization_config" if fp8 is None else f"there is no {name}{SCALE_SUFFIX}")
                + "; the converter reads DeepSeek-V3's fp8 block format (weight + weight_scale_inv, "
                  "quantization_config.weight_block_size): restore the missing part")
        return fp8.dequantise(tensor, read_tensor(scale.path, name + SCALE_SUFFIX), name)

    return read


def _stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a rewritten weight is written in: the source's, bfloat16 where that was fp8."""
    return UNQUANTISED_DTYPE if is_quantised(dtype) else dtype


def _layer_transforms(source: SourceCheckpoint, scale: float, basis: str, progress, shards: int,
                      calibration: _Calibration | None = None, fp8: BlockFp8 | None = None) -> dict[str, torch.Tensor]:
    """New kv_a_proj_with_mqa, kv_a_layernorm and kv_b_proj weights for every layer (and, for an fp8
    source, q_a_proj dequantised: fp8_blocks.py)."""
    found = _attention_weights_by_layer(source)
    read = _weight_reader(source, fp8)
    replaced = {}
    fitting = calibration is not None and calibration.mode != "none"
    for layer in progress(sorted(found), desc="fold, rotate, calibrate" if fitting else "fold and rotate"):
        parts = found[layer]
        missing = {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"} - set(parts)
        if missing:
            raise ConversionError(f"layer {layer}: missing {sorted(missing)}")
        replaced.update(_fold_layer(source.config, layer, parts, read, scale=scale, basis=basis, shards=shards,
                                    calibration=calibration))
        if is_quantised(parts["kv_a_proj_with_mqa"].dtype):
            for kind in FUSED_WITH_KV_A:
                if kind in parts and is_quantised(parts[kind].dtype):
                    name = f"model.layers.{layer}.self_attn.{kind}.weight"
                    replaced[name] = read(name).to(_stored_dtype(parts[kind].dtype))
    return replaced


def _fold_layer(config: dict, layer: int, parts: dict[str, TensorEntry], read, *, scale: float, basis: str,
                shards: int, calibration: _Calibration | None) -> dict[str, torch.Tensor]:
    """One layer: γ folded, the latent rotated into the basis, the slice scales folded into W_UK
    (fitted per (head, slice) when calibrating, else ``scale``); float64 math, stored dtypes out
    (bfloat16 for fp8 weights). ``read(name)``: a weight in float64 (_weight_reader)."""
    d_c, heads = config["kv_lora_rank"], config["num_attention_heads"]
    nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
    prefix = f"model.layers.{layer}.self_attn."

    def load(kind):
        return read(f"{prefix}{kind}.weight")

    kv_a, gamma, kv_b = load("kv_a_proj_with_mqa"), load("kv_a_layernorm"), load("kv_b_proj")
    captured = None
    if calibration is not None:
        captured = calibration.capture.layers.get(layer)
        if captured is None:
            raise ConversionError(f"layer {layer}: no calibration activations captured")
    projection = None
    if basis == GROUP_PCA:
        per_head = kv_b.reshape(heads, nope + v, d_c)  # [H, d_nope + d_v, d_c]
        w_dkv, w_uk, w_uv = fold_gamma_and_rotate(kv_a[:d_c], gamma, per_head[:, :nope], per_head[:, nope:],
                                                  torch.eye(d_c, dtype=torch.float64))
        rotation = torch.eye(d_c, dtype=torch.float64)
        key_metric = value_metric = None
        if GROUP_PCA_METRICS:
            q = captured.q_nope.to(torch.float64).reshape(-1, heads, nope)  # [rows, H, d_nope]
            key_metric = torch.einsum("rhi,rhj->hij", q, q) / q.shape[0]  # [H, d_nope, d_nope]
            if "o_proj" in parts:
                w_o = load("o_proj").reshape(-1, heads, v)  # [d_model, H, d_v]
                value_metric = torch.einsum("dhi,dhj->hij", w_o, w_o)  # [H, d_v, d_v]
        projection, sub_uk, sub_uv = group_subspace_projection(
            w_uk, w_uv, latent_second_moment(captured.latent, captured.eps), shards,
            key_metric=key_metric, value_metric=value_metric)
    elif basis == "pca-act":
        rotation = activation_pca_basis(latent_second_moment(captured.latent, captured.eps))  # [d_c, d_c]
        per_head = kv_b.reshape(heads, nope + v, d_c)  # [H, d_nope + d_v, d_c]
        w_dkv, w_uk, w_uv = fold_gamma_and_rotate(kv_a[:d_c], gamma, per_head[:, :nope], per_head[:, nope:],
                                                  rotation)
    else:
        rotation, w_dkv, w_uk, w_uv = fold_latent_weights(kv_b, gamma, num_heads=heads, nope_dim=nope,
                                                          v_dim=v, basis=basis, w_dkv=kv_a[:d_c])
    if calibration is not None and calibration.mode != "none":
        fit = calibrate_layer(captured, calibration.capture.positions, w_uk, w_uv, rotation,
                              num_shards=shards, softmax_mode=calibration.softmax,
                              rmsnorm=calibration.rmsnorm, init_logit_scale=scale,
                              fit_output=calibration.mode == "logit+output",
                              group_subspace=None if projection is None else (projection, sub_uk, sub_uv))
        calibration.fits[layer] = fit
        if projection is not None:
            w_uk, w_uv = sub_uk, sub_uv
        w_uk, w_uv = fold_shard_scales(w_uk, w_uv, fit.logit_scale.to(torch.float64),
                                       fit.output_scale.to(torch.float64))
    else:
        if projection is not None:
            w_uk, w_uv = sub_uk, sub_uv
        w_uk = w_uk * scale
    new = {
        "kv_a_proj_with_mqa": torch.cat([w_dkv, kv_a[d_c:]]),  # [d_c + d_R, d_model]
        "kv_a_layernorm": torch.ones(d_c, dtype=torch.float64),  # [d_c], weightless now
        "kv_b_proj": torch.cat([w_uk, w_uv], dim=1).reshape(heads * (nope + v), d_c),  # [H * (d_nope + d_v), d_c]
    }
    out = {f"{prefix}{kind}.weight": tensor.to(_stored_dtype(parts[kind].dtype)) for kind, tensor in new.items()}
    if projection is not None:  # [d_c, d_c] = [B_0; …; B_{g−1}], stored like kv_b_proj
        out[f"{prefix}{LATENT_PROJECTION}.weight"] = projection.to(_stored_dtype(parts["kv_b_proj"].dtype))
    return out


def _check_calibration(basis: str, softmax: str, calib_text, calibrate: str, calib_tokens: int,
                       calib_window: int, allow_eval_text: bool = False) -> Path | None:
    if calibrate not in CALIBRATE_MODES:
        raise ConversionError(f"calibrate must be one of {list(CALIBRATE_MODES)}, got {calibrate!r}")
    needs_text = basis in ("pca-act", GROUP_PCA) or calibrate != "none"
    if calibrate != "none" and softmax == "exact":
        raise ConversionError(f"calibrate={calibrate!r} with softmax 'exact': nothing to calibrate (exact equals "
                              "MLA; slice scales apply to the partitioned and grouped softmax)")
    if not needs_text:
        return None
    what = f"basis {basis!r}" if basis in ("pca-act", GROUP_PCA) else f"calibrate={calibrate!r}"
    if calib_text is None:
        raise ConversionError(f"{what} {CALIB_TEXT_NEEDED}")
    path = Path(calib_text)
    if not path.is_file():
        raise ConversionError(f"calibration text {path} not found (--calib-text: a train or validation text "
                              "file, never the test split)")
    if not isinstance(calib_window, int) or calib_window < 2:
        raise ConversionError(f"calib_window must be an integer >= 2, got {calib_window!r}")
    if not isinstance(calib_tokens, int) or calib_tokens < calib_window:
        raise ConversionError(f"calib_tokens ({calib_tokens!r}) must be at least one window ({calib_window})")
    check_calibration_text(read_text_file(path), path, allow_eval_text=allow_eval_text)
    return path


def _check_group_pca(basis: str, softmax: str, rmsnorm: str) -> None:
    """group-pca is one projection per head group: grouped softmax and the global RMSNorm only."""
    if basis != GROUP_PCA:
        return
    if softmax != "grouped":
        raise ConversionError(f"basis 'group-pca' gives each head group its own latent subspace: it needs "
                              f"--softmax grouped (got {softmax!r}); for {softmax} use --basis pca-act or hadamard")
    if rmsnorm != "global":
        raise ConversionError("basis 'group-pca' projects the globally normalised latent: it needs --rmsnorm "
                              f"global (got {rmsnorm!r}); the rank forms the whole latent, so the global norm is "
                              "exact and free")


def _calibration_summary(calibration: _Calibration) -> tuple[dict, list[str]]:
    """converted_with entries and report lines for what calibration did."""
    capture = calibration.capture
    record = {"calibrate": calibration.mode, "calib_text": capture.text_name, "calib_tokens": capture.tokens,
              "calib_window": capture.window}
    lines = [f"calibration: {capture.windows} windows x {capture.window} tokens of {capture.text_name} "
             f"({capture.tokens} tokens)"]
    if not calibration.fits:
        return record, lines
    fits = [calibration.fits[k] for k in sorted(calibration.fits)]
    active = fits[0].logit_scale.new_ones(fits[0].logit_scale.shape, dtype=torch.bool)
    if calibration.softmax == "grouped":
        active = active_slices(active.shape[0], active.shape[1], "grouped")
    lam = torch.stack([f.logit_scale[active] for f in fits]).double()
    mu = torch.stack([f.output_scale[active] for f in fits]).double()
    before = torch.stack([f.error_before for f in fits]).double().mean().item()
    after = torch.stack([f.error_after for f in fits]).double().mean().item()
    record.update(mean_logit_scale=round(lam.mean().item(), 4),
                  attention_output_error_before=round(before, 6), attention_output_error_after=round(after, 6))
    line = (f"calibrated logit scales λ per (layer, head, slice): mean {lam.mean():.3f}, "
            f"range {lam.min():.3f}..{lam.max():.3f}")
    if calibration.mode == "logit+output":
        record["mean_output_scale"] = round(mu.mean().item(), 4)
        line += f"; output scales μ: mean {mu.mean():.3f}, range {mu.min():.3f}..{mu.max():.3f}"
    lines.append(line + f"; relative head-output error {100 * before:.3f}% -> {100 * after:.3f}% "
                        "(mean over layers and heads, calibration text)")
    return record, lines


@atomic_destination
def convert_mla_to_gla(src, dst, *, shards: int, softmax: str = defaults.MLA_TO_GLA_SOFTMAX,
                       rmsnorm: str = defaults.MLA_TO_GLA_RMSNORM, basis: str = defaults.MLA_TO_GLA_BASIS,
                       logit_scale=defaults.MLA_TO_GLA_LOGIT_SCALE, calib_text=None,
                       calibrate: str = defaults.MLA_TO_GLA_CALIBRATE,
                       calib_tokens: int = defaults.MLA_TO_GLA_CALIB_TOKENS,
                       calib_window: int = defaults.MLA_TO_GLA_CALIB_WINDOW, allow_eval_text: bool = False,
                       dequantize: bool = False, show_progress: bool = True) -> ConversionReport:
    """Rewrite checkpoint ``src`` into ``dst`` for the sharded-latent layout with g = ``shards``.

    ``basis="pca-act"`` and ``calibrate`` ("logit": fit λ per (layer, head, slice);
    "logit+output": λ and μ) need ``calib_text``, of which at most ``calib_tokens`` tokens
    are used in windows of ``calib_window``; they load the source model once with
    transformers (float32, whole model in memory). The evaluation text (the wikitext-2 test
    split, recognised by content) is refused as ``calib_text`` unless ``allow_eval_text``. ``dequantize``:
    an fp8 source's every fp8 weight is written in bfloat16, its block scales and quantization_config
    dropped (a no-op, noted in the report, for a source with no fp8 weights). The defaults are `mla-plugin convert
    mla-to-gla`'s (convert/defaults.py). ``dst`` appears whole or not at all (convert/destination.py).
    """
    source, dst = read_source(src), Path(dst)
    if basis not in CONVERTER_BASES:
        raise ConversionError(f"basis must be one of {list(CONVERTER_BASES)}, got {basis!r}")
    if logit_scale != "auto" and (isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float))):
        raise ConversionError(f"logit_scale (--logit-scale) must be a number or 'auto', got {logit_scale!r}")
    _check_group_pca(basis, softmax, rmsnorm)
    calib_path = _check_calibration(basis, softmax, calib_text, calibrate, calib_tokens, calib_window,
                                    allow_eval_text)
    runtime, plan = _runtime_options(source, shards=shards, softmax=softmax, rmsnorm=rmsnorm,
                                     logit_scale=logit_scale, latent_projection=basis == GROUP_PCA)
    fp8 = BlockFp8.of_config(source.config, source.path / "config.json")
    progress = progress_reporter(show_progress)
    calibration = None
    if calib_path is not None:
        _check_calibrated_layers(source)
        calibration = _capture(source, calib_path, calibrate=calibrate, softmax=softmax, rmsnorm=rmsnorm,
                               basis=basis, tokens=calib_tokens, window=calib_window, show_progress=show_progress,
                               fp8=fp8, scratch=dst.parent)
    replaced = _layer_transforms(source, plan.logit_scale, basis, progress, plan.shards, calibration, fp8)
    if calibration is not None:
        calibration.capture.layers = {}  # the activations are no longer needed
        calib_record, notes = _calibration_summary(calibration)
    else:
        calib_record, notes = {"calibrate": "none"}, []
    # fp8 weights rewritten here are written unquantised: their block scales go (fp8_blocks.py)
    unquantised = {name for name in replaced if name in source.tensors and is_quantised(source.tensors[name].dtype)}
    dequantised = _dequantised_weights(source, fp8, replaced) if dequantize else set()
    dropped = {name + SCALE_SUFFIX for name in unquantised | dequantised}
    dst.mkdir(parents=True, exist_ok=True)
    copied = _write_weights(source, dst, replaced, progress, dropped, dequantised, _weight_reader(source, fp8))
    # the index too (names and files are kept), unless tensors join or leave it: then it is rewritten
    added = {name for name in replaced if name not in source.tensors}
    renamed = (added or dropped) and source.has_index
    copy_side_files(source.path, dst, skip=("config.json", INDEX_NAME) if renamed else ("config.json",))
    if renamed:
        write_index(dst, {name: entry.path.name for name, entry in source.tensors.items() if name not in dropped}
                    | {name: _file_of_layer(source, name).name for name in added})
    config = _output_config(source.config, runtime, plan, basis, calib_record)
    if dequantize:
        notes = notes + [_dequantize_note(config, unquantised, dequantised, dropped)]
    elif unquantised:
        config["quantization_config"] = unquantised_config(
            config["quantization_config"], {name[: -len(".weight")] for name in unquantised})
        notes = notes + [f"fp8 source: {len(unquantised)} rewritten weights dequantised and written in "
                         f"{str(UNQUANTISED_DTYPE).removeprefix('torch.')} (their {len(dropped)} block scales "
                         "dropped, listed in quantization_config as not quantised); every other tensor copied "
                         "bit for bit"]
    write_config(dst, config)  # declares the architecture; the modeling file where not plain MLA
    d_c, d_r = config["kv_lora_rank"], config["qk_rope_head_dim"]
    return ConversionReport(
        layers=config["num_hidden_layers"], shards=plan.shards, options=config[CONFIG_KEY],
        kv_values_per_token_per_layer_before=d_c + d_r,
        kv_values_per_token_per_layer_per_rank_after=d_c // plan.shards + d_r,
        changed_tensors=len(replaced), copied_tensors=copied, notes=notes,
    )


def _dequantised_weights(source: SourceCheckpoint, fp8: BlockFp8 | None, replaced: dict) -> set[str]:
    """The fp8 weights ``dequantize`` writes in bfloat16 besides the rewritten ones; each checked to have
    its block scale (anywhere in the index) before anything is written."""
    names = {name for name, entry in source.tensors.items() if is_quantised(entry.dtype) and name not in replaced}
    lacking = sorted(name for name in names if name + SCALE_SUFFIX not in source.tensors)
    fix = "--dequantize reads DeepSeek-V3's fp8 block format"
    if names and fp8 is None:
        raise ConversionError(f"{source.path}: {len(names)} weight(s) are fp8 (e.g. {sorted(names)[0]}) but "
                              f"config.json has no quantization_config; {fix}: restore it")
    if lacking:
        raise ConversionError(f"{source.path}: {len(lacking)} fp8 weight(s) lack their {SCALE_SUFFIX} block scale "
                              f"(e.g. {lacking[0]}); {fix}: restore them")
    return names


def _dequantize_note(config: dict, unquantised: set[str], dequantised: set[str], dropped: set[str]) -> str:
    """``dequantize``: quantization_config removed from ``config``; the report line."""
    if config.pop("quantization_config", None) is None:
        return "--dequantize: the source has no fp8 weights; nothing to dequantise (the output is unquantised)"
    return (f"--dequantize: every fp8 weight ({len(unquantised | dequantised)}: {len(unquantised)} rewritten, "
            f"{len(dequantised)} copied) written in {str(UNQUANTISED_DTYPE).removeprefix('torch.')}, their "
            f"{len(dropped)} block scales dropped, quantization_config removed")


def _runtime_options(source: SourceCheckpoint, *, shards: int, softmax: str, rmsnorm: str,
                     logit_scale, latent_projection: bool) -> tuple[ShardedLatentOptions, ShardingPlan]:
    """The options the converted checkpoint declares (basis applied already), checked against the source."""
    try:
        runtime = ShardedLatentOptions.from_config(dict(
            shards=shards, softmax=softmax, rmsnorm=rmsnorm, basis="identity",
            logit_scale=logit_scale, layout="sharded_latent", latent_projection=latent_projection))
        return runtime, _check_inputs(source, runtime)
    except ValueError as err:
        raise ConversionError(_name_flags(str(err))) from None


def _name_flags(message: str) -> str:
    """The options' checks name config keys (``mla_plugin.shards``, for --hf-overrides); here they are flags."""
    for key in ("shards", "softmax", "rmsnorm", "logit_scale"):
        message = message.replace(f"{CONFIG_KEY}.{key}=", f"--{key.replace('_', '-')} ")
        message = message.replace(f"{CONFIG_KEY}.{key}", f"--{key.replace('_', '-')}")
    return message.replace("shards=", "--shards ")


def _check_calibrated_layers(source: SourceCheckpoint) -> None:
    """Calibration runs the model through transformers, which never runs the MTP layers."""
    extra = source.config.get("num_nextn_predict_layers") or 0
    if extra:
        first = source.config["num_hidden_layers"]
        raise ConversionError(
            f"{source.path}: calibration (--calibrate, --basis pca-act/group-pca) needs every layer's activations, "
            f"and the multi-token-prediction layer(s) {first}..{first + extra - 1} (num_nextn_predict_layers = "
            f"{extra}) do not run in a forward pass; convert without calibration (--basis identity/hadamard/pca)")


def _capture(source: SourceCheckpoint, calib_path: Path, *, calibrate: str, softmax: str, rmsnorm: str,
             basis: str, tokens: int, window: int, show_progress: bool, fp8: BlockFp8 | None = None,
             scratch: Path | None = None) -> _Calibration:
    """Run the source once over the calibration text (transformers) and keep what the fit needs. An fp8
    source runs as its dequantised float32 copy, written into a scratch folder beside DST (transformers
    5.19 on CPU refuses fp8 weights whose shape is not a multiple of the block, e.g. V3's kv_a_proj_with_mqa)."""
    import tempfile

    def run(model_path):
        return capture_activations(model_path, calib_path, tokens=tokens, window=window,
                                   need_queries=calibrate != "none" or basis == GROUP_PCA,
                                   show_progress=show_progress)

    try:
        if fp8 is None:
            capture = run(source.path)
        else:
            scratch = scratch if scratch is not None and scratch.is_dir() else None
            with tempfile.TemporaryDirectory(prefix=".mla-plugin-dequantised-", dir=scratch) as copy:
                write_dequantised_copy(source, copy, fp8)
                capture = run(copy)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    return _Calibration(capture=capture, mode=calibrate, softmax=softmax, rmsnorm=rmsnorm)


def _file_of_layer(source: SourceCheckpoint, name: str) -> Path:
    """The source file that holds the kv_b_proj of the layer a new tensor ``name`` belongs to."""
    prefix = name.rsplit(".self_attn.", 1)[0]
    return source.tensors[f"{prefix}.self_attn.kv_b_proj.weight"].path


def _write_weights(source: SourceCheckpoint, dst: Path, replaced: dict[str, torch.Tensor], progress,
                   dropped: set[str] = frozenset(), dequantised: set[str] = frozenset(), read=None) -> int:
    """Every source file rewritten under its own name, the replaced tensors swapped in (in their new
    dtype), ``dropped`` ones left out, ``dequantised`` ones read through ``read`` (float64, one at a time)
    and written in bfloat16, and new ones (group-pca's latent_projection) added to the file of their
    layer's kv_b_proj; returns the number of tensors copied unchanged (byte for byte)."""
    copied = 0
    added = [name for name in replaced if name not in source.tensors]
    for path in progress(source.files, desc="write"):
        entries = {name: entry for name, entry in tensor_entries(path).items() if name not in dropped}
        for name in replaced:
            if name in entries or (name in added and _file_of_layer(source, name) == path):
                entries[name] = (replaced[name].dtype, list(replaced[name].shape))
        for name in dequantised & entries.keys():
            entries[name] = (UNQUANTISED_DTYPE, entries[name][1])

        def tensor_for(name, path=path):
            nonlocal copied
            if name in replaced:
                return replaced[name]
            if name in dequantised:
                return read(name).to(UNQUANTISED_DTYPE)
            copied += 1
            return read_tensor(path, name)

        write_streamed(dst / path.name, [(n, d, s) for n, (d, s) in entries.items()], tensor_for)
    return copied


def _output_config(config: dict, runtime: ShardedLatentOptions, plan: ShardingPlan, basis: str,
                   calib_record: dict) -> dict:
    """The source's config.json with the layout declared, so vLLM with the plugin needs no flag."""
    # The scale is folded into W_UK, so the runtime multiplies by 1.
    options = runtime.to_dict()
    if not options.get("latent_projection"):
        options.pop("latent_projection", None)  # absent = false: configs of other conversions as before
    config[CONFIG_KEY] = dict(options, logit_scale=1.0,
                              converted_with={"basis": basis, "logit_scale": plan.logit_scale, **calib_record})
    return config
