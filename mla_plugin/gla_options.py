"""Options of the sharded-latent (GLA-style) TP variant, as they travel in the model config.

Given with ``--hf-overrides '{"mla_plugin": {...}}'`` (or written into config.json by
``mla-plugin convert mla-to-gla``):

    shards       g, the number of latent slices (default: the TP size). Each TP rank
                 caches g / tp slices: d_c * (g / tp) / g + d_R values per token per layer.
    softmax      "exact" (default): partial logits summed across slices before one softmax;
                   equals MLA (one extra all-reduce of H x T logits per layer at TP > 1).
                 "partitioned": every slice runs its own softmax over all heads; slice
                   outputs are summed (TPLA-style; approximate; no extra communication).
                 "grouped": head group r reads only slice r (GLA; the naive way to load an
                   MLA checkpoint as GLA).
    rmsnorm      "global" (default, exact: RMS over all d_c) or "local" (per slice, as a
                 model trained as GLA normalises).
    basis        "identity" (default), "hadamard" or "pca" (from the weights): the orthogonal
                 basis the latent is rotated into before slicing (exact before slicing).
    logit_scale  multiplier on each slice's partial latent logit in partitioned/grouped
                 mode: a number, or "auto" (default: g for partitioned, 1 for grouped).
                 Ignored by exact. Folded into the query weights at load time.
    layout       "mla" (default): an ordinary DeepSeek-V2 checkpoint; the norm weight,
                 basis and scales are applied at load time. "sharded_latent": a converted
                 checkpoint that already has them folded in (basis must be "identity").
    converted_with  written by `mla-plugin convert mla-to-gla` (the basis and scale it
                 folded in, and any calibration: text, tokens, fitted mean scales);
                 informational.

The same entry may also carry checkpoint-format keys (checkpoint_format.py), validated there.
"""

from dataclasses import asdict, dataclass

CONFIG_KEY = "mla_plugin"
SOFTMAX_MODES = ("exact", "partitioned", "grouped")
NORM_MODES = ("global", "local")
BASES = ("identity", "hadamard", "pca")
LAYOUTS = ("mla", "sharded_latent")


@dataclass(frozen=True)
class ShardedLatentOptions:
    shards: int | None = None
    softmax: str = "exact"
    rmsnorm: str = "global"
    basis: str = "identity"
    logit_scale: float | str = "auto"
    layout: str = "mla"
    converted_with: dict | None = None  # written by the converter; informational only

    @classmethod
    def from_config(cls, raw) -> "ShardedLatentOptions":
        """Validate the ``mla_plugin`` entry of a model config (dict or None)."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"{CONFIG_KEY} options must be a JSON object, got {type(raw).__name__}")
        from mla_plugin.checkpoint_format import FORMAT_KEYS

        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known - set(FORMAT_KEYS))
        if unknown:
            raise ValueError(f"unknown {CONFIG_KEY} option(s) {unknown}; valid: {sorted(known | set(FORMAT_KEYS))}")
        opts = cls(**{k: v for k, v in raw.items() if k in known})
        opts._check()
        return opts

    def _check(self) -> None:
        for name, value, valid in (
            ("softmax", self.softmax, SOFTMAX_MODES),
            ("rmsnorm", self.rmsnorm, NORM_MODES),
            ("basis", self.basis, BASES),
            ("layout", self.layout, LAYOUTS),
        ):
            if value not in valid:
                raise ValueError(f"{CONFIG_KEY}.{name} must be one of {list(valid)}, got {value!r}")
        if self.shards is not None and (not isinstance(self.shards, int) or isinstance(self.shards, bool)
                                        or self.shards < 1):
            raise ValueError(f"{CONFIG_KEY}.shards must be a positive integer, got {self.shards!r}")
        if isinstance(self.logit_scale, str):
            if self.logit_scale != "auto":
                raise ValueError(f"{CONFIG_KEY}.logit_scale must be a number or 'auto', got {self.logit_scale!r}")
        elif not isinstance(self.logit_scale, (int, float)) or isinstance(self.logit_scale, bool) \
                or not self.logit_scale > 0:
            raise ValueError(f"{CONFIG_KEY}.logit_scale must be a positive number, got {self.logit_scale!r}")
        if self.converted_with is not None and not isinstance(self.converted_with, dict):
            raise ValueError(f"{CONFIG_KEY}.converted_with must be an object")
        if self.layout == "sharded_latent" and self.basis != "identity":
            raise ValueError(f"{CONFIG_KEY}: a 'sharded_latent' checkpoint has its basis applied already; "
                             "basis must be 'identity'")

    def resolve(self, *, tp_size: int, kv_lora_rank: int, num_heads: int) -> "ResolvedSharding":
        """Check the options against the model and the TP size; fix g and the scale."""
        g = self.shards or tp_size
        if kv_lora_rank % g:
            raise ValueError(f"kv_lora_rank {kv_lora_rank} is not divisible by {CONFIG_KEY}.shards={g}")
        if g % tp_size:
            raise ValueError(f"{CONFIG_KEY}.shards={g} must be a multiple of the TP size {tp_size} "
                             "(each rank holds shards / tp latent slices)")
        if self.softmax == "grouped" and num_heads % g:
            raise ValueError(f"grouped softmax needs the {num_heads} heads divisible by shards={g}")
        if self.logit_scale == "auto":
            scale = float(g) if self.softmax == "partitioned" else 1.0
        else:
            scale = float(self.logit_scale)
        if self.softmax == "exact":
            scale = 1.0
        return ResolvedSharding(options=self, shards=g, tp_size=tp_size, logit_scale=scale,
                                shard_width=kv_lora_rank // g, shards_per_rank=g // tp_size)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedSharding:
    options: ShardedLatentOptions
    shards: int  # g
    tp_size: int
    logit_scale: float  # λ for every (head, shard); 1 for exact
    shard_width: int  # d_c / g
    shards_per_rank: int  # g / tp

    def local_width(self) -> int:
        """Latent values this rank caches per token (without the rope key)."""
        return self.shard_width * self.shards_per_rank

    def shard_offset(self, tp_rank: int) -> int:
        return tp_rank * self.shards_per_rank


def sharding_for(hf_config, tp_size: int) -> ResolvedSharding:
    """Validated sharding of a DeepSeek-V2-style config at this TP size (clear errors)."""
    if getattr(hf_config, "q_lora_rank", None) is not None:
        raise NotImplementedError(
            "the sharded-latent variant supports checkpoints with q_lora_rank = null "
            f"(DeepSeek-V2-Lite style) so far; this one has q_lora_rank = {hf_config.q_lora_rank}."
        )
    options = ShardedLatentOptions.from_config(getattr(hf_config, CONFIG_KEY, None))
    return options.resolve(tp_size=tp_size, kv_lora_rank=hf_config.kv_lora_rank,
                           num_heads=hf_config.num_attention_heads)
