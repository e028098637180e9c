"""The plugin in a vLLM whose internals moved: one warning, and refusals for our backends only.

vLLM does not catch a plugin's errors: a register() that raised would stop every vLLM launch
in the environment, whatever model it serves. So when a touch point checked at registration
moved (touch_points.py), registration.register() calls ``register_refusals`` instead of
installing anything of the plugin's own: it logs one warning naming the versions tested and,
as far as the touch points they need are still there,

- adds MLA_PLUGIN and MLA_PLUGIN_GLA to vLLM's backend names, each with a class path that
  raises the one-line ``IncompatibleVLLMError`` when vLLM loads it (so the flag parses and
  fails with our message instead of "unknown backend");
- wraps the platform's config check so that a request for one of our backends, or a
  checkpoint declaring a sharded latent or a converted format, fails there, in one line.

Nothing else in vLLM changes. Nothing here imports compat.py (its imports may be what moved).
"""

import logging

from mla_plugin import BACKEND_NAMES
from mla_plugin.vllm import touch_points

logger = logging.getLogger("vllm.mla_plugin")

REFUSED_BACKEND_PATH = f"{__name__}.RefusedBackend"
_REFUSAL_MARK = "_mla_plugin_refusing"


def __getattr__(name: str):
    """``RefusedBackend`` (the class path our backend names point to here) is the refusal."""
    if name == "RefusedBackend":
        touch_points.require_compatible()
        raise touch_points.IncompatibleVLLMError(touch_points.incompatible_line([]))  # nothing moved now
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _intact(*names: str) -> bool:
    points = {p.name: p for p in touch_points.TOUCH_POINTS}
    return not any(touch_points.problems(points[n]) for n in names)


def asks_for_plugin(vllm_config) -> bool:
    """The config asks for one of our backends, or declares a layout only the plugin serves."""
    from mla_plugin.vllm.declared_backend import declared_backend

    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if getattr(backend, "name", None) in BACKEND_NAMES:
        return True
    model_config = getattr(vllm_config, "model_config", None)
    return declared_backend(getattr(model_config, "hf_config", None)) is not None


def _register_names() -> None:
    registry = touch_points.resolve("vllm.v1.attention.backends.registry:AttentionBackendEnum")
    register_backend = touch_points.resolve("vllm.v1.attention.backends.registry:register_backend")
    for name in BACKEND_NAMES:
        if name not in registry._member_map_:
            register_backend(name, REFUSED_BACKEND_PATH)


def _wrap_config_check(moved: list) -> None:
    platform_cls = type(touch_points.resolve("vllm.platforms:current_platform"))
    if platform_cls.__dict__.get(_REFUSAL_MARK):
        return
    original_check = platform_cls.check_and_update_config.__func__
    line = touch_points.incompatible_line(moved)

    def check_and_update_config(cls, vllm_config):
        if asks_for_plugin(vllm_config):
            raise touch_points.IncompatibleVLLMError(line)
        return original_check(cls, vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    setattr(platform_cls, _REFUSAL_MARK, True)


def register_refusals(moved: list) -> None:
    """Degraded registration; never raises (each step runs only where its touch points are intact)."""
    if not getattr(register_refusals, "_warned", False):
        register_refusals._warned = True
        logger.warning("%s Other models are served as without the plugin.", touch_points.incompatible_line(moved))
    steps = ((_register_names, ("backend enum", "register_backend")),
             (lambda: _wrap_config_check(moved), ("current platform", "config check", "vllm config",
                                                  "attention config")))
    for step, needs in steps:
        try:
            if _intact(*needs):
                step()
        except Exception as exc:  # noqa: BLE001 - registration must not stop an unrelated launch
            logger.debug("mla_plugin: skipped a refusal hook (%s: %s)", type(exc).__name__, exc)
