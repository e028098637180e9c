"""`mla-plugin plan`: what each way of spreading MLA attention over N ranks costs, computed from a
model config with plain arithmetic (no torch, no framework; nothing here is measured).

Modes (N = --tp; docs/design.md section 4 for the sharded latent):

    MLA TP         vLLM's default: heads split over the N ranks, the whole latent [ĉ | k^R] cached
                   on every rank.
    DCP N          vLLM's decode context parallel (--decode-context-parallel-size N over TP N): heads
                   split as in MLA TP for the projections, the cached tokens split over the ranks
                   (each token cached whole on one rank); decode all-gathers the absorbed queries,
                   attends over the rank's tokens, merges by log-sum-exp. Exact.
    DP-attention   SGLang's --enable-dp-attention (dp = tp = N): every rank a whole attention layer
                   for its own requests; a request's cache lives on its rank only.
    exact / partitioned / grouped (g = N)   mla_plugin_gla: each rank caches d_c/N latent dims of
                   every token plus the rope key. exact and partitioned keep all H heads and the
                   query / o_proj weights on every rank, kv_b_proj split by latent columns; grouped
                   splits the heads with the latent (gla_options.ShardingPlan.heads_split).

Per row: cached values per token per rank (one layer; the N ranks' total for one token over N),
tokens of cache per GiB per rank (all layers), attention weights per rank (all layers) and the
collectives one layer runs per decode step, by name, with their sizes in bytes.

Counted as attention weights: the matrices of q_proj (or q_a_proj + q_b_proj), kv_a_proj_with_mqa,
kv_b_proj and o_proj, per layer, times the layers. Not counted: the RMSNorm weights (d_q + d_c per
layer), embeddings, MLP / MoE, an MTP layer.

Bytes of a collective: the size of its whole logical buffer (an all-reduce's buffer, an all-gather's
gathered result, a reduce-scatter's input). On the wire a ring all-reduce moves about 2 (N-1)/N of it
per rank, an all-gather or reduce-scatter (N-1)/N. Activations are bf16 (2 bytes), logits and
log-sum-exps float32 (4 bytes). Only attention's own collectives are listed; the MLP's (the same in
every mode) are not.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mla_plugin.errors import MLAPluginInputError

GIB = 1 << 30
ACTIVATION_BYTES = 2  # bf16 hidden states, queries and attention outputs
FLOAT32_BYTES = 4  # logits and log-sum-exps
CACHE_DTYPES = {"bf16": 2, "fp8": 1}  # bytes per cached value; fp8: e4m3 with one per-layer scale
DEFAULT_TP, DEFAULT_BATCH, DEFAULT_CONTEXT, DEFAULT_CACHE_DTYPE = 8, 64, 8192, "bf16"
FORMATS = ("text", "markdown")
# config.json field -> AttentionShape field; q_lora_rank may be null (a full-rank q_proj)
REQUIRED_FIELDS = {"hidden_size": "hidden", "num_hidden_layers": "layers", "num_attention_heads": "heads",
                   "kv_lora_rank": "latent", "qk_rope_head_dim": "rope", "qk_nope_head_dim": "nope",
                   "v_head_dim": "value"}


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one MLA attention layer (docs/design.md glossary names in comments)."""

    name: str
    hidden: int  # d_model
    layers: int
    heads: int  # H
    latent: int  # d_c = kv_lora_rank
    rope: int  # d_R
    nope: int  # d_nope
    value: int  # d_v
    q_rank: int | None  # d_q = q_lora_rank; None: full-rank q_proj

    def query_weights(self, heads: int) -> int:
        """q_proj [heads (d_nope + d_R), d_model], or q_a_proj [d_q, d_model] (whole on every rank)
        + q_b_proj [heads (d_nope + d_R), d_q]."""
        per_head = self.nope + self.rope
        if self.q_rank is None:
            return heads * per_head * self.hidden
        return self.q_rank * self.hidden + heads * per_head * self.q_rank

    def kv_a_weights(self) -> int:
        """kv_a_proj_with_mqa [d_c + d_R, d_model]: W_DKV and W_KR, whole on every rank in every mode."""
        return (self.latent + self.rope) * self.hidden

    def kv_b_weights(self, heads: int, columns: int) -> int:
        """kv_b_proj rows of ``heads`` heads [heads (d_nope + d_v), columns of d_c]."""
        return heads * (self.nope + self.value) * columns

    def o_weights(self, heads: int) -> int:
        """o_proj [d_model, heads d_v]."""
        return self.hidden * heads * self.value

    def layer_weights(self, heads: int, columns: int) -> int:
        """One layer's projection matrices on a rank holding ``heads`` heads and ``columns`` latent columns."""
        return (self.query_weights(heads) + self.kv_a_weights() + self.kv_b_weights(heads, columns)
                + self.o_weights(heads))


