"""Every SGLang internal the plugin relies on, in one list, each with a check.

``moved()`` runs at plugin registration (in every SGLang process that loads plugins). An
SGLang where one moved still serves every other model (registration.py: one warning); a
request for our backends there fails in one line (``incompatible_line``, naming the versions
tested), and ``verify()`` gives the multi-line detail, instead of an AttributeError deep
inside a forward pass. Internals are named
``"module.path:Attribute.sub"``; ``compat.py`` is the only module with ``from sglang ...
import`` statements and a test checks that each of its names is listed here. The README
table "How the plugin reaches into SGLang" is ``readme_table()``; a test keeps them equal.
"""

from dataclasses import dataclass
from importlib import metadata

from mla_plugin import touch_point_checks
from mla_plugin.touch_point_checks import (
    Check,
    all_of,
    exists,
    is_a,
    source_mentions,
    takes,
)

resolve = touch_point_checks.resolve  # "module.path:Attribute.sub" -> object; callers use it from here

SUPPORTED_SGLANG = ("0.5.23",)


class SGLangTouchPointError(RuntimeError):
    """SGLang no longer has an internal the plugin relies on, or it changed shape."""


@dataclass(frozen=True)
class TouchPoint:
    name: str  # short id, also the README row
    internal: str  # "module.path:Attribute.sub" in SGLang
    use: str  # what the plugin does with it
    check: Check  # problems with the resolved object ([] when it is as expected)


def has(*attributes: str) -> Check:
    """Attributes found by plain ``hasattr`` (the vLLM list's ``has`` is a static lookup)."""
    return touch_point_checks.has(*attributes, static=False)


_REGISTRY = "sglang.srt.layers.attention.attention_registry"
_DEEPSEEK = "sglang.srt.models.deepseek_common"
_POOL = "sglang.srt.mem_cache.memory_pool"

