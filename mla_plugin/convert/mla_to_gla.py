"""MLA -> sharded latent: a DeepSeek-V2 checkpoint rewritten for MLA_PLUGIN_GLA.

Per layer (DESIGN.md section 1): the latent RMSNorm weight γ is folded into the
up-projections, the latent is rotated into the chosen orthogonal basis R
(W_DKV <- Rᵀ W_DKV on the latent rows of kv_a_proj_with_mqa; W_UK,h, W_UV,h <- · diag(γ) R),
and, for the approximate softmax modes, each slice's partial-logit scale is folded into
W_UK. With calibration text (``calib_text``; train or validation text, never the test
split) the basis may be the activation PCA (``pca-act``), and the logit scale λ (and an
output scale μ) may be fitted per (layer, head, slice) and folded into W_UK (and W_UV);
see shard_calibration.py. config.json then declares ``"mla_plugin": {"layout": "sharded_latent", ...}`` so
vLLM with the plugin serves it with no flags. Under exact softmax and global RMSNorm
the result is still an ordinary DeepSeek-V2 checkpoint computing the same function
(transformers loads it too).

Streaming: tensors are read and written one at a time; only the attention latent
weights of all layers (small) are held while the rest is copied. Calibration (``pca-act``
or ``calibrate`` other than "none") first runs the source model once with transformers
in float32, which needs the whole model in memory, and keeps per layer the latent and
rope key of every calibration token and the queries at a sample of positions.
"""

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mla_plugin.checkpoint_format import LatentCheckpointFormat
from mla_plugin.convert.safetensors_stream import StreamingWriter, read_tensor, tensor_entries
from mla_plugin.convert.shard_calibration import (
    CALIBRATE_MODES,
    DEFAULT_CALIB_TOKENS,
    DEFAULT_CALIB_WINDOW,
    Capture,
    activation_pca_basis,
    active_slices,
    calibrate_layer,
    capture_activations,
    fold_shard_scales,
    latent_second_moment,
)
from mla_plugin.gla_options import CONFIG_KEY, ResolvedSharding, ShardedLatentOptions
from mla_plugin.ops.latent_basis import fold_gamma_and_rotate, fold_latent_weights

CONVERTER_BASES = ("identity", "hadamard", "pca", "pca-act")
CALIB_TEXT_NEEDED = "needs calibration text: --calib-text FILE (train or validation text, never the test split)"
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