@dataclass(frozen=True)
class Step:
    """One decode step: B requests (over all ranks) decode one token each over C cached tokens."""

    batch: int  # B
    context: int  # C


@dataclass(frozen=True)
class Collective:
    """One collective a layer runs per decode step."""

    name: str
    formula: str  # its size in the symbols of docs/design.md (B, C, H, d_model, ...)
    bytes: int


@dataclass(frozen=True)
class ModeRow:
    """One mode at one TP size; ``impossible`` says why the mode cannot run there (then no figures)."""

    mode: str
    exact: bool
    values_per_token: float = 0.0  # per layer, per rank (the N ranks' total over N)
    weights_per_rank: int = 0  # all layers
    collectives: tuple[Collective, ...] = ()
    impossible: str | None = None

    def tokens_per_gib(self, shape: AttentionShape, cache_bytes: int) -> int:
        """Tokens whose cache (all layers) fits in one GiB on every rank."""
        return math.floor(GIB / (self.values_per_token * cache_bytes * shape.layers))

    @property
    def collective_bytes(self) -> int:
        return sum(c.bytes for c in self.collectives)


def _o_proj_all_reduce(shape: AttentionShape, step: Step) -> Collective:
    """Row-parallel (or replicated, summed over ranks) o_proj: each rank holds a partial [B, d_model]."""
    return Collective("all-reduce of o_proj's output", "B·d_model·2",
                      step.batch * shape.hidden * ACTIVATION_BYTES)


def _heads_split_reason(shape: AttentionShape, tp: int) -> str | None:
    if shape.heads % tp:
        return f"the {shape.heads} heads are not divisible by TP {tp}"
    return None


def _latent_split_reason(shape: AttentionShape, tp: int) -> str | None:
    if shape.latent % tp:
        return f"kv_lora_rank {shape.latent} is not divisible by g = TP {tp}"
    return None


def mla_tp(shape: AttentionShape, tp: int, step: Step) -> ModeRow:
    """vLLM's MLA under TP N: each rank H/N heads (q_b_proj / q_proj, kv_b_proj by heads, o_proj by
    its head inputs), q_a_proj and kv_a_proj whole; every rank caches every token's d_c + d_R values.
    Collectives: o_proj's all-reduce, B·d_model·2 bytes (none at N = 1)."""
    name = "MLA TP"
    reason = _heads_split_reason(shape, tp)
    if reason:
        return ModeRow(name, exact=True, impossible=reason)
    heads = shape.heads // tp
    return ModeRow(name, exact=True, values_per_token=shape.latent + shape.rope,
                   weights_per_rank=shape.layers * shape.layer_weights(heads, shape.latent),
                   collectives=(_o_proj_all_reduce(shape, step),) if tp > 1 else ())