TOUCH_POINTS: tuple[TouchPoint, ...] = (
    TouchPoint("backend registry", f"{_REGISTRY}:register_attention_backend",
               "registers the `mla_plugin` factory (runner -> backend)", takes("name")),
    TouchPoint("backend table", f"{_REGISTRY}:ATTENTION_BACKENDS",
               "checked for our name (registration is idempotent)", is_a(dict)),
    TouchPoint("CLI choices", "sglang.srt.arg_groups.choices:ATTENTION_BACKEND_CHOICES",
               "`mla_plugin` added as an --attention-backend choice", is_a(list)),
    TouchPoint("DeepSeek handler", f"{_DEEPSEEK}.attention_backend_handler:AttentionBackendRegistry",
               "registers our handler: DeepSeek attention takes the absorbed MLA path",
               has("register", "get_handler")),
    TouchPoint("MLA forward method", f"{_DEEPSEEK}.attention_forward_methods.forward_methods:AttnForwardMethod",
               "our handler returns AttnForwardMethod.MLA", has("MLA")),
    TouchPoint("absorbed call", f"{_DEEPSEEK}.attention_forward_methods.forward_mla:DeepseekMLAForwardMixin",
               "the absorbed path hands the backend q = [q̃ | q^R], k = [ĉ | k^R], v = ĉ",
               source_mentions("torch.cat([q_nope_out, q_pe], dim=-1)", "torch.cat([k_nope, k_pe], dim=-1)")),
    TouchPoint("backend interface", "sglang.srt.layers.attention.base_attn_backend:AttentionBackend",
               "our backend's base: init_forward_metadata, forward_extend, forward_decode; graphs: "
               "init_cuda_graph_state, init_forward_metadata_out_graph (static buffers filled in place), _in_graph",
               has("init_forward_metadata", "forward_extend", "forward_decode", "init_cuda_graph_state",
                   "init_forward_metadata_out_graph", "init_forward_metadata_in_graph")),
    TouchPoint("CUDA graph runner", "sglang.srt.model_executor.runner.decode_cuda_graph_runner:DecodeCudaGraphRunner",
               "captures decode (or target verify) calling init_cuda_graph_state, out_graph(in_capture=True) and "
               "in_graph; before each replay out_graph on the runner's padded buffers (seq_len 1, slot 0)",
               source_mentions("init_cuda_graph_state(self.max_bs, self.max_num_token)",
                               "init_forward_metadata_out_graph(forward_batch, in_capture=True)",
                               "init_forward_metadata_out_graph(fb_view)")),
    TouchPoint("CPU graph runner", "sglang.srt.model_executor.cpu_graph_runner:CPUGraphRunner",
               "on CPU: init_cpu_graph_state, init_forward_metadata_capture_cpu_graph at capture, replays (padded) "
               "through init_forward_metadata: our decode metadata then fills the same static buffers",
               source_mentions("init_cpu_graph_state(", "init_forward_metadata_capture_cpu_graph(",
                               "get_cpu_graph_seq_len_fill_value()",
                               "attn_backend.init_forward_metadata(captured_forward_batch)")),
    TouchPoint("verify batch", "sglang.srt.speculative.eagle_info:EagleVerifyInput",
               "target verify: spec_info.draft_token_num query rows per request, topk (1: a chain, causal); "
               "the batch's seq_lens exclude the drafts", source_mentions("topk: int", "draft_token_num: int")),
    TouchPoint("speculative config", "sglang.srt.runtime_context:get_spec",
               "at start-up: speculative_eagle_topk (above 1, a tree draft, is refused in one line)", exists()),
    TouchPoint("MLA pool", f"{_POOL}:MLATokenToKVPool",
               "one `[size + page, 1, d_c + d_R]` buffer per layer: written by set_kv_buffer, read as pages",
               all_of(has("set_kv_buffer", "get_key_buffer"), source_mentions("(self.size + self.page_size, 1, self.kv_cache_dim)"))),
    TouchPoint("pool write location", f"{_POOL}:KVWriteLoc.for_batch",
               "the batch's out_cache_loc for set_kv_buffer", takes("forward_batch")),
    TouchPoint("forward batch", "sglang.srt.model_executor.forward_batch_info:ForwardBatch",
               "req_pool_indices, seq_lens(_cpu), extend_seq_lens(_cpu), out_cache_loc, forward_mode",
               source_mentions("req_pool_indices:", "seq_lens_cpu:", "extend_seq_lens_cpu:", "out_cache_loc:")),
    TouchPoint("model runner", "sglang.srt.model_executor.model_runner:ModelRunner",
               "req_to_token_pool, token_to_kv_pool, page_size, use_mla_backend, model_config",
               source_mentions("self.req_to_token_pool", "self.token_to_kv_pool", "self.page_size", "self.use_mla_backend")),
    TouchPoint("hooks", "sglang.srt.plugins.hook_registry:HookRegistry",
               "wraps or replaces the functions and the class below (applied by load_plugins)",
               has("register", "apply_hooks")),
    TouchPoint("hook types", "sglang.srt.plugins.hook_registry:HookType",
               "AROUND (CPU rope, model shapes), AFTER (request check, pool width), BEFORE (declared backend, "
               "ungrouped routing), REPLACE (DeepSeek attention class)", has("AROUND", "AFTER", "BEFORE", "REPLACE")),
    TouchPoint("request check", "sglang.srt.server_args:ServerArgs.check_server_args",
               "after it, in the launcher: a non-MLA model with `mla_plugin` is one error", exists()),
    TouchPoint("CPU rope", "sglang.srt.layers.rotary_embedding.factory:get_rope_cpu",
               "on CPU: plain rope given as DeepSeek-YaRN with factor 1 (the only kind it takes)",
               all_of(takes("rope_scaling"), source_mentions('"deepseek_yarn"'))),
    TouchPoint("CPU op: KV copy", "sglang.kernels.ops.kvcache.cache_move:copy_all_layer_kv_cache_func",
               "on CPU imports `copy_all_layer_kv_cache_cpu` from sgl_kernel: cpu_support supplies it",
               source_mentions("copy_all_layer_kv_cache_cpu(")),
    TouchPoint("CPU op: req_to_token", "sglang.srt.mem_cache.allocation:assign_req_to_token_pool_func",
               "on CPU imports `assign_req_to_token_pool_cpu` from sgl_kernel: cpu_support supplies it",
               source_mentions("assign_req_to_token_pool_cpu(")),
    # mla_plugin_gla, the sharded latent (gla_*.py; SGLang names imported through gla_compat.py)
    TouchPoint("DeepSeek attention class", "sglang.srt.models.deepseek_v2:DeepseekV2AttentionMLA",
               "mla_plugin_gla: replaced (HookRegistry REPLACE) by a subclass that builds the sharded-latent module",
               takes("config", "hidden_size", "num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "q_lora_rank", "kv_lora_rank", "rope_theta", "rope_scaling", "max_position_embeddings",
                     "reduce_results", "layer_id", "prefix")),
    TouchPoint("KV cache configurator", "sglang.srt.mem_cache.kv_cache_configurator:KVCacheConfigurator",
               "mla_plugin_gla: after its __post_init__, its copy of the model config has kv_lora_rank = d_loc",
               all_of(has("__post_init__", "model", "model_config"),
                      source_mentions("kv_lora_rank=self.model_config.kv_lora_rank"))),
    TouchPoint("model shapes", "sglang.srt.configs.model_config:ModelConfig._derive_model_shapes",
               "converted checkpoints: MLAPluginDeepseekV2ForCausalLM derives DeepSeek-V2's shapes; before it, "
               "where the plugin serves the model, DeepSeek's MoE fields transformers 5 does not save are filled and "
               "DeepSeek-V2 \"greedy\" routing saved with n_group null gets one group (1, 1)", exists()),
    TouchPoint("model registry", "sglang.srt.models.registry:ModelRegistry",
               "registers MLAPluginDeepseekV2ForCausalLM (a DeepSeek-V2 model)", has("models", "resolve_model_cls")),
    TouchPoint("declared backend", "sglang.srt.server_args:ServerArgs.resolve_once",
               "before it, in the launcher: a declared sharded latent gets (or insists on) mla_plugin_gla", exists()),
    TouchPoint("TP rank", "sglang.srt.distributed.parallel_state:get_tensor_model_parallel_rank",
               "mla_plugin_gla: which latent slices this rank holds", exists()),
    TouchPoint("column-parallel linear", "sglang.srt.layers.linear:ColumnParallelLinear",
               "mla_plugin_gla, grouped softmax at TP > 1: q_proj (low rank: q_b_proj) split by heads with the latent",
               takes("input_size", "output_size", "bias", "prefix")),
    TouchPoint("row-parallel linear", "sglang.srt.layers.linear:RowParallelLinear",
               "mla_plugin_gla, grouped softmax at TP > 1: o_proj over the rank's heads (reduce_results=False: "
               "the decoder layer's communicator all-reduces)",
               takes("input_size", "output_size", "bias", "input_is_parallel", "reduce_results", "prefix")),
    TouchPoint("TP all-reduce", "sglang.srt.distributed:tensor_model_parallel_all_reduce",
               "mla_plugin_gla, exact softmax: the partial logits summed over the ranks", exists()),
    TouchPoint("DeepSeek rope", "sglang.srt.layers.rotary_embedding.factory:get_rope",
               "mla_plugin_gla: the rope of SGLang's DeepSeek module, through its forward_native",
               takes("rope_scaling", "is_neox_style")),
    TouchPoint("configured backend", "sglang.srt.runtime_context:attention_backends",
               "is one of ours this process's (prefill, decode) backend (mla_plugin_gla's layer; the DeepSeek "
               "config fields)", exists()),
    # the low-rank query (q_lora_rank) in mla_plugin_gla, and DeepSeek-V2/V3 MoE configs
    TouchPoint("replicated linear", "sglang.srt.layers.linear:ReplicatedLinear",
               "mla_plugin_gla: the weights every rank holds whole (fused_qkv_a_proj_with_mqa, kv_a_proj_with_mqa, "
               "kv_b_proj's rank block; q_proj and o_proj unless grouped)",
               takes("input_size", "output_size", "bias", "prefix")),
    TouchPoint("RMSNorm", "sglang.srt.layers.layernorm:RMSNorm",
               "mla_plugin_gla: q_a_layernorm of the low-rank query (called); kv_a_layernorm (its γ, folded)",
               has("forward")),
    TouchPoint("fused q_a/kv_a loading", f"{_DEEPSEEK}.deepseek_weight_loader:DeepseekV2WeightLoaderMixin",
               "mla_plugin_gla, q_lora_rank set: SGLang's loader stacks q_a_proj and kv_a_proj_with_mqa into our "
               "fused_qkv_a_proj_with_mqa ([d_q + d_c + d_R, d_model], rows in that order)",
               source_mentions('"fused_qkv_a_proj_with_mqa"', "[q_a_proj_weight, kv_a_proj_weight]")),
    TouchPoint("decoder layer QKV hook", "sglang.srt.models.deepseek_v2:DeepseekV2DecoderLayer",
               "mla_plugin_gla: the layer is built with our module's prepare_qkv_latent (the fused rows)",
               source_mentions("qkv_latent_func=self.self_attn.prepare_qkv_latent")),
    TouchPoint("DeepSeek MoE config", "sglang.srt.models.deepseek_v2:DeepseekV2MoE",
               "reads scoring_func, n_group, topk_group (and its gate topk_method): filled where transformers 5 "
               "configs lack them, where the plugin serves the model (registration.DEEPSEEK_CONFIG_DEFAULTS, "
               "fill_deepseek_fields)",
               source_mentions("scoring_func=config.scoring_func", "num_expert_group=config.n_group",
                               "topk_group=config.topk_group")),
)