def progress_bar(items, desc: str, enabled: bool):
    """``items`` under a tqdm bar when enabled (the converters' long loops)."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


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
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; give a new or empty folder")
    return options.resolve(tp_size=1, kv_lora_rank=config["kv_lora_rank"],
                           num_heads=config["num_attention_heads"])


@dataclass
class _Calibration:
    capture: Capture
    mode: str  # "none", "logit", "logit+output"
    softmax: str
    rmsnorm: str
    fits: dict = field(default_factory=dict)  # layer -> ShardScaleFit


def _layer_transforms(files, config, scale, basis, progress, shards: int,
                      calibration: _Calibration | None = None) -> dict[str, torch.Tensor]:
    """New kv_a_proj_with_mqa, kv_a_layernorm and kv_b_proj weights for every layer."""

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
    fitting = calibration is not None and calibration.mode != "none"
    for layer in progress(sorted(found), desc="fold, rotate, calibrate" if fitting else "fold and rotate"):
        parts = found[layer]
        missing = {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"} - set(parts)
        if missing:
            raise ConversionError(f"layer {layer}: missing {sorted(missing)}")

        def load(kind):
            path, _ = parts[kind]
            return read_tensor(path, f"model.layers.{layer}.self_attn.{kind}.weight").to(torch.float64)

        kv_a, gamma, kv_b = load("kv_a_proj_with_mqa"), load("kv_a_layernorm"), load("kv_b_proj")
        captured = None
        if calibration is not None:
            captured = calibration.capture.layers.get(layer)
            if captured is None:
                raise ConversionError(f"layer {layer}: no calibration activations captured")
        if basis == "pca-act":
            rotation = activation_pca_basis(latent_second_moment(captured.latent, captured.eps))
            per_head = kv_b.reshape(heads, nope + v, d_c)
            w_dkv, w_uk, w_uv = fold_gamma_and_rotate(kv_a[:d_c], gamma, per_head[:, :nope], per_head[:, nope:],
                                                      rotation)
        else:
            rotation, w_dkv, w_uk, w_uv = fold_latent_weights(kv_b, gamma, num_heads=heads, nope_dim=nope,
                                                              v_dim=v, basis=basis, w_dkv=kv_a[:d_c])
        if fitting:
            fit = calibrate_layer(captured, calibration.capture.positions, w_uk, w_uv, rotation,
                                  num_shards=shards, softmax_mode=calibration.softmax,
                                  rmsnorm=calibration.rmsnorm, init_logit_scale=scale,
                                  fit_output=calibration.mode == "logit+output")
            calibration.fits[layer] = fit
            w_uk, w_uv = fold_shard_scales(w_uk, w_uv, fit.logit_scale.to(torch.float64),
                                           fit.output_scale.to(torch.float64))
        else:
            w_uk = w_uk * scale
        prefix = f"model.layers.{layer}.self_attn."
        replaced[prefix + "kv_a_proj_with_mqa.weight"] = (torch.cat([w_dkv, kv_a[d_c:]]), parts["kv_a_proj_with_mqa"][1])
        replaced[prefix + "kv_a_layernorm.weight"] = (torch.ones(d_c, dtype=torch.float64), parts["kv_a_layernorm"][1])
        replaced[prefix + "kv_b_proj.weight"] = (torch.cat([w_uk, w_uv], dim=1).reshape(heads * (nope + v), d_c),
                                                 parts["kv_b_proj"][1])
    return {name: tensor.to(dtype) for name, (tensor, dtype) in replaced.items()}


def _check_calibration(basis: str, softmax: str, calib_text, calibrate: str, calib_tokens: int,
                       calib_window: int) -> Path | None:
    if calibrate not in CALIBRATE_MODES:
        raise ConversionError(f"calibrate must be one of {list(CALIBRATE_MODES)}, got {calibrate!r}")
    needs_text = basis == "pca-act" or calibrate != "none"
    if calibrate != "none" and softmax == "exact":
        raise ConversionError(f"calibrate={calibrate!r} with softmax 'exact': nothing to calibrate (exact equals "
                              "MLA; slice scales apply to the partitioned and grouped softmax)")
    if not needs_text:
        return None
    what = "basis 'pca-act'" if basis == "pca-act" else f"calibrate={calibrate!r}"
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
    return path


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


def convert_mla_to_gla(src, dst, *, shards: int, softmax: str = "partitioned", rmsnorm: str = "global",
                       basis: str = "identity", logit_scale="auto", calib_text=None, calibrate: str = "none",
                       calib_tokens: int = DEFAULT_CALIB_TOKENS, calib_window: int = DEFAULT_CALIB_WINDOW,
                       show_progress: bool = True) -> ConversionReport:
    """Rewrite checkpoint ``src`` into ``dst`` for the sharded-latent layout with g = ``shards``.

    ``basis="pca-act"`` and ``calibrate`` ("logit": fit λ per (layer, head, slice);
    "logit+output": λ and μ) need ``calib_text``, of which at most ``calib_tokens`` tokens
    are used in windows of ``calib_window``; they load the source model once with
    transformers (float32, whole model in memory).
    """

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    config = json.loads((src / "config.json").read_text())
    if basis not in CONVERTER_BASES:
        raise ConversionError(f"basis must be one of {list(CONVERTER_BASES)}, got {basis!r}")
    calib_path = _check_calibration(basis, softmax, calib_text, calibrate, calib_tokens, calib_window)
    try:
        runtime = ShardedLatentOptions.from_config(dict(
            shards=shards, softmax=softmax, rmsnorm=rmsnorm, basis="identity",
            logit_scale=logit_scale, layout="sharded_latent"))
        resolved = _check_inputs(src, dst, config, runtime)
    except ValueError as err:
        raise ConversionError(str(err)) from None

    def progress(items, desc):
        return progress_bar(items, desc, show_progress)

    files = _safetensors_files(src)
    calibration = None
    if calib_path is not None:
        try:
            capture = capture_activations(src, calib_path, tokens=calib_tokens, window=calib_window,
                                          need_queries=calibrate != "none", show_progress=show_progress)
        except ValueError as err:
            raise ConversionError(str(err)) from None
        calibration = _Calibration(capture=capture, mode=calibrate, softmax=softmax, rmsnorm=rmsnorm)
    replaced = _layer_transforms(files, config, resolved.logit_scale, basis, progress, resolved.shards,
                                 calibration)
    if calibration is not None:
        calibration.capture.layers = {}  # the activations are no longer needed
        calib_record, notes = _calibration_summary(calibration)
    else:
        calib_record, notes = {"calibrate": "none"}, []
    dst.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in progress(files, desc="write"):
        entries = tensor_entries(path)
        writer = StreamingWriter(dst / path.name, [(n, d, s) for n, (d, s) in entries.items()],
                                 metadata={"format": "pt"})
        for name in entries:
            if name in replaced:
                writer.write(name, replaced[name])
            else:
                writer.write(name, read_tensor(path, name))
                copied += 1
        writer.close()
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name != "config.json":
            shutil.copy2(other, dst / other.name)
    # The scale is folded into W_UK, so the runtime multiplies by 1.
    config[CONFIG_KEY] = dict(runtime.to_dict(), logit_scale=1.0,
                              converted_with={"basis": basis, "logit_scale": resolved.logit_scale, **calib_record})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    d_c, d_r = config["kv_lora_rank"], config["qk_rope_head_dim"]
    return ConversionReport(
        layers=len(replaced) // 3, shards=resolved.shards, options=config[CONFIG_KEY],
        kv_values_per_token_per_layer_before=d_c + d_r,
        kv_values_per_token_per_layer_per_rank_after=d_c // resolved.shards + d_r,
        changed_tensors=len(replaced), copied_tensors=copied, notes=notes,
    )
