"""What SGLang's CPU engine needs that PyPI does not give. CPU only; never on CUDA.

SGLang runs on CPU when ``SGLANG_USE_CPU_ENGINE=1`` (its own switch, ``is_cpu()``). Then:

1. **sgl_kernel ops.** Two modules import CPU ops from ``sgl_kernel`` at import time
   (``copy_all_layer_kv_cache_cpu``, ``assign_req_to_token_pool_cpu``). PyPI's
   ``sglang-kernel`` is a CUDA build, and SGLang's CPU build needs AVX-512/AMX. When no
   ``sgl_kernel`` can be imported, ``install()`` serves a module of that name holding
   plain-torch stand-ins of just these two ops (and, for the speculative-decoding modules
   SGLang also imports, names that raise if called); any other name is an ImportError,
   so SGLang's own "is this kernel here?" checks answer no. A real ``sgl_kernel`` always
   wins (the finder is the last one asked). MoE layers need nothing more: SGLang's AMX check
   (``torch.ops.sgl_kernel.convert_weight_packed``) answers no, so its CPU MoE takes its
   plain-torch path (``moe_forward_native``, torch top-k routing).
2. **CPU rope.** SGLang's CPU rope factory (``get_rope_cpu``) takes only DeepSeek-YaRN
   scaling; a checkpoint with plain rope (no ``rope_scaling``) gets DeepSeek-YaRN with
   factor 1, which is the plain rope (every frequency and scale unchanged).
3. **torchvision.** PyPI's build needs CUDA torch (``torchvision::nms does not exist``
   beside the CPU torch), so it is not installed; yet SGLang imports
   ``torchvision.transforms`` at import time (its InternVL helpers, reached from
   ``sglang.srt.configs``). When no torchvision can be imported, ``install()`` serves a
   placeholder package: importing works, and *using* anything from it raises ImportError
   (image models need the real torchvision). Text models never use it.

SGLang's scheduler processes are spawned, and they import these modules before any plugin
runs, so the stand-ins are installed at interpreter start by a ``.pth`` line
(``install_pth``, or ``python -m mla_plugin.sglang.cpu_support --install-pth``; scripts/setup.sh for
``.venv-sglang``) that calls ``boot()``: it reads one environment variable and, only when
SGLang's CPU switch is on, adds the import finder. Nothing here imports torch or SGLang
until SGLang itself imports ``sgl_kernel``.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

CPU_SWITCH = "SGLANG_USE_CPU_ENGINE"
STAND_IN = "sgl_kernel"
ABSENT_PACKAGE = "torchvision"
STAND_IN_OPS = ("copy_all_layer_kv_cache_cpu", "assign_req_to_token_pool_cpu")
# Imported at import time by SGLang's speculative-decoding modules, used only with
# speculative decoding: present (so SGLang imports), and an error if called.
SPECULATIVE_OPS = (
    "rotate_input_ids_cpu", "fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu",
    "assign_draft_cache_locs_contiguous_cpu", "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu", "verify_tree_greedy_cpu",
)
PTH_NAME = "mla_plugin_sglang_cpu.pth"


def sglang_on_cpu() -> bool:
    """SGLang's own CPU switch (``sglang.srt.utils.is_cpu`` reads the same variable)."""
    return os.environ.get(CPU_SWITCH, "0") == "1"


