"""Calibration capture: run a source checkpoint once with transformers and keep activations.

The only transformers code of the converters' calibration (the math is in
``calibration_fit.py``, the windowing in ``mla_plugin.text_windows``). Both load the whole
model in float32; the converters' tensor copy stays streaming.

- ``capture_activations`` (mla-to-gla): a DeepSeek-V2 checkpoint's per-layer latent, rope
  key and (at sampled positions) queries, through an eager attention registered under its
  own name that hands q and k to a per-module sink.
- ``capture_kv_moments`` (gqa-to-mla): a Llama/Mistral/Qwen2 checkpoint's per-layer second
  moment E[y yᵀ] of y = [k; v] (pre-RoPE, bias included), through forward hooks.

Symbols as in docs/design.md (Glossary). Shape letters: N calibration windows, B windows
in one forward batch, T tokens per window, P sampled query rows per window, H heads.
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from mla_plugin.convert.calibration_fit import DEFAULT_QUERIES_PER_WINDOW, LayerCapture, query_positions
from mla_plugin.convert.defaults import MLA_TO_GLA_CALIB_TOKENS, MLA_TO_GLA_CALIB_WINDOW
from mla_plugin.convert.pipeline import progress_bar
from mla_plugin.text_windows import calibration_windows, read_text_file, tokenize_once

_CAPTURE_ATTENTION = "mla_plugin_calibration_capture"


@dataclass
class Capture:
    """Every layer's activations on the calibration windows, and where they came from."""

    layers: dict[int, LayerCapture]
    positions: torch.Tensor  # [N, P] long
    text_name: str
    windows: int
    window: int

    @property
    def tokens(self) -> int:
        return self.windows * self.window



def source_tokenizer(model_path):
    """The checkpoint's own tokenizer (transformers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def _register_capture_attention() -> None:
    """Eager attention that also hands q and k to the module's sink, under its own name.

    The mask function must be registered under the same name: transformers builds no
    mask at all (bidirectional attention!) for an implementation it has no mask for.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import eager_attention_forward

    def capture_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if attention_mask is None and query.shape[2] > 1:
            raise RuntimeError("calibration capture got no causal mask from transformers")
        sink = getattr(module, "_mla_plugin_capture", None)
        if sink is not None:
            sink(module, query, key, scaling)
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)

    AttentionInterface.register(_CAPTURE_ATTENTION, capture_attention)
    AttentionMaskInterface.register(_CAPTURE_ATTENTION, eager_mask)


def capture_activations(
    model_path,
    text_path,
    *,
    tokens: int = MLA_TO_GLA_CALIB_TOKENS,
    window: int = MLA_TO_GLA_CALIB_WINDOW,
    queries_per_window: int | None = DEFAULT_QUERIES_PER_WINDOW,
    need_queries: bool = True,
    batch: int = 8,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> Capture:
    """Run the source DeepSeek-V2 checkpoint (transformers, float32) over calibration text.

    The text is tokenized once with BOS at the start and cut into non-overlapping
    windows of ``window`` tokens, at most ``tokens // window`` of them. Per layer it keeps
    the raw latent c and the rope key of every token, and (``need_queries``) the nope
    query and rope query at ``queries_per_window`` random positions of each window.
    Loads the whole model into memory (float32), on ``device`` (default: CUDA when
    available, else CPU); the captured tensors are kept on the CPU.
    """
    text_path = Path(text_path)
    text = read_text_file(text_path)
    ids = tokenize_once(source_tokenizer(model_path), text)
    try:
        windows = calibration_windows(ids, tokens, window)
    except ValueError as err:
        raise ValueError(f"calibration text {text_path.name}: {err}") from None
    positions = query_positions(len(windows), window, queries_per_window)  # [N, P]

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _capture_model(model_path, device)
    recorder = _ActivationRecorder(model, need_queries)
    starts = range(0, len(windows), batch)
    if show_progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"calibration forward ({len(windows)} x {window} tokens)", unit="batch")
    try:
        with torch.no_grad():
            for start in starts:
                chunk = windows[start : start + batch]
                recorder.positions = positions[start : start + len(chunk)]
                model(torch.tensor(chunk, device=device), use_cache=False)
    finally:
        recorder.detach()
    layers = recorder.layer_captures()
    del model
    return Capture(layers=layers, positions=positions, text_name=text_path.name, windows=len(windows),
                   window=window)


