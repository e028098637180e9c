"""Which implementation of the attention seam runs: plain torch or the Triton kernels.

``MLA_PLUGIN_KERNEL`` (read on every call, so tests and users can switch it):

- unset: Triton on CUDA tensors (when ``triton`` imports), plain torch otherwise;
- ``torch``: always the plain-torch code (``paged_attention.py``);
- ``triton``: always the Triton kernels (``triton_paged_attention.py``). On CPU tensors
  this needs ``TRITON_INTERPRET=1`` set before the process starts (Triton's interpreter
  runs the same kernels, slowly: for tests and for checking a GPU path without a GPU).

Any other value is one clear error. ``KERNEL_CALLS`` counts, per implementation, the calls
of the seam in this process that ran it to the end (the Triton count is taken after its
kernels were launched); ``trace.KERNEL_TRACE_ENV`` records the same across processes: the
proof, for tests, that the Triton kernels (not the torch code) ran.
"""

import importlib.util
import os
from collections import Counter

import torch

from mla_plugin.ops.trace import KERNEL_TRACE_ENV, append_trace

KERNEL_ENV = "MLA_PLUGIN_KERNEL"
KERNELS = ("torch", "triton")

# Calls of the seam per implementation in this process that ran it (tests read it).
KERNEL_CALLS: Counter = Counter()
_TRACED: set[tuple[int, str]] = set()


def note_kernel_ran(kernel: str) -> None:
    """Called by each implementation once its work is launched: count it, and on a process's
    first run of ``kernel`` append ``kernel-ran <kernel> pid=<pid>`` to the kernel trace file."""
    KERNEL_CALLS[kernel] += 1
    key = (os.getpid(), kernel)  # per process, also in a forked child that inherited the counts
    if key not in _TRACED:
        _TRACED.add(key)
        append_trace(KERNEL_TRACE_ENV, f"kernel-ran {kernel} pid={os.getpid()}")


class KernelChoiceError(ValueError):
    """MLA_PLUGIN_KERNEL names something that cannot run here."""


def requested_kernel() -> str | None:
    """The kernel MLA_PLUGIN_KERNEL asks for (None when unset or empty)."""
    value = os.environ.get(KERNEL_ENV, "").strip().lower()
    if not value:
        return None
    if value not in KERNELS:
        raise KernelChoiceError(
            f"{KERNEL_ENV}={os.environ[KERNEL_ENV]!r} is not one of {', '.join(KERNELS)}; "
            f"unset it to let mla_plugin choose (Triton on CUDA, torch elsewhere)"
        )
    return value


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def kernel_for(device: torch.device, dtype: torch.dtype, wanted: str | None = None) -> str:
    """The implementation the seam uses for tensors on ``device`` of ``dtype``.

    ``wanted`` (a caller's explicit choice) wins over MLA_PLUGIN_KERNEL; either is
    checked against what can run here. float64 runs the torch code unless Triton is
    asked for explicitly, which is then an error (the kernels compute in float32).
    """
    if wanted is not None and wanted not in KERNELS:
        raise KernelChoiceError(f"kernel={wanted!r} is not one of {', '.join(KERNELS)}")
    wanted = wanted or requested_kernel()
    if wanted is None:
        return "triton" if device.type == "cuda" and dtype != torch.float64 and triton_importable() else "torch"
    if wanted == "torch":
        return "torch"
    if not triton_importable():
        raise KernelChoiceError(f"{KERNEL_ENV}=triton but the 'triton' package is not installed; "
                                f"pip install triton, or set {KERNEL_ENV}=torch")
    if dtype == torch.float64:
        raise KernelChoiceError(f"{KERNEL_ENV}=triton: the Triton kernels compute in float32 and take "
                                "float32/bfloat16/float16 inputs, not float64; use the torch kernel for float64")
    if device.type == "cpu" and not interpreting():
        raise KernelChoiceError(
            f"{KERNEL_ENV}=triton on CPU tensors needs Triton's interpreter: start the process with "
            f"TRITON_INTERPRET=1 (slow; for tests), or set {KERNEL_ENV}=torch"
        )
    return "triton"