def sglang_version() -> str:
    return metadata.version("sglang")


def problems(point: TouchPoint) -> list[str]:
    """What is wrong with one touch point in the installed SGLang ([] when nothing)."""
    return touch_point_checks.problems(point)


def verify() -> None:
    """Check every touch point; one error naming the SGLang version and what moved."""
    moved = touch_point_checks.moved_lines(TOUCH_POINTS, problems)
    if moved:
        raise SGLangTouchPointError(
            f"mla_plugin cannot run on SGLang {sglang_version()}: {len(moved)} SGLang internal(s) it relies "
            "on moved or changed:\n" + "\n".join(moved) + "\n"
            f"mla_plugin is tested with SGLang {' and '.join(SUPPORTED_SGLANG)}: install it "
            f"(pip install --no-deps sglang=={SUPPORTED_SGLANG[-1]}), or set SGLANG_PLUGINS to leave mla_plugin out."
        )


def moved() -> list[TouchPoint]:
    """The touch points that moved in the installed SGLang."""
    return [p for p in TOUCH_POINTS if problems(p)]


class IncompatibleSGLangError(SGLangTouchPointError):
    """One of our backends (or a converted checkpoint) asked for in an SGLang whose internals moved."""


def incompatible_line(points: list[TouchPoint]) -> str:
    """One line: this SGLang moved what our backends need, the versions tested, and what to do."""
    tested = " and ".join(SUPPORTED_SGLANG)
    return (f"mla_plugin is tested with SGLang {tested}; SGLang {sglang_version()} moved {len(points)} internal(s) "
            f"its attention backends rely on ({', '.join(p.name for p in points)}), so mla_plugin's backends and "
            f"converted checkpoints cannot be served here: install it (pip install --no-deps "
            f"sglang=={SUPPORTED_SGLANG[-1]}), or serve the model without --attention-backend mla_plugin / "
            "mla_plugin_gla.")


def readme_table() -> str:
    """The Markdown table in README.md's "How the plugin reaches into SGLang"."""
    return touch_point_checks.readme_table(TOUCH_POINTS, "SGLang")