def dcp(shape: AttentionShape, tp: int, step: Step) -> ModeRow:
    """vLLM's decode context parallel, DCP = TP = N (its default 'ag_rs' backend, queries not
    replicated). Weights as MLA TP. Token t is cached whole (d_c + d_R values) on one rank, so a
    rank caches (d_c + d_R)/N values per token on average. Per layer per decode step:

      all-gather of the absorbed queries  each rank's [B, H/N, d_c + d_R] -> [B, H, d_c + d_R]:
                                          B·H·(d_c + d_R)·2 bytes gathered
      all-gather of the log-sum-exps      each rank's [B, H] float32 over its tokens -> [N, B, H]:
                                          N·B·H·4 bytes
      reduce-scatter of the outputs       [B, H, d_c] latent outputs rescaled by the LSEs, summed
                                          over ranks, each rank keeps its H/N heads: B·H·d_c·2 bytes
      all-reduce of o_proj's output       B·d_model·2 bytes, as MLA TP
    """
    name = f"DCP {tp}"
    reason = _heads_split_reason(shape, tp)
    if reason:
        return ModeRow(name, exact=True, impossible=reason)
    heads = shape.heads // tp
    entry = shape.latent + shape.rope
    collectives = ()
    if tp > 1:
        b, h = step.batch, shape.heads
        collectives = (
            Collective("all-gather of the absorbed queries", "B·H·(d_c+d_R)·2", b * h * entry * ACTIVATION_BYTES),
            Collective("all-gather of the log-sum-exps", "N·B·H·4", tp * b * h * FLOAT32_BYTES),
            Collective("reduce-scatter of the latent outputs", "B·H·d_c·2", b * h * shape.latent * ACTIVATION_BYTES),
            _o_proj_all_reduce(shape, step),
        )
    return ModeRow(name, exact=True, values_per_token=entry / tp,
                   weights_per_rank=shape.layers * shape.layer_weights(heads, shape.latent),
                   collectives=collectives)


def dp_attention(shape: AttentionShape, tp: int, step: Step) -> ModeRow:
    """SGLang's DP attention, dp = tp = N: every rank holds the whole attention layer (all H heads,
    all weights) and runs its own B/N requests; each token is cached whole (d_c + d_R values) on its
    request's rank only, (d_c + d_R)/N per token per rank on average (one request's context is bounded
    by one rank's cache). Attention itself communicates nothing; the MLP, still parallel over the N
    ranks, first gathers every rank's hidden states (SGLang's dp_gather: an all-gather padded to the
    largest rank's batch, or an all-reduce of a zero-padded buffer): B·d_model·2 bytes unpadded. The
    MLP's own reduction afterwards hands each rank its rows back; that is the MLP's, not listed."""
    name = "DP-attention"
    collectives = ()
    if tp > 1:
        collectives = (Collective("gather of hidden states for the MLP", "B·d_model·2",
                                  step.batch * shape.hidden * ACTIVATION_BYTES),)
    return ModeRow(name, exact=True, values_per_token=(shape.latent + shape.rope) / tp,
                   weights_per_rank=shape.layers * shape.layer_weights(shape.heads, shape.latent),
                   collectives=collectives)


