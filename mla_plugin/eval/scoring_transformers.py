"""The transformers engine of the perplexity tool: the reference.

prefill: one forward pass per window; row t of the logits predicts token t + 1.
decode: the same windows one token at a time through transformers' KV cache (the
window's first token, then each reference token in turn), as a generating model would
see them. Both score the same function, so they agree to rounding; decode exercises the
model's cached attention path (for converted checkpoints, the modeling file written
beside the weights).
"""

import json
from pathlib import Path

from mla_plugin.checkpoint_format import transformers_loading_problem
from mla_plugin.errors import MLAPluginInputError


class TransformersScorer:
    def __init__(self, model_path: str, *, dtype: str, batch: int = 8) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        config_file = Path(model_path) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        # Checkpoints from `mla-plugin convert` that need their own modeling file carry it (auto_map).
        remote = "auto_map" in config and "mla_plugin" in config
        if (problem := transformers_loading_problem(config)) is not None:
            raise MLAPluginInputError(f"{model_path}: {problem}")  # stock code would score another model
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=remote).eval()
        self.batch = batch

    def window_nlls(self, windows: list[list[int]], score: str, progress) -> list[float]:
        return self._prefill(windows, progress) if score == "prefill" else self._decode(windows, progress)

    def _prefill(self, windows, progress) -> list[float]:
        import torch

        nlls = []
        with torch.no_grad():
            for window in windows:
                ids = torch.tensor([window])  # [1, W]
                logits = self.model(ids).logits[0, :-1].double()  # [W-1, V]: row t predicts token t + 1
                logprobs = torch.log_softmax(logits, dim=-1)
                nlls.append(float(-logprobs.gather(1, ids[0, 1:, None]).mean()))
                progress.update(1)
        return nlls

    def _decode(self, windows, progress) -> list[float]:
        import torch

        nlls = []
        with torch.no_grad():
            for start in range(0, len(windows), self.batch):
                ids = torch.tensor(windows[start : start + self.batch])  # [B, W]
                total = torch.zeros(ids.shape[0], dtype=torch.float64)  # [B]
                cache = None
                for t in range(ids.shape[1] - 1):
                    out = self.model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    logprobs = torch.log_softmax(out.logits[:, -1].double(), dim=-1)  # [B, V]
                    total -= logprobs.gather(1, ids[:, t + 1, None])[:, 0]
                nlls += (total / (ids.shape[1] - 1)).tolist()
                progress.update(ids.shape[0])
        return nlls

    def close(self) -> None:
        self.model = None
