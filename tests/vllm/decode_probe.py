"""Probe our decode from outside, in whichever process runs it (tests only).

Wraps ``forward_mqa`` (the MLA decode path) of both our impls (``MLAPluginImpl``,
``ShardedLatentImpl``) and, as a control, of vLLM's CPU_MLA impl, without touching the
backend modules:

- counts the decode query rows it is given, per backend: decode-scored perplexity must
  send every scored token of every layer through it (rows = tokens x layers);
- optionally breaks it on purpose: the query is multiplied by ``factor`` before the
  attention, i.e. the decode runs with a wrong softmax scale (factor x the right one).

In this process (an in-process engine): ``with probe_decode() as probe: ...``.
In engine processes the tests cannot reach (spawned TP workers): set
``MLA_PLUGIN_SCORING_HOOK=tests.vllm.decode_probe:install_from_env`` (run by the
reference-token logits processor in each engine process) and ``DECODE_ROWS_DIR_ENV`` to a
folder; each process then keeps ``<pid>.json`` there, ``{backend: rows}``, up to date.
"""

import contextlib
import functools
import json
import os
from pathlib import Path

DECODE_ROWS_DIR_ENV = "MLA_PLUGIN_TEST_DECODE_ROWS_DIR"
SCORING_HOOK = "tests.vllm.decode_probe:install_from_env"


class DecodeProbe:
    def __init__(self, rows_dir: Path | None = None) -> None:
        self.rows: dict[str, int] = {}  # backend name -> decode query rows seen
        self.factor: float | None = None  # multiply the decode's query by this (break it)
        self.rows_dir = rows_dir

    def wrap(self, original, backend: str):
        probe = self

        @functools.wraps(original)
        def forward_mqa(impl, q, kv_cache, attn_metadata, layer):
            first = q[0] if isinstance(q, tuple) else q  # [rows, H, ...]
            probe.rows[backend] = probe.rows.get(backend, 0) + first.shape[0]
            if probe.rows_dir is not None:
                probe._write()
            if probe.factor is not None:
                q = tuple(x * probe.factor for x in q) if isinstance(q, tuple) else q * probe.factor
            return original(impl, q, kv_cache, attn_metadata, layer)

        return forward_mqa

    def _write(self) -> None:
        path = self.rows_dir / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows))
        os.replace(tmp, path)


def _impl_classes() -> dict[str, type]:
    """backend name -> the impl class whose forward_mqa is that backend's decode."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from mla_plugin import GLA_BACKEND_NAME, MLA_BACKEND_NAME
    from mla_plugin.vllm.gla_backend import ShardedLatentImpl
    from mla_plugin.vllm.mla_backend import MLAPluginImpl

    impls = {MLA_BACKEND_NAME: MLAPluginImpl, GLA_BACKEND_NAME: ShardedLatentImpl}
    if current_platform.is_cpu():
        impls["CPU_MLA"] = AttentionBackendEnum["CPU_MLA"].get_class().get_impl_cls()
    return impls


@contextlib.contextmanager
def probe_decode():
    """Count (and, with ``probe.factor = x``, break) our decode in this process."""
    probe = DecodeProbe()
    impls = _impl_classes()
    originals = {name: vars(cls)["forward_mqa"] for name, cls in impls.items()}
    try:
        for name, cls in impls.items():
            cls.forward_mqa = probe.wrap(originals[name], name)
        yield probe
    finally:
        for name, cls in impls.items():
            cls.forward_mqa = originals[name]


def install_from_env() -> None:
    """The scoring hook: probe this engine process's decode for the rest of its life."""
    rows_dir = Path(os.environ[DECODE_ROWS_DIR_ENV])
    probe = DecodeProbe(rows_dir)
    for name, cls in _impl_classes().items():
        cls.forward_mqa = probe.wrap(vars(cls)["forward_mqa"], name)


def rows_by_process(rows_dir: Path) -> dict[str, dict[str, int]]:
    """pid -> {backend: rows} from the files install_from_env keeps."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(rows_dir).glob("*.json"))}
