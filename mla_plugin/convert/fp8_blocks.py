"""fp8 block-quantised sources (DeepSeek-V3's format): what a converter must know of them.

DeepSeek-V3 ships its linear weights as ``*.weight`` in float8_e4m3fn with
``*.weight_scale_inv`` in float32, one scale per 128 x 128 block (shape [ceil(out/128),
ceil(in/128)]; edge blocks are smaller): weight ≈ fp8 * scale_inv over each block.
config.json says ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}``.

A converter that rewrites a weight (folds something into it) dequantises it, computes in
float64 and writes the result unquantised (bfloat16), without its ``weight_scale_inv``;
every other tensor, fp8 or not, is copied byte for byte. The config then lists the
rewritten modules as not quantised, under both keys loaders read:

- transformers 5.19 (FineGrainedFP8Config): ``modules_to_not_convert`` (``ignored_layers``
  only as an alias when ``modules_to_not_convert`` is absent); a list replaces its default
  skips, so ``lm_head`` is listed too;
- vLLM 0.32 (Fp8Config.from_config): ``ignored_layers`` (``modules_to_not_convert`` only
  when ``ignored_layers`` is empty), matched exactly against module prefixes; a fused
  layer (DeepSeek's ``fused_qkv_a_proj`` = ``q_a_proj`` + ``kv_a_proj_with_mqa`` when
  q_lora_rank is set) must have all of its parts listed or none (vLLM refuses a mix), so a
  converter that rewrites ``kv_a_proj_with_mqa`` writes ``q_a_proj`` unquantised too.
"""

import math
from dataclasses import dataclass

import torch

from mla_plugin.convert.conversion_error import ConversionError

SCALE_SUFFIX = "_scale_inv"  # "<module>.weight" -> "<module>.weight_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn,)
UNQUANTISED_DTYPE = torch.bfloat16  # what a rewritten fp8 weight is stored as
SKIP_KEYS = ("modules_to_not_convert", "ignored_layers")  # transformers', vLLM's (module docstring)
DEFAULT_SKIPS = ("lm_head",)  # transformers' default skip, lost once modules_to_not_convert is set


@dataclass(frozen=True)
class BlockFp8:
    """The block size of an fp8 block-quantised source."""

    block_rows: int
    block_cols: int

    @classmethod
    def of_config(cls, config: dict, where) -> "BlockFp8 | None":
        """None for an unquantised source; refuses quantisations other than DeepSeek-V3's fp8 blocks."""
        quant = config.get("quantization_config")
        if quant is None:
            return None
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        block = quant.get("weight_block_size") if isinstance(quant, dict) else None
        fmt = quant.get("fmt", "e4m3") if isinstance(quant, dict) else None
        if method != "fp8" or fmt != "e4m3" or not (
                isinstance(block, list) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ConversionError(
                f"{where}: quantization_config {quant!r} is not supported; the converter reads unquantised "
                "checkpoints and DeepSeek-V3's fp8 block format (quant_method 'fp8', fmt 'e4m3', "
                "weight_block_size [rows, cols]); dequantise the checkpoint first")
        return cls(block[0], block[1])

    def scale_shape(self, shape: list[int]) -> list[int]:
        return [math.ceil(shape[0] / self.block_rows), math.ceil(shape[1] / self.block_cols)]

    def dequantise(self, weight: torch.Tensor, scale_inv: torch.Tensor, name: str) -> torch.Tensor:
        """fp8 [out, in] and scale_inv [ceil(out/b_r), ceil(in/b_c)] -> float64 [out, in]."""
        if weight.dim() != 2 or list(scale_inv.shape) != self.scale_shape(list(weight.shape)):
            raise ConversionError(f"{name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}; a weight of shape "
                                  f"{list(weight.shape)} in {self.block_rows} x {self.block_cols} blocks needs "
                                  f"{self.scale_shape(list(weight.shape))}; the checkpoint is damaged")
        rows, cols = weight.shape
        per_element = scale_inv.to(torch.float64).repeat_interleave(self.block_rows, dim=0)
        per_element = per_element.repeat_interleave(self.block_cols, dim=1)[:rows, :cols]  # [out, in]
        return weight.to(torch.float64) * per_element


def is_quantised(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def unquantised_config(quant: dict, modules: set[str]) -> dict:
    """``quantization_config`` with ``modules`` (module names, e.g. ``model.layers.0.self_attn.kv_b_proj``)
    listed as not quantised under both loaders' keys (module docstring)."""
    listed: set[str] = set()
    for key in SKIP_KEYS:
        if isinstance(quant.get(key), list):
            listed.update(quant[key])
    if not any(isinstance(quant.get(key), list) for key in SKIP_KEYS):
        listed.update(DEFAULT_SKIPS)
    names = sorted(listed | set(modules))
    return dict(quant, **{key: list(names) for key in SKIP_KEYS})


def write_dequantised_copy(source, dst, fp8: BlockFp8, *, dtype: torch.dtype = torch.float32) -> None:
    """The unquantised checkpoint ``source`` (a pipeline.SourceCheckpoint) stands for, written into the
    folder ``dst`` tensor by tensor (fp8 weights dequantised to ``dtype``, their scales dropped,
    config.json without quantization_config): what calibration runs through transformers, which
    (5.19, on CPU) refuses fp8 weights whose shape is not a multiple of the block."""
    import json
    from pathlib import Path

    from mla_plugin.convert.pipeline import INDEX_NAME, copy_side_files, write_index, write_streamed
    from mla_plugin.convert.safetensors_stream import read_tensor, tensor_entries

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for path in source.files:
        entries = [(name, dtype if is_quantised(d) else d, shape)
                   for name, (d, shape) in tensor_entries(path).items()
                   if not (name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in source.tensors)]

        def tensor_for(name, path=path):
            tensor = read_tensor(path, name)
            if not is_quantised(tensor.dtype):
                return tensor
            scale = source.tensors.get(name + SCALE_SUFFIX)
            if scale is None:
                raise ConversionError(f"{name} is {tensor.dtype} without {name}{SCALE_SUFFIX}; the checkpoint "
                                      "is damaged")
            return fp8.dequantise(tensor, read_tensor(scale.path, name + SCALE_SUFFIX), name).to(dtype)

        write_streamed(dst / path.name, entries, tensor_for)
        weight_map.update({name: path.name for name, _, _ in entries})
    if source.has_index:
        write_index(dst, weight_map)
    copy_side_files(source.path, dst, skip=("config.json", INDEX_NAME))
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
