"""vLLM's own Triton MLA decode kernel as a peer for benchmarks/gpu_decode.py, without vLLM.

``load()`` copies ``vllm/v1/attention/ops/triton_decode_attention.py`` from the installed
vLLM package into ``benchmarks/_peer/`` (git-ignored: vLLM's source is never committed; the
folder travels with a GPU run where vLLM is not installed) and imports it with three stand-in
modules (``vllm``, ``vllm.platforms`` whose ``current_platform.is_rocm()`` is False,
``vllm.triton_utils`` re-exporting triton / tl) present in ``sys.modules`` during that import
only; ``packaging.version`` gets a stand-in too if ``packaging`` is absent.

``run()`` calls it as vLLM 0.32's ``TritonMLAImpl.forward_mqa`` does: one row per query token
(the block table repeated per row, causal per-row lengths), the split count from the longest
length (a power of two of length // 512, at most 2 per SM), fp32 split logits
``[rows, H, splits, d_c + 1]``, ``k_scale = v_scale = σ``.
"""

import importlib.util
import os
import shutil
import sys
import types
from pathlib import Path

import torch
import triton
import triton.language as tl

PEER_DIR = Path(__file__).resolve().parent / "_peer"
PEER_FILE = PEER_DIR / "triton_decode_attention.py"
VLLM_PATH = ("v1", "attention", "ops", "triton_decode_attention.py")


def copy_from_installed_vllm() -> Path:
    """Copy the kernel file from the installed vLLM package (found without importing vLLM)."""
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.submodule_search_locations:
        source = Path(list(spec.submodule_search_locations)[0]).joinpath(*VLLM_PATH)
        if source.is_file():
            PEER_DIR.mkdir(exist_ok=True)
            shutil.copyfile(source, PEER_FILE)
            return PEER_FILE
    if PEER_FILE.is_file():  # copied earlier on a machine with vLLM (a GPU run carries the folder)
        return PEER_FILE
    raise FileNotFoundError("vLLM is not installed and benchmarks/_peer/triton_decode_attention.py was not "
                            "copied: run `python benchmarks/vllm_peer.py` where vLLM is installed")


def _stubs() -> dict:
    vllm = types.ModuleType("vllm")
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_rocm=lambda: False)
    triton_utils = types.ModuleType("vllm.triton_utils")
    triton_utils.triton, triton_utils.tl = triton, tl
    vllm.platforms, vllm.triton_utils = platforms, triton_utils
    stubs = {"vllm": vllm, "vllm.platforms": platforms, "vllm.triton_utils": triton_utils}
    if importlib.util.find_spec("packaging") is None:
        packaging = types.ModuleType("packaging")
        version = types.ModuleType("packaging.version")
        version.parse = lambda text: tuple(int(p) for p in str(text).split(".")[:3] if p.isdigit())
        packaging.version = version
        stubs.update({"packaging": packaging, "packaging.version": version})
    return stubs


def load():
    """The peer module, imported from the copied file with the stand-ins during the import only."""
    path = copy_from_installed_vllm()
    stubs = _stubs()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("vllm_triton_decode_attention_peer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def vllm_num_splits(max_seq_len: int, sms: int) -> int:
    """vLLM 0.32's split count: a power of two of (longest length // 512), at most 2 per SM."""
    return min(triton.next_power_of_2(max(1, max_seq_len // 512)), 2 * sms)


def prepare(q, cache, seq_lens, block_table, d_c: int, query_len: int, max_seq_len: int, sms: int):
    """Inputs of one call as vLLM builds them: q ``[rows, H, d_c + d_R]`` with ``query_len``
    consecutive rows per request (causal lengths per row), the block table repeated per row."""
    rows, heads = q.shape[0], q.shape[1]
    if interpreting():  # Triton's interpreter runs vLLM's bf16 products wrongly (numpy has no bf16): use fp32
        q = q.float()
        cache = cache if cache.dtype == torch.float8_e4m3fn else cache.float()
    if query_len > 1:
        block_table = block_table.repeat_interleave(query_len, dim=0)  # [rows, max_blocks]
        offsets = torch.arange(1 - query_len, 1, device=seq_lens.device, dtype=seq_lens.dtype)
        seq_lens = (seq_lens.unsqueeze(1) + offsets).flatten().clamp(min=0)  # [rows]
    splits = vllm_num_splits(max_seq_len, sms)
    return dict(
        q=q, kv=cache.unsqueeze(2), v=cache.unsqueeze(2)[..., :d_c], block_table=block_table, seq_lens=seq_lens,
        o=torch.empty(rows, heads, d_c, dtype=q.dtype, device=q.device),
        lse=torch.empty(rows, heads, dtype=q.dtype, device=q.device),
        logits=torch.empty(rows, heads, splits, d_c + 1, dtype=torch.float32, device=q.device),  # [rows, H, S, d_c+1]
        splits=splits, page_size=cache.shape[1])


def run(module, inputs: dict, scale: float, sigma: torch.Tensor) -> torch.Tensor:
    """One decode call of vLLM's kernel; returns o ``[rows, H, d_c]``."""
    module.decode_attention_fwd(
        inputs["q"], inputs["kv"], inputs["v"], inputs["o"], inputs["lse"], inputs["block_table"],
        inputs["seq_lens"], inputs["logits"], inputs["splits"], scale, inputs["page_size"],
        k_scale=sigma, v_scale=sigma, is_mla=True)
    return inputs["o"]


if __name__ == "__main__":
    print(copy_from_installed_vllm())