def sharded_latent(shape: AttentionShape, tp: int, step: Step, softmax: str) -> ModeRow:
    """mla_plugin_gla with g = N slices: each rank caches d_c/N latent values + d_R per token.

    exact, partitioned: all H heads on every rank, q and o_proj whole, kv_b_proj's d_c/N columns of
    the rank's slice for every head (held after loading: the rank loads all d_c columns, folds the
    norm weight and basis, and keeps its slice's). grouped: H/N heads per rank (q by heads, o_proj by its head
    inputs, kv_b_proj those heads' rows, d_c/N columns; with the identity basis or a converted
    checkpoint). kv_a_proj is whole on every rank in all three. Per layer per decode step:

      exact        all-reduce of the partial latent logits: [B, H, C] float32, B·H·C·4 bytes (run in
                   chunks, same total), then o_proj's all-reduce B·d_model·2
      partitioned  o_proj's all-reduce only
      grouped      o_proj's all-reduce only
    """
    name = f"sharded {softmax}"
    exact = softmax == "exact"
    reason = _latent_split_reason(shape, tp) or (_heads_split_reason(shape, tp) if softmax == "grouped" else None)
    if reason:
        return ModeRow(name, exact=exact, impossible=reason)
    heads = shape.heads // tp if softmax == "grouped" else shape.heads
    collectives = ()
    if tp > 1:
        logits = (Collective("all-reduce of the partial latent logits", "B·H·C·4",
                             step.batch * shape.heads * step.context * FLOAT32_BYTES),) if exact else ()
        collectives = logits + (_o_proj_all_reduce(shape, step),)
    return ModeRow(name, exact=exact, values_per_token=shape.latent // tp + shape.rope,
                   weights_per_rank=shape.layers * shape.layer_weights(heads, shape.latent // tp),
                   collectives=collectives)


def plan_rows(shape: AttentionShape, tp: int, step: Step) -> list[ModeRow]:
    """Every mode at TP ``tp``, in the order the table shows them."""
    return [mla_tp(shape, tp, step), dcp(shape, tp, step), dp_attention(shape, tp, step),
            *(sharded_latent(shape, tp, step, softmax) for softmax in ("exact", "partitioned", "grouped"))]


def _config_path(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MLAPluginInputError(f"{model}: no such config; give a checkpoint folder with a config.json, "
                                  "or a config.json path")
    return path


def _positive(config: dict, key: str, path: Path) -> int:
    value = config.get(key)
    if value is None:
        raise MLAPluginInputError(f"{path} has no {key}; an MLA config (DeepSeek-V2/V3 style) needs it")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MLAPluginInputError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def shape_from_config(config: dict, name: str, path: Path) -> AttentionShape:
    """The attention sizes of a DeepSeek-V2/V3-style config (or its ``text_config``)."""
    if "kv_lora_rank" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    if config.get("kv_lora_rank") is None:
        raise MLAPluginInputError(f"{path} is not an MLA config (no kv_lora_rank); plan reads DeepSeek-V2/V3-style "
                                  "configs (kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim, ...)")
    sizes = {field: _positive(config, key, path) for key, field in REQUIRED_FIELDS.items()}
    q_rank = _positive(config, "q_lora_rank", path) if config.get("q_lora_rank") is not None else None
    return AttentionShape(name=name, q_rank=q_rank, **sizes)


def load_shape(model: str) -> AttentionShape:
    """MODEL (a checkpoint folder or a config.json path) as an :class:`AttentionShape`; bad input
    raises :class:`MLAPluginInputError` with one line."""
    path = _config_path(model)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MLAPluginInputError(f"cannot read {path} as JSON: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict):
        raise MLAPluginInputError(f"{path} must hold a JSON object (a model config), got {type(config).__name__}")
    name = path.parent.name if path.name == "config.json" else path.stem
    return shape_from_config(config, name or str(path), path)


def check_options(tp: int, batch: int, context: int, cache_dtype: str) -> None:
    """One line per bad option, naming the flag."""
    for flag, value in (("--tp", tp), ("--batch", batch), ("--context", context)):
        if value < 1:
            raise MLAPluginInputError(f"{flag} must be a positive integer, got {value}")
    if cache_dtype not in CACHE_DTYPES:
        raise MLAPluginInputError(f"--kv-cache-dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")


def _si(count: int) -> str:
    """A parameter count in M or G (decimal), three significant digits."""
    return f"{count / 1e9:.3g} G" if count >= 1e9 else f"{count / 1e6:.3g} M"


def _binary(size: int) -> str:
    """A byte count in B, KiB, MiB or GiB, three significant digits."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


def _values(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.1f}"


SUMMARY_HEADER = ("mode", "cached values/token/rank", "tokens/GiB/rank", "attn weights/rank",
                  "collective bytes/layer/step", "exact (= MLA)")
COLLECTIVE_HEADER = ("mode", "collective, per layer per decode step", "size", "bytes")


def summary_cells(rows: list[ModeRow], shape: AttentionShape, cache_bytes: int) -> list[tuple[str, ...]]:
    cells = []
    for row in rows:
        exact = "yes" if row.exact else "no"
        if row.impossible:
            cells.append((row.mode, f"not possible: {row.impossible}", "-", "-", "-", exact))
            continue
        cells.append((row.mode, _values(row.values_per_token), f"{row.tokens_per_gib(shape, cache_bytes):,}",
                      _si(row.weights_per_rank), _binary(row.collective_bytes), exact))
    return cells


def collective_cells(rows: list[ModeRow]) -> list[tuple[str, ...]]:
    cells = []
    for row in rows:
        if row.impossible:
            continue
        if not row.collectives:
            cells.append((row.mode, "none", "-", "0 B"))
        cells.extend((row.mode, c.name, c.formula, _binary(c.bytes)) for c in row.collectives)
    return cells


def _table(header: tuple[str, ...], cells: list[tuple[str, ...]], fmt: str) -> list[str]:
    """A Markdown table, or plain text with aligned columns."""
    if fmt == "markdown":
        return ["| " + " | ".join(line) + " |" for line in (header, ("---",) * len(header), *cells)]
    widths = [max(len(line[i]) for line in (header, *cells)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in (header, *cells)]
    return [lines[0], "  ".join("-" * width for width in widths), *lines[1:]]


NOTES = (
    "All figures are computed from the config with the formulas in mla_plugin/plan.py; none is measured.",
    "Modes: MLA TP = vLLM's MLA (heads split, the whole latent on every rank); DCP N = vLLM's "
    "--decode-context-parallel-size N (tokens split over the ranks); DP-attention = SGLang's --enable-dp-attention "
    "(a whole attention layer per rank, for its own requests); sharded exact / partitioned / grouped = "
    "mla_plugin_gla with g = N latent slices (grouped splits the heads too).",
    "Cached values / token / rank: one layer; the N ranks' values for one token, divided by N "
    "(DCP and DP-attention cache each token whole on one rank: an average).",
    "DP-attention: a request's cache lives on its own rank, so one request's context is bounded by one rank's cache.",
    "Attention weights: q_proj (or q_a_proj + q_b_proj), kv_a_proj_with_mqa, kv_b_proj, o_proj matrices x layers, "
    "as held after loading (sharded exact / partitioned load all of kv_b_proj, keep d_c/N columns); "
    "norms, MLP, embeddings not counted.",
    "Bytes: each collective's whole buffer (a ring all-reduce sends about 2(N-1)/N of it per rank); "
    "activations bf16, logits and log-sum-exps float32; the MLP's own collectives not listed.",
    "DCP runs on vLLM's own MLA backends (the plugin's backends do not declare DCP support); "
    "partitioned and grouped compute a different function: check it with `mla-plugin ppl`.",
)


def render(shape: AttentionShape, tp: int, step: Step, cache_dtype: str = DEFAULT_CACHE_DTYPE,
           fmt: str = "text") -> str:
    """The whole report: the model line, the summary table, the collectives table and the notes."""
    cache_bytes = CACHE_DTYPES[cache_dtype]
    rows = plan_rows(shape, tp, step)
    query = f"q_lora_rank {shape.q_rank}" if shape.q_rank else "full-rank q_proj"
    lines = [f"{shape.name}: {shape.layers} layers, H {shape.heads}, d_model {shape.hidden}, d_c {shape.latent}, "
             f"d_R {shape.rope}, d_nope {shape.nope}, d_v {shape.value}, {query}",
             f"TP {tp}, {cache_dtype} cache ({cache_bytes} byte{'s' if cache_bytes > 1 else ''} per value); "
             f"decode step: batch B {step.batch}, context C {step.context}", ""]
    lines += _table(SUMMARY_HEADER, summary_cells(rows, shape, cache_bytes), fmt)
    lines += ["", *_table(COLLECTIVE_HEADER, collective_cells(rows), fmt), ""]
    bullet = "- " if fmt == "markdown" else "* "
    lines += [bullet + note for note in NOTES]
    return "\n".join(lines) + "\n"
