"""Perplexity on wikitext-2: the yardstick for every backend and conversion."""

from mla_plugin.eval.perplexity import (
    PerplexityResult,
    TextUnavailableError,
    load_text,
    make_windows,
    perplexity,
    perplexity_from_window_nlls,
    tokenize_once,
)

__all__ = [
    "PerplexityResult",
    "TextUnavailableError",
    "load_text",
    "make_windows",
    "perplexity",
    "perplexity_from_window_nlls",
    "tokenize_once",
]
