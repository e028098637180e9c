"""How a converted latent checkpoint departs from a stock DeepSeek-V2 one.

`mla-plugin convert gqa-to-mla` writes DeepSeek-V2 checkpoints whose attention differs
in up to four ways, declared under ``"mla_plugin"`` in config.json next to the
sharded-latent options (gla_options.py):

    latent_norm    false: there is no latent RMSNorm (a GQA model never had one). A
                   loader that adds DeepSeek's kv_a_layernorm anyway computes nonsense.
    q_bias         true: q_proj has a bias (Qwen2's attention bias, carried over).
    kv_a_bias      true: kv_a_proj_with_mqa has a bias (Qwen2's k/v biases, projected).
    rope_inv_freq  the rope key's inverse frequencies, one per interleaved pair of
                   qk_rope_head_dim, when they are not DeepSeek's default
                   theta^(-2j / qk_rope_head_dim) (e.g. several kv heads' keys kept
                   under RoPE, or Llama-3 frequency scaling).
    converted_from informational: source architecture and conversion settings.

vLLM with the plugin honours these whatever attention backend serves the model; the
converter also writes ``modeling_mla_plugin.py`` so transformers does with
``trust_remote_code=True``.
"""

from dataclasses import asdict, dataclass

FORMAT_KEYS = ("latent_norm", "q_bias", "kv_a_bias", "rope_inv_freq", "converted_from")


@dataclass(frozen=True)
class LatentCheckpointFormat:
    latent_norm: bool = True
    q_bias: bool = False
    kv_a_bias: bool = False
    rope_inv_freq: tuple[float, ...] | None = None
    converted_from: dict | None = None

    @classmethod
    def from_config(cls, raw, *, rope_dim: int | None = None) -> "LatentCheckpointFormat":
        """Validate the format keys of a config's ``mla_plugin`` entry (dict or None)."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"mla_plugin options must be a JSON object, got {type(raw).__name__}")
        values = {k: raw[k] for k in FORMAT_KEYS if k in raw}
        for key in ("latent_norm", "q_bias", "kv_a_bias"):
            if key in values and not isinstance(values[key], bool):
                raise ValueError(f"mla_plugin.{key} must be true or false, got {values[key]!r}")
        freqs = values.get("rope_inv_freq")
        if freqs is not None:
            if not isinstance(freqs, (list, tuple)) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in freqs):
                raise ValueError("mla_plugin.rope_inv_freq must be a list of positive numbers")
            if rope_dim is not None and len(freqs) * 2 != rope_dim:
                raise ValueError(f"mla_plugin.rope_inv_freq has {len(freqs)} entries; "
                                 f"qk_rope_head_dim {rope_dim} needs {rope_dim // 2}")
            values["rope_inv_freq"] = tuple(float(x) for x in freqs)
        if values.get("converted_from") is not None and not isinstance(values["converted_from"], dict):
            raise ValueError("mla_plugin.converted_from must be an object")
        return cls(**values)

    @property
    def is_stock(self) -> bool:
        """True when a stock DeepSeek-V2 loader computes this checkpoint correctly."""
        return self.latent_norm and not self.q_bias and not self.kv_a_bias and self.rope_inv_freq is None

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["rope_inv_freq"] is not None:
            out["rope_inv_freq"] = list(out["rope_inv_freq"])
        return {k: v for k, v in out.items() if v is not None}


def format_of(hf_config) -> LatentCheckpointFormat:
    """The checkpoint format declared by a loaded (transformers) config object."""
    raw = getattr(hf_config, "mla_plugin", None)
    return LatentCheckpointFormat.from_config(raw, rope_dim=getattr(hf_config, "qk_rope_head_dim", None))


# -- what a converted checkpoint declares itself as ---------------------------------------
#
# A checkpoint whose weights mean anything other than an ordinary DeepSeek-V2 (a gqa-to-mla
# output with the format keys above; an mla-to-gla output with partitioned or grouped
# softmax, or the local RMSNorm) is declared as CONVERTED_ARCHITECTURE: an architecture that
# only this plugin registers with vLLM (mla_plugin.vllm.model_registry), so vLLM without the
# plugin refuses it instead of serving another model, and transformers loads it through
# the modeling file written beside the weights (trust_remote_code=True). model_type stays
# "deepseek_v2" (vLLM recognises MLA by it). Exact conversions keep DeepseekV2ForCausalLM.

STOCK_ARCHITECTURE = "DeepseekV2ForCausalLM"
CONVERTED_ARCHITECTURE = "MLAPluginDeepseekV2ForCausalLM"
REMOTE_CODE_FILE = "modeling_mla_plugin.py"
CONVERTED_AUTO_MAP = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.{CONVERTED_ARCHITECTURE}"}


def sharded_latent_changes_function(raw, *, tp_size: int | None = None) -> bool:
    """True when the ``mla_plugin`` sharded-latent options (a dict, or None) describe attention
    other than MLA: partitioned or grouped softmax, or the per-slice (local) RMSNorm, over more
    than one slice (or a partial-logit scale other than 1 on one slice). ``shards`` unset means
    the TP size; with ``tp_size`` unknown too, any such option counts. A per-group latent projection
    (``latent_projection: true``, gla_options.py) always counts."""
    if not isinstance(raw, dict):
        return False
    if raw.get("latent_projection") is True:
        return True  # per-group latent subspaces: never MLA's function as written
    softmax, rmsnorm = raw.get("softmax", "exact"), raw.get("rmsnorm", "global")
    shards = raw.get("shards") or tp_size
    if shards == 1:
        scale = raw.get("logit_scale", "auto")
        return softmax != "exact" and scale not in ("auto", 1, 1.0)
    return softmax != "exact" or rmsnorm != "global"


def is_ordinary_deepseek_v2(config: dict) -> bool:
    """True when a stock DeepSeek-V2 loader computes this (config.json) checkpoint correctly."""
    raw = config.get("mla_plugin")
    if raw is None:
        return True
    fmt = LatentCheckpointFormat.from_config(raw, rope_dim=config.get("qk_rope_head_dim"))
    return fmt.is_stock and not sharded_latent_changes_function(raw)


def declare_architecture(config: dict) -> bool:
    """Set ``architectures`` (and ``auto_map``) of a converted config.json in place; returns True
    when the checkpoint needs the modeling file (REMOTE_CODE_FILE) written beside it."""
    if is_ordinary_deepseek_v2(config):
        config["architectures"] = [STOCK_ARCHITECTURE]
        config.pop("auto_map", None)
        return False
    config["architectures"] = [CONVERTED_ARCHITECTURE]
    config["auto_map"] = dict(CONVERTED_AUTO_MAP)
    return True


def describe_sharded_latent(raw: dict) -> str:
    """One phrase naming the attention a sharded-latent entry declares (for messages)."""
    return (f"softmax {raw.get('softmax', 'exact')}, rmsnorm {raw.get('rmsnorm', 'global')}, "
            f"{raw.get('shards') or 'TP-size'} latent slices")


def transformers_loading_problem(config: dict) -> str | None:
    """Why transformers' stock DeepseekV2 would compute a different model than this config.json
    declares (None: it would not, or the config names its own modeling code in auto_map)."""
    if "auto_map" in config:
        return None
    try:
        if is_ordinary_deepseek_v2(config):
            return None
    except ValueError as err:
        return f"config.json: {err}"
    return ("config.json declares attention under 'mla_plugin' that transformers' DeepseekV2 does not compute, "
            "and no auto_map to the modeling code that does (written by an older mla-plugin convert); "
            "convert it again with this version (it then carries modeling_mla_plugin.py), or use --engine vllm")