# -- the two ops ----------------------------------------------------------------------


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """``req_to_token[r_b, start_b:end_b] = out_cache_loc[next end_b - start_b values]``, b in order."""
    import torch

    starts, ends = start_offset.tolist(), end_offset.tolist()
    rows = req_pool_indices.tolist()
    taken = 0
    for row, start, end in zip(rows, starts, ends):
        req_to_token[row, start:end] = out_cache_loc[taken : taken + end - start].to(req_to_token.dtype)
        taken += end - start
    del torch, pool_len


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every buffer (base address, row stride in bytes): rows ``src_loc`` -> rows ``tgt_loc``.

    All source rows are read before any target row is written (as SGLang's kernel does),
    so overlapping moves are safe.
    """
    import ctypes

    import torch

    if tgt_loc.numel() == 0:
        return
    top = int(torch.maximum(tgt_loc.max(), src_loc.max())) + 1
    for address, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (top * stride)).from_address(address)
        rows = torch.frombuffer(raw, dtype=torch.uint8).view(top, stride)  # [rows, bytes]
        rows[tgt_loc.long()] = rows[src_loc.long()].clone()


# -- serving them as sgl_kernel ---------------------------------------------------------


def _speculative_only(name: str):
    def unsupported(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name}: speculative decoding on CPU needs SGLang's CPU sgl_kernel build "
            "(AVX-512/AMX); mla_plugin's CPU stand-in (mla_plugin/sglang/cpu_support.py) does not provide it"
        )

    unsupported.__name__ = name
    return unsupported


class _StandInModule:
    """Module body for the stand-in ``sgl_kernel``: the two ops, ImportError for the rest."""

    @staticmethod
    def fill(module) -> None:
        module.copy_all_layer_kv_cache_cpu = copy_all_layer_kv_cache_cpu
        module.assign_req_to_token_pool_cpu = assign_req_to_token_pool_cpu
        module.__mla_plugin_stand_in__ = True
        for name in SPECULATIVE_OPS:
            module.__dict__[name] = _speculative_only(name)

        def missing(name):
            raise AttributeError(
                f"sgl_kernel.{name}: this sgl_kernel is mla_plugin's CPU stand-in "
                f"(mla_plugin/sglang/cpu_support.py), which has only {', '.join(STAND_IN_OPS)}"
            )

        module.__getattr__ = missing


class _Unavailable:
    """A name from the torchvision placeholder: any use (call, attribute) says what is missing."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Unavailable(f"{self._name}.{attribute}")

    def __call__(self, *args, **kwargs):
        raise ImportError(
            f"{self._name}: torchvision is not installed in this CPU SGLang environment (PyPI's torchvision "
            "needs CUDA torch); mla_plugin's placeholder only lets SGLang import. Image models need torchvision."
        )


def _fill_placeholder(module) -> None:
    module.__path__ = []  # a package: its submodules come from this finder too
    module.__mla_plugin_stand_in__ = True

    def unavailable(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{module.__name__}.{name}")

    module.__getattr__ = unavailable


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        if module.__name__ == STAND_IN:
            _StandInModule.fill(module)
        else:
            _fill_placeholder(module)


class _StandInFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: asked for ``sgl_kernel`` or ``torchvision`` only when no
    real one was found."""

    def __init__(self):
        self.transformers_told = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != STAND_IN and fullname.split(".")[0] != ABSENT_PACKAGE:
            return None
        if fullname != STAND_IN:
            if not _importer_is_sglang():
                return None  # others (transformers' "is torchvision there?") see it absent
            self._settle_transformers()
        spec = importlib.machinery.ModuleSpec(fullname, _StandInLoader(), origin=__file__)
        if fullname != STAND_IN:
            spec.submodule_search_locations = []
        return spec


    def _settle_transformers(self) -> None:
        """Let transformers decide (and cache) "no torchvision" before the placeholder exists."""
        if self.transformers_told:
            return
        self.transformers_told = True
        try:
            from transformers.utils import import_utils
        except ImportError:
            return
        import_utils.is_torchvision_available()


def _importer_is_sglang() -> bool:
    """Whether the import statement being served is in one of SGLang's modules."""
    frame = sys._getframe(2)
    while frame is not None and ("importlib" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("sglang.")


def install_import_stand_in() -> None:
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.append(_StandInFinder())


# -- the CPU rope --------------------------------------------------------------------------

PLAIN_ROPE_AS_DEEPSEEK_YARN = {
    "rope_type": "deepseek_yarn", "factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0,
    "beta_fast": 32, "beta_slow": 1,
}


def cpu_rope_accepting_plain_rope(original, *args, **kwargs):
    """AROUND hook on ``get_rope_cpu``: no ``rope_scaling`` -> DeepSeek-YaRN with factor 1."""
    names = ("head_size", "rotary_dim", "max_position", "base", "is_neox_style", "rope_scaling")
    max_position = args[2] if len(args) > 2 else kwargs.get("max_position")
    plain = {**PLAIN_ROPE_AS_DEEPSEEK_YARN, "original_max_position_embeddings": max_position}
    if len(args) > names.index("rope_scaling"):
        if args[names.index("rope_scaling")] is None:
            args = (*args[:5], plain, *args[6:])
    elif kwargs.get("rope_scaling") is None:
        kwargs["rope_scaling"] = plain
    return original(*args, **kwargs)


CPU_ROPE_TARGET = "sglang.srt.layers.rotary_embedding.factory.get_rope_cpu"


def register_cpu_hooks() -> None:
    """Called from the plugin's registration in each SGLang process on CPU."""
    from mla_plugin.sglang.compat import HookRegistry, HookType

    HookRegistry.register(CPU_ROPE_TARGET, cpu_rope_accepting_plain_rope, HookType.AROUND)


# -- start-up ----------------------------------------------------------------------------


def boot() -> None:
    """The ``.pth`` entry: the import stand-ins, only when SGLang runs on CPU."""
    if sglang_on_cpu():
        install_import_stand_in()


def install_pth(site_packages: str) -> str:
    """Write the ``.pth`` line that calls ``boot()`` at interpreter start; returns its path."""
    path = os.path.join(site_packages, PTH_NAME)
    with open(path, "w") as f:
        f.write("import mla_plugin.sglang.cpu_support as _m; _m.boot()\n")
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["--install-pth"]:
        sys.exit("usage: python -m mla_plugin.sglang.cpu_support --install-pth")
    import sysconfig

    print(install_pth(sysconfig.get_paths()["purelib"]))
