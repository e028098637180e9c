"""The plugin in an SGLang whose internals moved: one warning, and a refusal for our backends only.

SGLang's ``load_plugins()`` does not catch a plugin's errors: a register() that raised would
stop every launch. So when a touch point moved (touch_points.py), registration.register()
calls ``register_refusal`` instead of installing anything of the plugin's own: one warning
naming the versions tested, our names among ``--attention-backend``'s choices and, where
SGLang's hook registry and its request check are still in place, an AFTER hook of
``ServerArgs.check_server_args`` (the launcher) that fails a launch asking for one of our backends, or loading a checkpoint that declares a sharded latent or the
converted architecture, with ``IncompatibleSGLangError`` in one line. Nothing else in SGLang
changes. Nothing here imports compat.py (its imports may be what moved).
"""

import json
import logging
from pathlib import Path

from mla_plugin.sglang import touch_points
from mla_plugin.sglang.backend_names import OUR_BACKENDS, requested_in

logger = logging.getLogger("sglang.mla_plugin")

REQUEST_CHECK = "sglang.srt.server_args.ServerArgs.check_server_args"
_line: list[str] = []  # the refusal of this process (set once)


def _local_config(model_path) -> dict:
    """A local checkpoint's config.json ({} when there is none to read)."""
    try:
        config = json.loads((Path(str(model_path)).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def asks_for_plugin(server_args) -> bool:
    """A launch only the plugin serves: one of our backends named, or one of our checkpoints."""
    from mla_plugin.checkpoint_format import CONVERTED_ARCHITECTURE
    from mla_plugin.gla_options import CONFIG_KEY

    if requested_in(server_args):
        return True
    config = _local_config(getattr(server_args, "model_path", None))
    return isinstance(config.get(CONFIG_KEY), dict) or CONVERTED_ARCHITECTURE in (config.get("architectures") or ())


def refuse_our_requests(result, server_args, *args, **kwargs):
    """AFTER hook of ``ServerArgs.check_server_args`` in an incompatible SGLang."""
    if _line and asks_for_plugin(server_args):
        raise touch_points.IncompatibleSGLangError(_line[0])
    return result


def _intact(*names: str) -> bool:
    points = {p.name: p for p in touch_points.TOUCH_POINTS}
    return not any(touch_points.problems(points[n]) for n in names)


def _install() -> None:
    if _intact("CLI choices"):  # the flag parses, so the launch reaches the refusal below
        choices = touch_points.resolve("sglang.srt.arg_groups.choices:ATTENTION_BACKEND_CHOICES")
        choices.extend(name for name in sorted(OUR_BACKENDS) if name not in choices)
    if _intact("hooks", "hook types", "request check"):
        hook_registry = touch_points.resolve("sglang.srt.plugins.hook_registry:HookRegistry")
        hook_type = touch_points.resolve("sglang.srt.plugins.hook_registry:HookType")
        hook_registry.register(REQUEST_CHECK, refuse_our_requests, hook_type.AFTER)


def register_refusal(moved: list) -> None:
    """Degraded registration; never raises."""
    if _line:
        return
    _line.append(touch_points.incompatible_line(moved))
    logger.warning("%s Other models are served as without the plugin.", _line[0])
    try:
        _install()
    except Exception as exc:  # noqa: BLE001 - registration must not stop an unrelated launch
        logger.debug("mla_plugin: no refusal hook (%s: %s)", type(exc).__name__, exc)
