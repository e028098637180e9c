"""The sharded-latent (GLA-style) TP variant: its option vocabularies, the options as they
travel in the model config, and the one immutable plan both the layer and the impl read.

Framework-neutral: no vLLM, no torch. vLLM's integration (``mla_plugin.vllm``) and any
other one build a :class:`ShardingPlan` with :func:`plan_for` and share it.

Given with ``--hf-overrides '{"mla_plugin": {...}}'`` (or written into config.json by
``mla-plugin convert mla-to-gla``):

    shards       g, the number of latent slices (default: the TP size n_TP). Each TP rank
                 caches g_loc = g / n_TP slices: d_loc + d_R values per token per layer.
    softmax      "exact" (default): partial logits summed across slices before one softmax;
                   equals MLA (one extra all-reduce of H x T logits per layer at TP > 1).
                 "partitioned": every slice runs its own softmax over all heads; slice
                   outputs are summed (TPLA-style; approximate; no extra communication).
                 "grouped": head group j reads only slice j (GLA; the naive way to load an
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
    latent_projection  true: a grouped checkpoint (layout sharded_latent, global RMSNorm)
                 whose group r caches its own projection z^(r) = B_r ĉ of the normalised
                 latent (tensor ``self_attn.latent_projection.weight`` = [B_0; …; B_{g−1}],
                 [d_c, d_c]); written by ``convert mla-to-gla --basis group-pca``.
    converted_with  written by `mla-plugin convert mla-to-gla` (the basis and scale it
                 folded in, and any calibration: text, tokens, fitted mean scales);
                 informational.

The same entry may also carry checkpoint-format keys (checkpoint_format.py), validated there.

Names (docs/design.md, Glossary): d_c (``latent_dim``) is the whole latent width,
kv_lora_rank in the checkpoint; d_s = d_c / g (``shard_dim``) one slice, slices numbered
j = 0 … g−1; d_loc (``local_latent_dim``) = d_s · g / n_TP the part one rank caches.
"""

from dataclasses import asdict, dataclass

CONFIG_KEY = "mla_plugin"

# The option vocabularies, defined here only (the ops, the converter and the CLI use these).
SOFTMAX_MODES = ("exact", "partitioned", "grouped")
RMSNORM_MODES = ("global", "local")
BASES = ("identity", "hadamard", "pca")  # what the runtime can apply at load time
# Converter only, both need calibration text: pca-act (an orthogonal basis from the latent's activations) and
# group-pca (grouped softmax: one projection per head group, written as the latent_projection tensor).
CONVERTER_BASES = BASES + ("pca-act", "group-pca")
LAYOUTS = ("mla", "sharded_latent")


@dataclass(frozen=True)
class ShardedLatentOptions:
    """The validated ``mla_plugin`` entry of a model config, as the user wrote it."""

    shards: int | None = None
    softmax: str = "exact"
    rmsnorm: str = "global"
    basis: str = "identity"
    logit_scale: float | str = "auto"
    layout: str = "mla"
    latent_projection: bool = False  # a per-group latent projection P = [B_0; …] in the checkpoint
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
            ("rmsnorm", self.rmsnorm, RMSNORM_MODES),
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
        if not isinstance(self.latent_projection, bool):
            raise ValueError(f"{CONFIG_KEY}.latent_projection must be true or false, got {self.latent_projection!r}")
        if self.latent_projection and (self.softmax, self.rmsnorm, self.layout) != (
                "grouped", "global", "sharded_latent"):
            raise ValueError(f"{CONFIG_KEY}.latent_projection needs softmax 'grouped', rmsnorm 'global' and "
                             "layout 'sharded_latent' (a checkpoint written by mla-plugin convert mla-to-gla "
                             "--softmax grouped --basis group-pca)")
        if self.layout == "sharded_latent" and self.basis != "identity":
            raise ValueError(f"{CONFIG_KEY}: a 'sharded_latent' checkpoint has its basis applied already; "
                             "basis must be 'identity'")

    def resolve(self, *, latent_dim: int, num_heads: int, tp_size: int, tp_rank: int = 0) -> "ShardingPlan":
        """Check the options against the model and the TP layout; fix g and the scale."""
        g = self.shards or tp_size
        if latent_dim % g:
            raise ValueError(f"kv_lora_rank {latent_dim} is not divisible by {CONFIG_KEY}.shards={g}")
        if g % tp_size:
            raise ValueError(f"{CONFIG_KEY}.shards={g} must be a multiple of the TP size {tp_size} "
                             "(each rank holds shards / tp latent slices)")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside 0..{tp_size - 1} (TP size {tp_size})")
        if self.softmax == "grouped" and num_heads % g:
            raise ValueError(f"grouped softmax needs the {num_heads} heads divisible by shards={g}")
        if self.softmax == "grouped" and tp_size > 1 and self.basis == "pca":
            raise ValueError(f"{CONFIG_KEY}: grouped softmax at TP {tp_size} splits the heads over the ranks, "
                             "and the 'pca' basis is computed from all heads' weights at load; fold it into "
                             "the checkpoint with `mla-plugin convert mla-to-gla --softmax grouped --basis pca` "
                             "and serve that, or use basis 'identity' or 'hadamard'")
        if self.logit_scale == "auto":
            scale = float(g) if self.softmax == "partitioned" else 1.0
        else:
            scale = float(self.logit_scale)
        if self.softmax == "exact":
            scale = 1.0
        return ShardingPlan(options=self, latent_dim=latent_dim, num_heads=num_heads, shards=g,
                            tp_size=tp_size, tp_rank=tp_rank, logit_scale=scale)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardingPlan:
    """How one TP rank holds and attends over the sharded latent; immutable, built once.

    The layer (cache writes, weight folding) and the attention impl read the same object.

    Grouped softmax splits the heads with the latent (``heads_split``): a rank holds only the
    heads of its g_loc groups and their slices, a whole grouped model of its own (docs/design.md,
    section 4). Exact and partitioned keep all H heads on every rank.
    """

    options: ShardedLatentOptions
    latent_dim: int  # d_c, the whole latent (kv_lora_rank in the checkpoint)
    num_heads: int  # H, all heads of the model
    shards: int  # g, latent slices in all
    tp_size: int
    tp_rank: int
    logit_scale: float  # λ for every (head, slice); 1 for exact

    @property
    def softmax(self) -> str:
        return self.options.softmax

    @property
    def rmsnorm(self) -> str:
        return self.options.rmsnorm

    @property
    def basis(self) -> str:
        return self.options.basis

    @property
    def latent_projection(self) -> bool:
        """True when the checkpoint carries the per-group projection P (cache z = P ĉ, not ĉ)."""
        return self.options.latent_projection

    @property
    def heads_split(self) -> bool:
        """True when a rank holds only its groups' heads (grouped softmax), not all H."""
        return self.softmax == "grouped"

    @property
    def local_heads(self) -> int:
        """Heads this rank computes: H / n_TP when the heads are split, else H."""
        return self.num_heads // self.tp_size if self.heads_split else self.num_heads

    @property
    def head_offset(self) -> int:
        """This rank's first (global) head."""
        return self.tp_rank * self.local_heads if self.heads_split else 0

    @property
    def up_projection_columns(self) -> slice:
        """The columns of kv_b_proj [.., d_c] this rank loads: only its slices when the heads are
        split and no basis rotation mixes the columns at load, else all d_c."""
        if self.heads_split and self.basis == "identity":
            return self.local_columns
        return slice(0, self.latent_dim)

    @property
    def shard_dim(self) -> int:
        """d_s = d_c / g, the width of one slice."""
        return self.latent_dim // self.shards

    @property
    def shards_local(self) -> int:
        """Slices this rank holds: g_loc = g / n_TP."""
        return self.shards // self.tp_size

    @property
    def shard_offset(self) -> int:
        """The first global slice on this rank."""
        return self.tp_rank * self.shards_local

    @property
    def local_latent_dim(self) -> int:
        """Latent values this rank caches per token (without the rope key): d_loc = d_s · g_loc."""
        return self.shard_dim * self.shards_local

    @property
    def local_columns(self) -> slice:
        """This rank's columns of the (rotated, normalised) latent [..., d_c]."""
        start = self.shard_offset * self.shard_dim
        return slice(start, start + self.local_latent_dim)


