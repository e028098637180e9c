"""What ran, recorded across processes: evidence for tests (and users) that our code, not a
framework's, did the work. Framework-neutral; the backends and the ops seam write here.

- ``TRACE_ENV`` names a file that each process running one of our backends appends one
  line to, on its first call (vllm/mla_backend.py, sglang/mla_backend.py).
- ``KERNEL_TRACE_ENV`` names a file that each process appends one line to per
  implementation of the attention seam it ran, after that implementation's kernels were
  launched (``kernel_choice.note_kernel_ran``): ``kernel-ran <torch|triton> pid=<pid>``.
- ``ROWS_TRACE_ENV`` names a file that each vLLM process appends a line to on its first
  decode with several query rows per request (a speculative verify step) and on its first
  prefill that reads cached context (vllm/mla_backend.note_query_rows).
"""

import os

TRACE_ENV = "MLA_PLUGIN_TRACE_FILE"
KERNEL_TRACE_ENV = "MLA_PLUGIN_KERNEL_TRACE_FILE"
ROWS_TRACE_ENV = "MLA_PLUGIN_ROWS_TRACE_FILE"


def append_trace(env: str, line: str) -> None:
    """Append ``line`` to the file the environment variable ``env`` names (nothing when unset)."""
    path = os.environ.get(env)
    if path:
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