def _capture_model(model_path, device: torch.device):
    """The source checkpoint in float32 with the capturing eager attention."""
    from transformers import AutoModelForCausalLM

    _register_capture_attention()
    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32,
                                                attn_implementation=_CAPTURE_ATTENTION).to(device).eval()


class _ActivationRecorder:
    """Hooks on every attention layer of a capture model, and what they recorded (on the CPU).

    Per layer: the raw latent (the input of kv_a_layernorm), the rope key, the softmax scale
    and, with ``need_queries``, the nope and rope queries at ``positions`` (set per batch).
    """

    def __init__(self, model, need_queries: bool):
        self.nope = model.config.qk_nope_head_dim
        self.need_queries = need_queries
        self.positions: torch.Tensor | None = None  # [B, P] of the batch being run
        self.store: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.attn_modules = {}
        self.handles = []
        for layer in model.model.layers:
            attn = layer.self_attn
            idx = attn.layer_idx
            self.attn_modules[idx] = attn
            self.store[idx] = {"latent": [], "k_rope": [], "q_nope": [], "q_rope": []}
            self.handles.append(attn.kv_a_layernorm.register_forward_pre_hook(partial(self._latent, idx)))
            attn._mla_plugin_capture = partial(self._sink, idx)

    def _latent(self, idx, module, args):
        self.store[idx]["latent"].append(args[0].detach().float().cpu().clone())

    def _sink(self, idx, module, query, key, scaling):
        # query [B, H, T, d_nope + d_R] (rope applied), key [B, H, T, d_nope + d_R]; k^R shared by heads
        nope, store = self.nope, self.store[idx]
        store["k_rope"].append(key[:, 0, :, nope:].detach().float().cpu().clone())
        module._mla_plugin_scale = float(scaling)
        if self.need_queries:
            pos = self.positions  # [B, P]
            q = query.detach().float().transpose(1, 2)  # [B, T, H, d_nope + d_R]
            # the sampled query rows: [B, P, H, d_nope + d_R]
            picked = torch.stack([q[b, pos[b].to(q.device)] for b in range(q.shape[0])]).cpu()
            store["q_nope"].append(picked[..., :nope].clone())
            store["q_rope"].append(picked[..., nope:].clone())

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        for attn in self.attn_modules.values():
            attn._mla_plugin_capture = None

    def layer_captures(self) -> dict[int, LayerCapture]:
        layers = {}
        for idx, parts in self.store.items():
            attn = self.attn_modules[idx]
            layers[idx] = LayerCapture(
                latent=torch.cat(parts["latent"]),
                k_rope=torch.cat(parts["k_rope"]),
                q_nope=torch.cat(parts["q_nope"]) if self.need_queries else torch.empty(0),
                q_rope=torch.cat(parts["q_rope"]) if self.need_queries else torch.empty(0),
                scale=attn._mla_plugin_scale,
                eps=float(attn.kv_a_layernorm.variance_epsilon),
            )
        return layers


def capture_kv_moments(model_path, windows: list[list[int]], *, num_layers: int,
                       show_progress: bool) -> tuple[list[torch.Tensor], int]:
    """Per layer E[y yᵀ] [2Kd, 2Kd] (float64) of y = [k; v] (pre-RoPE, bias included) over
    ``windows``, and the number of tokens seen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    moments = [None] * num_layers
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def hook(layer, kind):
        def save(_module, _inputs, output):
            captured[(layer, kind)] = output.detach().reshape(-1, output.shape[-1]).double()
            if kind == "v":
                y = torch.cat([captured.pop((layer, "k")), captured.pop((layer, "v"))], dim=1)  # [T, 2Kd]
                moment = y.T @ y
                moments[layer] = moment if moments[layer] is None else moments[layer] + moment
        return save

    handles = []
    for index, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(index, "k")))
        handles.append(layer.self_attn.v_proj.register_forward_hook(hook(index, "v")))
    seen = 0
    with torch.no_grad():
        for w in progress_bar(windows, "calibrate", show_progress):
            model(torch.tensor([w]))
            seen += len(w)
    for h in handles:
        h.remove()
    return [m / seen for m in moments], seen