def plan_for(hf_config, *, tp_size: int, tp_rank: int = 0) -> ShardingPlan:
    """The validated plan of a DeepSeek-V2/V3-style config for one rank (clear errors).

    Either query projection (:func:`query_projection_of`) is fine: in grouped mode the per-head
    query rows are split by heads (the frameworks' column-parallel layer, like q_proj), and
    nothing else of the query is."""
    query_projection_of(hf_config)  # validates q_lora_rank
    options = ShardedLatentOptions.from_config(getattr(hf_config, CONFIG_KEY, None))
    return options.resolve(latent_dim=hf_config.kv_lora_rank, num_heads=hf_config.num_attention_heads,
                           tp_size=tp_size, tp_rank=tp_rank)


@dataclass(frozen=True)
class QueryProjection:
    """How a DeepSeek-V2-style attention layer projects the query, in checkpoint names.

    Full rank (``q_lora_rank`` null; V2-Lite):        q = W_Q x                  ``q_proj``
    Low rank (``q_lora_rank`` = d_q; V2, V3/R1, Kimi-K2):
                                                      q = W_UQ rmsnorm(W_DQ x)   ``q_a_proj`` [d_q, d_model],
                                                      ``q_a_layernorm`` [d_q], ``q_b_proj`` [H (d_nope + d_R), d_q]

    For the sharded latent the low-rank query is q_proj with a replicated front: the per-head
    rows (``per_head_weight``) are what a rank splits by heads in grouped mode and holds whole
    otherwise; W_DQ and its norm are whole on every rank, like W_DKV. Frameworks may fuse W_DQ with
    kv_a_proj_with_mqa (vLLM: ``fused_qkv_a_proj``, rows [q_a_proj; kv_a_proj_with_mqa]).
    Framework-neutral: names and sizes only.
    """

    low_rank: int | None  # d_q = q_lora_rank; None for a full-rank W_Q

    @property
    def is_low_rank(self) -> bool:
        return self.low_rank is not None

    @property
    def per_head_weight(self) -> str:
        """The checkpoint module whose rows are per-head queries [H (d_nope + d_R), ·]."""
        return "q_b_proj" if self.is_low_rank else "q_proj"

    def per_head_input_dim(self, hidden_size: int) -> int:
        """The input width of ``per_head_weight``: d_q when low rank, else d_model."""
        return self.low_rank if self.is_low_rank else hidden_size


def query_projection_of(hf_config) -> QueryProjection:
    """The query projection of a DeepSeek-V2/V3-style config (``q_lora_rank``: null or a positive int)."""
    rank = getattr(hf_config, "q_lora_rank", None)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"q_lora_rank must be null or a positive integer, got {rank!r}")
    return QueryProjection(low_rank=rank)
