"""Perplexity on wikitext-2: the yardstick for every backend and conversion."""

from mla_plugin.eval.perplexity import (
    SCORE_MODES,
    PerplexityResult,
    PerplexityScorer,
    TextUnavailableError,
    load_text,
    perplexity,
    perplexity_from_window_nlls,
)
from mla_plugin.text_windows import make_windows, tokenize_once

__all__ = [
    "SCORE_MODES",
    "PerplexityResult",
    "PerplexityScorer",
    "TextUnavailableError",
    "load_text",
    "make_windows",
    "perplexity",
    "perplexity_from_window_nlls",
    "tokenize_once",
]
